"""specdec.rpc.status.StatusInterceptor: malformed requests and unexpected exceptions get proper status codes."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from specdec.pb import generation_pb2, generation_pb2_grpc
from specdec.rpc.status import StatusInterceptor

UNARY = "/specdec.v1.Generation/GenerateUnary"
STREAM = "/specdec.v1.Generation/Generate"


class Servicer(generation_pb2_grpc.GenerationServicer):
    """max_tokens picks the behaviour: 7 raises, 8 aborts with its own status, anything else answers."""

    async def GenerateUnary(self, request, context):
        if request.max_tokens == 7:
            raise IndexError("boom")
        if request.max_tokens == 8:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the handler's own answer")
        return generation_pb2.GenerateResult(text="ok")

    async def Generate(self, request, context):
        yield generation_pb2.GenerateResponse(text="a")
        if request.max_tokens == 7:
            raise KeyError("boom in a stream")


async def with_server(body):
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    generation_pb2_grpc.add_GenerationServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(body(channel), 20)
    finally:
        await server.stop(0)


def raw(channel, method, kind="unary_unary"):
    return getattr(channel, kind)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


@pytest.mark.parametrize("data, fragment", [
    (b"\xff\xff\xff", "Wire format was corrupt"),
    (b"\x0a\x02\xff\xfe", "bad UTF-8"),  # prompt (field 1) with invalid UTF-8
])
def test_bytes_that_do_not_parse_get_invalid_argument(data, fragment):
    async def body(channel):
        for method, kind in ((UNARY, "unary_unary"), (STREAM, "unary_stream")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                call = raw(channel, method, kind)(data, timeout=5)
                if kind == "unary_stream":
                    _ = [m async for m in call]
                else:
                    await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message" in info.value.details() and fragment in info.value.details()
        # The service goes on.
        stub = generation_pb2_grpc.GenerationStub(channel)
        assert (await stub.GenerateUnary(generation_pb2.GenerateRequest(max_tokens=1), timeout=5)).text == "ok"

    asyncio.run(with_server(body))


def test_an_unexpected_exception_is_internal_and_logged_once_and_a_handlers_abort_passes(caplog):
    async def body(channel):
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GenerateUnary(generation_pb2.GenerateRequest(max_tokens=7), timeout=5)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == f"{UNARY} failed inside the service: IndexError: boom"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [m async for m in stub.Generate(generation_pb2.GenerateRequest(max_tokens=7), timeout=5)]
        assert info.value.code() == grpc.StatusCode.INTERNAL and "KeyError" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GenerateUnary(generation_pb2.GenerateRequest(max_tokens=8), timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details() == "the handler's own answer"
        assert [m.text async for m in stub.Generate(generation_pb2.GenerateRequest(max_tokens=2), timeout=5)] == ["a"]

    with caplog.at_level(logging.ERROR, logger="specdec.rpc.status"):
        asyncio.run(with_server(body))
    logged = [r for r in caplog.records if r.name == "specdec.rpc.status"]
    assert [r.getMessage() for r in logged] == [f"{UNARY} failed on an unexpected error",
                                                f"{STREAM} failed on an unexpected error"]
    assert all(r.exc_info for r in logged)

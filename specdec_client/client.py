"""Sync and async clients of the public `specdec.v1.Generation` API (served by the scheduler).

Both take the same arguments and behave alike (retries, deadlines, API key and TLS: see core.py, where
everything they share lives); this module holds only the I/O of each: blocking calls on a grpc channel,
and awaited calls on a grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterator

import grpc
from grpc_health.v1 import health_pb2_grpc

from specdec_client._pb import generation_pb2, generation_pb2_grpc
from specdec_client.core import DEFAULT_TARGET, GenerationApi, ReadinessPoll, StreamCall, UnaryCall
from specdec_client.messages import model_info_from_proto, result_from_proto
from specdec_client.types import GenerationChunk, GenerationResult, ModelInfo

__all__ = ["DEFAULT_TARGET", "AsyncClient", "AsyncGenerationStream", "Client", "GenerationStream"]


# ---------------------------------------------------------------------------------------------------------
# sync client


class GenerationStream(StreamCall):
    """Iterator over the chunks of one streamed generation.

    `.result` is the whole completion once the last chunk arrived (None before); `collect()` reads what is
    left and returns it. Leaving the loop early (or `cancel()`) cancels the call on the server.
    """

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        return next(self._chunks)

    def collect(self) -> GenerationResult:
        """Read the rest of the stream and return the whole completion."""
        for _ in self._chunks:
            pass
        return self._assembler.finish()

    def cancel(self) -> None:
        """Stop the generation: the server frees the request's state. Safe from another thread, where the
        iterating thread then gets Cancelled."""
        if self._call is not None:
            self._call.cancel()
        try:
            self._chunks.close()
            self._span.end()  # when iteration never started
        except ValueError:  # the generator is running in another thread; the cancelled call ends it
            pass

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()

    def _iterate(self) -> Iterator[GenerationChunk]:
        with self._scope():
            self._begin()
            call, message = self._options.retrying(self._deadline)(self._first_message)
            try:
                while message is not None:
                    yield self._chunk(message)
                    message = next(call, None)
            finally:
                call.cancel()  # a no-op after a normal end; frees the server's work when the caller stops early
            self._assembler.finish()

    def _first_message(self) -> tuple[grpc.Call, generation_pb2.GenerateResponse | None]:
        call = self._open()
        return call, next(call, None)  # once it arrived, no retry


class Client(GenerationApi[GenerationResult, GenerationStream]):
    """Blocking client of the Generation API (arguments: see GenerationApi). Use as a context manager, or
    call close()."""

    def _connect(self) -> None:
        self._channel = self._options.open_channel(grpc)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        """The served model: name, context length, vocabulary, whether it has a chat template."""
        call = UnaryCall(self._options, timeout)
        with call.scope():
            response = call.run(self._stub.ModelInfo, generation_pb2.ModelInfoRequest())
        return model_info_from_proto(response)

    def _unary(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> GenerationResult:
        call = UnaryCall(self._options, timeout, "GenerateUnary")
        with call.scope():
            response = call.run(self._stub.GenerateUnary, request)
            return call.generated(result_from_proto(response, request.logprobs))

    def _stream(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> GenerationStream:
        return GenerationStream(self._options, lambda t, md: self._stub.Generate(request, timeout=t, metadata=md),
                                timeout, max(request.n, 1), request.logprobs)

    def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Block until the server's standard health check says SERVING; DeadlineExceeded after `timeout` s."""
        poll = ReadinessPoll(self.target, timeout, service)
        for attempt_s in poll.attempts():
            try:
                if poll.serving(self._health.Check(poll.request, timeout=attempt_s, wait_for_ready=True,
                                                   metadata=self._options.metadata)):
                    return
            except grpc.RpcError as exc:
                poll.failed(exc)
            time.sleep(poll.pause_s())
        raise poll.timed_out()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# async client


class AsyncGenerationStream(StreamCall):
    """Async iterator over the chunks of one streamed generation; see GenerationStream."""

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        return await self._chunks.__anext__()

    async def collect(self) -> GenerationResult:
        """Read the rest of the stream and return the whole completion."""
        async for _ in self._chunks:
            pass
        return self._assembler.finish()

    async def cancel(self) -> None:
        """Stop the generation: the server frees the request's state."""
        if self._call is not None:
            self._call.cancel()
        await self._chunks.aclose()
        self._span.end()  # when iteration never started

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.cancel()

    async def _iterate(self) -> AsyncIterator[GenerationChunk]:
        with self._scope():
            self._begin()
            call, message = await self._options.async_retrying(self._deadline)(self._first_message)
            try:
                while message is not grpc.aio.EOF:
                    yield self._chunk(message)
                    message = await call.read()
            finally:
                call.cancel()
            self._assembler.finish()

    async def _first_message(self) -> tuple[grpc.aio.Call, object]:
        call = self._open()
        return call, await call.read()  # once it arrived, no retry


class AsyncClient(GenerationApi[Awaitable[GenerationResult], AsyncGenerationStream]):
    """asyncio client of the Generation API, same arguments (API key and TLS included) and behaviour as Client;
    `generate` and `chat` are awaited, `stream` and `chat_stream` iterated with `async for`.

    The channel is created on first use, inside the running event loop. Use `async with`, or await close().
    """

    def _connect(self) -> None:
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._options.open_channel(grpc.aio)
        return self._channel

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        """The served model; see Client.model_info."""
        stub = generation_pb2_grpc.GenerationStub(self._open())
        call = UnaryCall(self._options, timeout)
        with call.scope():
            response = await call.run_async(stub.ModelInfo, generation_pb2.ModelInfoRequest())
        return model_info_from_proto(response)

    async def _unary(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> GenerationResult:
        stub = generation_pb2_grpc.GenerationStub(self._open())
        call = UnaryCall(self._options, timeout, "GenerateUnary")
        with call.scope():
            response = await call.run_async(stub.GenerateUnary, request)
            return call.generated(result_from_proto(response, request.logprobs))

    def _stream(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> AsyncGenerationStream:
        def open_call(t: float | None, metadata) -> grpc.aio.Call:
            return generation_pb2_grpc.GenerationStub(self._open()).Generate(request, timeout=t, metadata=metadata)

        return AsyncGenerationStream(self._options, open_call, timeout, max(request.n, 1), request.logprobs)

    async def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Wait until the server's standard health check says SERVING; DeadlineExceeded after `timeout` s."""
        health = health_pb2_grpc.HealthStub(self._open())
        poll = ReadinessPoll(self.target, timeout, service)
        for attempt_s in poll.attempts():
            try:
                if poll.serving(await health.Check(poll.request, timeout=attempt_s, wait_for_ready=True,
                                                   metadata=self._options.metadata)):
                    return
            except grpc.RpcError as exc:
                poll.failed(exc)
            await asyncio.sleep(poll.pause_s())
        raise poll.timed_out()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

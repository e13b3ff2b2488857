"""specdec_client (sync and async) and `specdec generate` against an in-process fake Generation servicer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from specdec.ops import cli
from specdec.pb import generation_pb2, generation_pb2_grpc
from specdec_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    GenerationResult,
    InvalidArgument,
    ProposerStats,
    ResourceExhausted,
    SpecdecError,
    Unavailable,
)

pytestmark = pytest.mark.timeout(60)

# The fake's scripted completion of the prompt "hello": three steps, the last one carries stats.
STEPS = [([11, 12], "ab"), ([13], "c"), ([14, 15], "de")]
INVALID_MESSAGE = "max_tokens must be between 1 and 1024, got 5000"


def fake_stats() -> generation_pb2.GenerationStats:
    stats = generation_pb2.GenerationStats(
        prompt_tokens=3, completion_tokens=5, steps=3, proposed=8, accepted=5,
        time_to_first_token_ms=12.5, total_ms=40.25,
    )
    stats.proposers["ngram"].CopyFrom(generation_pb2.ProposerStats(steps=2, proposed=6, accepted=4))
    stats.proposers["draft"].CopyFrom(generation_pb2.ProposerStats(steps=1, proposed=2, accepted=1))
    return stats


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """Behaviour chosen by the prompt: hello (ok), invalid, full, flaky (UNAVAILABLE on the first 2 calls),
    midstream (one chunk then UNAVAILABLE), noend (no last message), slow (sleeps), forever (until cancelled)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.cancelled = threading.Event()

    async def _check(self, request, context) -> None:
        self.calls[request.prompt] += 1
        self.requests.append(request)
        if request.prompt == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, INVALID_MESSAGE)
        if request.prompt == "full":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "256 requests waiting")
        if request.prompt == "flaky" and self.calls["flaky"] <= 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "verifier restarting")
        if request.prompt == "slow":
            await asyncio.sleep(30)

    async def Generate(self, request, context):
        await self._check(request, context)
        if request.prompt == "forever":
            try:
                while True:
                    yield generation_pb2.GenerateResponse(token_ids=[1], text="x")
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        for i, (tokens, text) in enumerate(STEPS):
            last = i == len(STEPS) - 1
            if last and request.prompt == "noend":
                return
            yield generation_pb2.GenerateResponse(
                token_ids=tokens, text=text,
                finish_reason=generation_pb2.FINISH_REASON_LENGTH if last else 0,
                stats=fake_stats() if last else None,
            )
            if request.prompt == "midstream":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection to the verifier lost")

    async def GenerateUnary(self, request, context):
        await self._check(request, context)
        return generation_pb2.GenerateResult(
            text="".join(t for _, t in STEPS), token_ids=[i for ids, _ in STEPS for i in ids],
            finish_reason=generation_pb2.FINISH_REASON_EOS, stats=fake_stats(),
        )


class FakeServer:
    """A grpc.aio server with the fake servicer and a health service, on its own event loop thread."""

    def __init__(self) -> None:
        self.servicer = FakeGeneration()
        self.health = health_aio.HealthServicer()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.port = self.run(self._start())
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.run(self.health.set("", status))

    def stop(self) -> None:
        try:
            self.run(self.server.stop(None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def fake():
    server = FakeServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def check_result(result: GenerationResult, finish_reason: str) -> None:
    assert result.text == "abcde"
    assert result.token_ids == [11, 12, 13, 14, 15]
    assert result.finish_reason == finish_reason
    stats = result.stats
    assert (stats.prompt_tokens, stats.completion_tokens, stats.steps) == (3, 5, 3)
    assert (stats.proposed, stats.accepted) == (8, 5)
    assert stats.acceptance_rate == pytest.approx(5 / 8)
    assert stats.proposers == {"draft": ProposerStats(1, 2, 1), "ngram": ProposerStats(2, 6, 4)}
    steps, proposed, accepted = stats.proposers["ngram"]
    assert (steps, proposed, accepted) == (2, 6, 4)
    assert stats.proposers["ngram"].acceptance_rate == pytest.approx(4 / 6)
    assert stats.time_to_first_token_ms == pytest.approx(12.5)
    assert stats.total_ms == pytest.approx(40.25)


def fast_client(fake: FakeServer, **kwargs) -> Client:
    return Client(fake.target, **{"backoff_s": 0.01, "backoff_max_s": 0.05, **kwargs})


# ---------------------------------------------------------------------------------------------------------
# sync client


def test_generate_returns_the_whole_result_and_sends_the_arguments(fake):
    with fast_client(fake) as client:
        result = client.generate("hello", max_tokens=5, temperature=0.5, top_k=7, seed=42, stop=["\n\n"],
                                 proposer="ngram", ignore_eos=True)
        check_result(result, "eos")
        client.generate("hello")
    sent, default = fake.servicer.requests
    assert (sent.prompt, sent.max_tokens, sent.top_k, sent.seed, list(sent.stop)) == ("hello", 5, 7, 42, ["\n\n"])
    assert sent.temperature == pytest.approx(0.5)
    assert (sent.proposer, sent.ignore_eos) == ("ngram", True)
    assert not sent.HasField("top_p")
    # Unset optional fields stay unset: the server must not read top_p=0 or seed=0.
    assert not default.HasField("seed") and not default.HasField("top_p")
    assert default.max_tokens == 64 and default.temperature == 0.0


def test_prompt_token_ids_are_sent_as_ids(fake):
    with fast_client(fake) as client:
        assert client.stream([5, 6, 7], top_p=0.9).collect().text == "abcde"
    sent = fake.servicer.requests[0]
    assert sent.prompt == "" and list(sent.prompt_token_ids) == [5, 6, 7]
    assert sent.top_p == pytest.approx(0.9)


def test_stream_yields_each_step_and_exposes_the_result(fake):
    with fast_client(fake) as client:
        stream = client.stream("hello")
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if not chunk.is_last:
                assert stream.result is None
    assert [(c.token_ids, c.text) for c in chunks] == [(ids, text) for ids, text in STEPS]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert chunks[0].stats is None
    assert chunks[-1].stats == stream.result.stats
    check_result(stream.result, "length")


def test_stream_without_last_message_is_an_error(fake):
    with fast_client(fake) as client:
        stream = client.stream("noend")
        with pytest.raises(SpecdecError, match="finish reason"):
            list(stream)
        assert stream.result is None


def test_leaving_a_stream_early_cancels_it_on_the_server(fake):
    with fast_client(fake) as client:
        with client.stream("forever") as stream:
            for i, chunk in enumerate(stream):
                if i == 2:
                    break
        assert fake.servicer.cancelled.wait(5)
        assert next(stream, None) is None and stream.result is None


def test_invalid_argument_keeps_the_message(fake):
    with fast_client(fake) as client:
        with pytest.raises(InvalidArgument) as unary:
            client.generate("invalid")
        with pytest.raises(InvalidArgument) as streamed:
            list(client.stream("invalid"))
    for error in (unary.value, streamed.value):
        assert str(error) == INVALID_MESSAGE and error.message == INVALID_MESSAGE
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.servicer.calls["invalid"] == 2  # not retried


def test_resource_exhausted_is_typed_and_not_retried(fake):
    with fast_client(fake) as client:
        with pytest.raises(ResourceExhausted, match="256 requests waiting"):
            client.generate("full")
    assert fake.servicer.calls["full"] == 1


@pytest.mark.parametrize("streamed", [False, True])
def test_unavailable_before_the_first_token_is_retried(fake, streamed):
    with fast_client(fake, retries=3) as client:
        if streamed:
            result = client.stream("flaky").collect()
        else:
            result = client.generate("flaky")
    assert result.text == "abcde"
    assert fake.servicer.calls["flaky"] == 3  # two failures, then success


def test_retries_are_bounded(fake):
    with fast_client(fake, retries=1) as client:
        with pytest.raises(Unavailable, match="verifier restarting"):
            list(client.stream("flaky"))
    assert fake.servicer.calls["flaky"] == 2  # the first call and one retry


def test_unavailable_after_the_first_token_is_not_retried(fake):
    with fast_client(fake, retries=3) as client:
        stream = client.stream("midstream")
        received = []
        with pytest.raises(Unavailable, match="connection to the verifier lost"):
            for chunk in stream:
                received.append(chunk.text)
    assert received == ["ab"]
    assert fake.servicer.calls["midstream"] == 1


def test_deadline_exceeded(fake):
    with fast_client(fake, timeout=0.3) as client:
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.generate("slow")
        with pytest.raises(DeadlineExceeded):
            list(client.stream("slow"))
        # A per-call timeout overrides the client's default.
        with pytest.raises(DeadlineExceeded):
            client.generate("slow", timeout=0.1)
        assert time.monotonic() - began < 5
        assert client.generate("hello").text == "abcde"


def test_unreachable_server_is_unavailable_after_bounded_retries():
    from specdec.ops.launcher import free_ports

    (port,) = free_ports(1)
    with Client(f"127.0.0.1:{port}", retries=2, backoff_s=0.01, backoff_max_s=0.02) as client:
        began = time.monotonic()
        with pytest.raises(Unavailable):
            client.generate("hello", timeout=5)
        assert time.monotonic() - began < 4


def test_wait_ready_follows_the_health_service(fake):
    fake.set_serving(False)
    with fast_client(fake) as client:
        with pytest.raises(DeadlineExceeded, match="NOT_SERVING"):
            client.wait_ready(timeout=0.5)
        threading.Timer(0.3, fake.set_serving, args=(True,)).start()
        began = time.monotonic()
        client.wait_ready(timeout=5)
        assert 0.2 < time.monotonic() - began < 4


# ---------------------------------------------------------------------------------------------------------
# async client


def test_async_generate_and_errors(fake):
    async def scenario():
        async with AsyncClient(fake.target, backoff_s=0.01) as client:
            check_result(await client.generate("hello", seed=3), "eos")
            flaky = await client.generate("flaky")
            with pytest.raises(InvalidArgument, match="max_tokens"):
                await client.generate("invalid")
            with pytest.raises(DeadlineExceeded):
                await client.generate("slow", timeout=0.2)
            await client.wait_ready(timeout=5)
            return flaky

    assert asyncio.run(scenario()).text == "abcde"
    assert fake.servicer.calls["flaky"] == 3
    assert fake.servicer.requests[0].seed == 3


def test_async_stream(fake):
    async def scenario():
        async with AsyncClient(fake.target, backoff_s=0.01) as client:
            stream = client.stream("hello")
            chunks = [chunk async for chunk in stream]
            check_result(stream.result, "length")
            assert [c.text for c in chunks] == ["ab", "c", "de"]
            assert chunks[-1].finish_reason == "length"

            retried = await client.stream("flaky").collect()
            assert retried.text == "abcde"

            received = []
            with pytest.raises(Unavailable):
                async for chunk in client.stream("midstream"):
                    received.append(chunk.text)
            assert received == ["ab"]

    asyncio.run(scenario())
    assert fake.servicer.calls["flaky"] == 3
    assert fake.servicer.calls["midstream"] == 1


# ---------------------------------------------------------------------------------------------------------
# specdec generate


def test_cli_generate_streams_text_then_stats(fake, capsys):
    code = cli.main(["generate", "hello", "--target", fake.target, "--max-tokens", "5", "--seed", "1",
                     "--stop", "x", "--stop", "y", "--proposer", "draft"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "abcde\n"
    assert "steps 3, proposed 8, accepted 5, acceptance rate 62.5%" in err
    assert "ngram: steps 2, proposed 6, accepted 4" in err
    assert "time to first token 12.5 ms, total 40.2 ms" in err
    sent = fake.servicer.requests[0]
    assert (sent.max_tokens, sent.seed, list(sent.stop), sent.proposer) == (5, 1, ["x", "y"], "draft")


def test_cli_generate_json(fake, capsys):
    assert cli.main(["generate", "hello", "--target", fake.target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == "abcde" and data["finish_reason"] == "eos"
    assert data["stats"]["acceptance_rate"] == pytest.approx(5 / 8)
    assert data["stats"]["proposers"]["ngram"] == {"steps": 2, "proposed": 6, "accepted": 4,
                                                   "acceptance_rate": pytest.approx(4 / 6)}


def test_cli_generate_reports_typed_errors_without_traceback(fake, capsys):
    assert cli.main(["generate", "invalid", "--target", fake.target]) == 2
    err = capsys.readouterr().err
    assert INVALID_MESSAGE in err and "Traceback" not in err

    assert cli.main(["generate", "midstream", "--target", fake.target]) == 1
    out, err = capsys.readouterr()
    assert out == "ab\n" and "unavailable" in err and "Traceback" not in err

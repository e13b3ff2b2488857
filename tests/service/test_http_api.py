"""The OpenAI-compatible HTTP API of the scheduler, in front of the in-process fakes (tests/service/test_scheduler_fakes.py),
driven with the official openai package and raw HTTP: responses and streams, the error shape and status of
each failure (400, 401, 404, 413, 429, 503), health, and a disconnect cancelling the request everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx2
import openai
import pytest

from specdec.ops.launcher import free_ports
from test_scheduler_fakes import (
    EOS,
    TOKENIZER,
    FakeProposer,
    FakeVerifier,
    cluster,
    fake_logprob,
    reference,
    run,
    token_before,
)
from test_scheduler_generation import ChatTokenizer

pytestmark = pytest.mark.timeout(60)
MODEL = "fake-target"


@contextlib.asynccontextmanager
async def http_cluster(verifier: FakeVerifier | None = None, **config):
    """A fake cluster whose scheduler also serves the HTTP API; yields (cluster, base URL)."""
    verifier = verifier or FakeVerifier(model=f"/models/{MODEL}")
    async with cluster(verifier, http_port=free_ports(1)[0], **config) as c:
        yield c, f"http://127.0.0.1:{c.scheduler.http_port}"


def client(base: str, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                              timeout=20, **kwargs)


async def post(base: str, path: str, body, headers=None) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=20) as http:
        if isinstance(body, (bytes, str)):
            return await http.post(base + path, content=body, headers={"content-type": "application/json",
                                                                      **(headers or {})})
        return await http.post(base + path, json=body, headers=headers)


def assert_error(response: httpx2.Response, status: int, message: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error
    if param is not None:
        assert error["param"] == param
    return error


def test_completions_and_chat_whole_and_streamed():
    async def body():
        async with http_cluster(proposers={"fake": FakeProposer("good")}, k=3, tokenizer=ChatTokenizer()) as (c, base):
            api = client(base)
            models = await api.models.list()
            assert [m.id for m in models.data] == [MODEL]
            prompt = [5, 6, 7]
            want, _ = reference(prompt, 9)
            result = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0)
            assert result.choices[0].text == TOKENIZER.decode(want) and result.choices[0].finish_reason == "length"
            assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (3, 9, 12)
            speculation = result.model_extra["speculation"]
            assert speculation["accepted"] == speculation["proposed"] > 0
            assert speculation["proposers"]["fake"]["proposed"] == speculation["proposed"]
            # The same text streamed, then [DONE]; usage on the last chunk when asked.
            stream = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == TOKENIZER.decode(want)
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
            assert [ch.choices[0].finish_reason for ch in chunks[:-1]][-1] == "length"
            # Chat through the template; n = 2 with logprobs.
            messages = [{"role": "user", "content": "hello"}]
            templated = TOKENIZER.encode("<user>hello\n<assistant>", add_special_tokens=False)
            chat = await api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=4, n=2,
                                                     temperature=0, logprobs=True, top_logprobs=1)
            want_chat, _ = reference(templated, 4)
            assert [ch.index for ch in chat.choices] == [0, 1]
            for choice in chat.choices:
                assert choice.message.role == "assistant" and choice.message.content == TOKENIZER.decode(want_chat)
                lps = choice.logprobs.content
                assert [lp.logprob for lp in lps] == pytest.approx([fake_logprob(t) for t in want_chat])
                assert [lp.token for lp in lps] == [TOKENIZER.decode([t]) for t in want_chat]
                assert all(len(lp.top_logprobs) == 1 for lp in lps)
            assert chat.usage.prompt_tokens == len(templated) and chat.usage.completion_tokens == 8
            stream = await api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2,
                                                       temperature=0, stream=True)
            texts, finish = {0: "", 1: ""}, {}
            async for chunk in stream:
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
                    if choice.finish_reason:
                        finish[choice.index] = choice.finish_reason
            assert texts == {0: TOKENIZER.decode(want_chat), 1: TOKENIZER.decode(want_chat)}
            assert finish == {0: "length", 1: "length"}
            await asyncio.sleep(0.05)
            assert c.verifier.seqs == {}

    run(body())


def test_stop_eos_and_default_max_tokens():
    async def body():
        async with http_cluster(max_tokens_limit=16) as (c, base):
            api = client(base)
            before_eos = token_before(EOS)
            prompt = [1, token_before(token_before(before_eos))]
            result = await api.completions.create(model=MODEL, prompt=prompt, temperature=0)
            assert result.choices[0].finish_reason == "stop"  # the EOS
            assert result.usage.completion_tokens == 2
            # No max_tokens: up to the server's limit.
            result = await api.completions.create(model=MODEL, prompt=[3, 4], temperature=0)
            assert result.usage.completion_tokens == 16 and result.choices[0].finish_reason == "length"
            want, _ = reference([3, 4], 16)
            text = TOKENIZER.decode(want)
            stop = text[5:8]
            result = await api.completions.create(model=MODEL, prompt=[3, 4], temperature=0, stop=stop)
            assert result.choices[0].text == text[: text.find(stop)] and result.choices[0].finish_reason == "stop"

    run(body())


def test_errors_have_openais_shape_and_status():
    async def body():
        async with http_cluster(max_tokens_limit=16) as (c, base):
            good = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
            # 400: what the shared validation says, word for word as over gRPC.
            assert_error(await post(base, "/v1/completions", {**good, "temperature": -1}), 400,
                         "temperature must be a finite number >= 0")
            assert_error(await post(base, "/v1/completions", {**good, "max_tokens": 100}), 400,
                         "above this server's limit of 16")
            assert_error(await post(base, "/v1/completions", {**good, "max_tokens": 0}), 400,
                         "max_tokens must be >= 1")
            assert_error(await post(base, "/v1/completions", {**good, "n": 0}), 400, "n must be in 1..64", "n")
            assert_error(await post(base, "/v1/completions", {**good, "proposer": "x"}), 400, "unknown proposer 'x'")
            assert_error(await post(base, "/v1/completions", {**good, "prompt": ["a", "b"]}), 400,
                         "2 prompts in one request", "prompt")
            assert_error(await post(base, "/v1/completions", {**good, "presence_penalty": 0.5}), 400,
                         "presence_penalty is not supported", "presence_penalty")
            assert_error(await post(base, "/v1/completions", {**good, "tools": []}), 400, "unknown field 'tools'",
                         "tools")
            assert_error(await post(base, "/v1/completions", {**good, "max_tokens": "many"}), 400, "max_tokens:",
                         "max_tokens")
            assert_error(await post(base, "/v1/completions", {**good, "max_tokens": 2**40}), 400, "max_tokens:")
            assert_error(await post(base, "/v1/completions", {**good, "seed": -1}), 400, "seed:")
            assert_error(await post(base, "/v1/completions", {"prompt": "hi"}), 400, "model is required", "model")
            assert_error(await post(base, "/v1/completions", b"{not json"), 400, "not valid JSON")
            assert_error(await post(base, "/v1/completions", {**good, "stream_options": {"include_usage": True}}),
                         400, "only allowed with stream: true")
            assert_error(await post(base, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400,
                         "messages is empty")
            assert_error(await post(base, "/v1/chat/completions",
                                    {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}), 400,
                         "has no chat template")
            assert_error(await post(base, "/v1/chat/completions",
                                    {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                     "top_logprobs": 2}), 400, "top_logprobs needs logprobs")
            assert_error(await post(base, "/v1/completions", b"x" * (8 * 1024 * 1024 + 1)), 413, "larger than")
            # 404: an unknown model or route.
            error = assert_error(await post(base, "/v1/completions", {**good, "model": "gpt-4"}), 404,
                                 "the model 'gpt-4' does not exist", "model")
            assert error["code"] == "model_not_found"
            assert_error(await post(base, "/v1/nothing", good), 404, "Not Found")
            # The openai client raises its typed errors.
            with pytest.raises(openai.BadRequestError) as info:
                await client(base).completions.create(model=MODEL, prompt="hi", max_tokens=4, top_p=2)
            assert "top_p must be in (0, 1]" in info.value.body["message"]
            with pytest.raises(openai.NotFoundError):
                await client(base).chat.completions.create(model="x", messages=[{"role": "user", "content": "x"}])
            # Nothing was left behind.
            assert c.verifier.seqs == {} and c.engine.num_waiting == 0

    run(body())


def test_full_queue_is_429_and_a_stopped_verifier_is_503():
    async def body():
        verifier = FakeVerifier(model=f"/models/{MODEL}", max_slots=1, max_batch_size=1, verify_delay_s=0.05)
        async with http_cluster(verifier, max_waiting=0, proposers={}) as (c, base):
            api = client(base)
            running = asyncio.create_task(api.completions.create(model=MODEL, prompt=[1], max_tokens=20))
            while c.engine.num_running == 0:
                await asyncio.sleep(0.005)
            with pytest.raises(openai.RateLimitError) as info:
                await api.completions.create(model=MODEL, prompt=[2], max_tokens=2)
            assert info.value.status_code == 429 and "the server is full" in info.value.body["message"]
            assert (await running).usage.completion_tokens == 20
        async with http_cluster() as (c, base):
            async with httpx2.AsyncClient(timeout=10) as http:
                assert (await http.get(f"{base}/health")).json() == {"status": "ok"}
                await c.verifier_server.stop(0)
                for _ in range(500):  # the scheduler notices the verifier is gone (seconds)
                    if not c.scheduler.scheduler.verifier_up:
                        break
                    await asyncio.sleep(0.02)
                health = await http.get(f"{base}/health")
                assert health.status_code == 503 and health.json() == {"status": "verifier unreachable"}
            with pytest.raises(openai.InternalServerError) as info:
                await client(base).completions.create(model=MODEL, prompt=[1], max_tokens=2)
            assert info.value.status_code == 503 and "is unreachable" in info.value.body["message"]

    run(body())


def test_api_keys_guard_every_v1_route():
    async def body():
        async with http_cluster(api_keys=("k1", "k2")) as (c, base):
            with pytest.raises(openai.AuthenticationError) as info:
                await client(base, api_key="wrong").models.list()
            assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
            assert "wrong" not in info.value.body["message"]
            async with httpx2.AsyncClient(timeout=10) as http:
                missing = await http.get(f"{base}/v1/models")
                assert_error(missing, 401, "missing API key")
                assert (await http.get(f"{base}/health")).status_code == 200  # probes need no key
            assert_error(await post(base, "/v1/completions", {"model": MODEL, "prompt": "x"},
                                    headers={"authorization": "Basic k1"}), 401, "malformed")
            result = await client(base, api_key="k2").completions.create(model=MODEL, prompt=[1], max_tokens=2)
            assert result.usage.completion_tokens == 2

    run(body())


def test_a_client_that_disconnects_cancels_its_request_everywhere():
    async def body():
        verifier = FakeVerifier(model=f"/models/{MODEL}", verify_delay_s=0.01)
        async with http_cluster(verifier, proposers={"fake": FakeProposer("good")}, k=1) as (c, base):
            proposer = c.proposers["fake"]
            for stream in (True, False):
                steps_before = len(verifier.verify_batches)
                async with httpx2.AsyncClient(timeout=10) as http:
                    request = {"model": MODEL, "prompt": [1, 2], "max_tokens": 100, "stream": stream}
                    if stream:
                        async with http.stream("POST", f"{base}/v1/completions", json=request) as response:
                            assert response.status_code == 200
                            async for line in response.aiter_lines():
                                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                                    break  # leave after the first text
                    else:
                        task = asyncio.create_task(http.post(f"{base}/v1/completions", json=request))
                        while c.engine.num_running == 0:
                            await asyncio.sleep(0.005)
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                for _ in range(200):
                    if not verifier.seqs and not proposer.history and c.engine.num_running == 0:
                        break
                    await asyncio.sleep(0.01)
                assert verifier.seqs == {} and proposer.history == {} and c.engine.num_running == 0, stream
                # It stopped early: far fewer steps than 100 tokens take (50 at k = 1 with a right proposer).
                assert len(verifier.verify_batches) - steps_before < 30

    run(body())


def test_kept_alive_connections_answer_without_waiting_for_a_delayed_ack():
    """Requests on one kept-alive connection come back in milliseconds: without TCP_NODELAY on the server's
    connections, each response's second write waited ~40 ms for the client's delayed ACK."""
    async def body():
        async with http_cluster() as (c, base):
            async with httpx2.AsyncClient(base_url=base, timeout=10) as http:
                times = []
                for _ in range(12):
                    started = asyncio.get_running_loop().time()
                    assert (await http.get("/health")).status_code == 200
                    times.append(asyncio.get_running_loop().time() - started)
            assert sorted(times)[6] < 0.02, times

    run(body())

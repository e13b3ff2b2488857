"""Bad input against a running stack: every case gets a clear answer, nothing crashes, nothing else is disturbed.

On conftest's tiny_stack (real processes on loopback), a storm of malformed, out-of-range, oversized and
mistyped requests goes to the public API (the scheduler), the verifier and the proposers, over and over while
one good greedy stream runs. Checked: each case gets the status code it should (the table in
docs/bad_input.md, which this test renders and keeps true: SPECDEC_WRITE_DOCS=1 rewrites it); no service
exits; the good stream's output equals its output without the storm, and the largest gap between its tokens
during the storm is at most twice the largest gap without it (the larger of a run before and one after the
storm, so that the machine's own drift is not counted as the storm's) plus STORM_JITTER_S; afterwards nothing
is held anywhere.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import pytest

from specdec.pb import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    proposer_pb2,
    proposer_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from test_faults import held_state

pytestmark = pytest.mark.timeout(600)

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad_input.md"
VOCAB = 4096  # the tiny target's vocabulary (the embedded tokenizer's)
CONTEXT = 512  # its context
GOOD_PROMPT = [5, 17, 99, 2048, 7]
GOOD_TOKENS = 440
MESSAGE_CHARS = 110  # of a status message shown in the table
STORM_PAUSE_S = 0.01  # between two bad requests: a storm of up to 100 a second


@dataclass(frozen=True)
class Answer:
    code: str  # status code name
    message: str  # the status message, or what the call gave back when it succeeded


@dataclass(frozen=True)
class Case:
    surface: str  # "public API", "verifier" or "proposer"
    what: str  # the input, in words
    expected: str  # the status code it must get
    call: Callable[["Clients"], Awaitable[Answer]]


class Clients:
    """Channels to every service of the stack, and the raw (bytes in, bytes out) calls the encoding cases use."""

    def __init__(self, stack) -> None:
        self.scheduler_channel = grpc.aio.insecure_channel(stack.spec("scheduler").address)
        self.verifier_channel = grpc.aio.insecure_channel(stack.spec("verifier").address)
        self.proposer_channels = {kind: grpc.aio.insecure_channel(stack.spec(f"proposer-{kind}").address)
                                  for kind in ("ngram", "draft", "medusa")}
        self.generation = generation_pb2_grpc.GenerationStub(self.scheduler_channel)
        self.verifier = verifier_pb2_grpc.VerifierStub(self.verifier_channel)
        self.proposers = {kind: proposer_pb2_grpc.ProposerStub(ch) for kind, ch in self.proposer_channels.items()}

    def raw(self, channel, method: str, kind: str = "unary_unary"):
        return getattr(channel, kind)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)

    async def close(self) -> None:
        for channel in (self.scheduler_channel, self.verifier_channel, *self.proposer_channels.values()):
            await channel.close()


async def answer_of(call: Awaitable, describe: Callable[[object], str] = lambda r: "answered") -> Answer:
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        return Answer(exc.code().name, exc.details() or "")
    return Answer("OK", describe(response))


# -- the public API -----------------------------------------------------------------------------------------


def generate(**fields) -> Callable[[Clients], Awaitable[Answer]]:
    def call(c: Clients) -> Awaitable[Answer]:
        fields.setdefault("max_tokens", 4)
        request = generation_pb2.GenerateRequest(**fields)
        return answer_of(c.generation.GenerateUnary(request, timeout=10),
                         lambda r: f"{len(r.token_ids)} tokens, {generation_pb2.FinishReason.Name(r.finish_reason)}")
    return call


def generate_stream(**fields) -> Callable[[Clients], Awaitable[Answer]]:
    async def call(c: Clients) -> Answer:
        fields.setdefault("max_tokens", 4)
        try:
            chunks = [m async for m in c.generation.Generate(generation_pb2.GenerateRequest(**fields), timeout=10)]
        except grpc.aio.AioRpcError as exc:
            return Answer(exc.code().name, exc.details() or "")
        return Answer("OK", f"{sum(len(m.token_ids) for m in chunks)} tokens streamed")
    return call


def generate_with(metadata=(), timeout: float = 10, **fields) -> Callable[[Clients], Awaitable[Answer]]:
    def call(c: Clients) -> Awaitable[Answer]:
        request = generation_pb2.GenerateRequest(prompt_token_ids=GOOD_PROMPT, max_tokens=4, **fields)
        return answer_of(c.generation.GenerateUnary(request, timeout=timeout, metadata=metadata),
                         lambda r: f"{len(r.token_ids)} tokens")
    return call


def generate_raw(data: bytes) -> Callable[[Clients], Awaitable[Answer]]:
    def call(c: Clients) -> Awaitable[Answer]:
        return answer_of(c.raw(c.scheduler_channel, "/specdec.v1.Generation/GenerateUnary")(data, timeout=10))
    return call


def call_method(method: str) -> Callable[[Clients], Awaitable[Answer]]:
    def call(c: Clients) -> Awaitable[Answer]:
        return answer_of(c.raw(c.scheduler_channel, method)(b"", timeout=10))
    return call


# -- the verifier -------------------------------------------------------------------------------------------


def prefill(*items: verifier_pb2.PrefillItem, release: bool = True) -> Callable[[Clients], Awaitable[Answer]]:
    async def call(c: Clients) -> Answer:
        answer = await answer_of(c.verifier.Prefill(verifier_pb2.PrefillRequest(items=items), timeout=10),
                                 lambda r: f"{len(r.results)} admitted")
        if release:  # a case that was (wrongly) admitted must not hold a slot
            await c.verifier.Release(verifier_pb2.ReleaseRequest(request_ids=[i.request_id for i in items]),
                                     timeout=10)
        return answer
    return call


def item(request_id: str = "probe-x", tokens=(1, 2, 3), **sampling) -> verifier_pb2.PrefillItem:
    return verifier_pb2.PrefillItem(request_id=request_id, token_ids=list(tokens),
                                    sampling=common_pb2.SamplingParams(**sampling))


def verify(*items: verifier_pb2.VerifyItem) -> Callable[[Clients], Awaitable[Answer]]:
    """A Verify call next to a request admitted for it ("probe"), which is released afterwards."""
    async def call(c: Clients) -> Answer:
        await c.verifier.Prefill(verifier_pb2.PrefillRequest(items=[item("probe")]), timeout=10)
        try:
            return await answer_of(c.verifier.Verify(verifier_pb2.VerifyRequest(items=items), timeout=10),
                                   lambda r: f"{len(r.results)} verified")
        finally:
            await c.verifier.Release(verifier_pb2.ReleaseRequest(request_ids=["probe"]), timeout=10)
    return call


def prefill_twice() -> Callable[[Clients], Awaitable[Answer]]:
    """A Prefill of a request the verifier already holds (admitted just before, released after)."""
    async def call(c: Clients) -> Answer:
        await c.verifier.Prefill(verifier_pb2.PrefillRequest(items=[item("twice")]), timeout=10)
        try:
            return await prefill(item("twice"), release=False)(c)
        finally:
            await c.verifier.Release(verifier_pb2.ReleaseRequest(request_ids=["twice"]), timeout=10)
    return call


def candidates(tokens, parents, distributions=(), request_id: str = "probe") -> verifier_pb2.VerifyItem:
    return verifier_pb2.VerifyItem(request_id=request_id, candidates=common_pb2.Candidates(
        token_ids=list(tokens), parent_indices=list(parents),
        draft_distributions=[common_pb2.Distribution(probs=list(d)) for d in distributions]))


def verifier_raw(method: str, data: bytes) -> Callable[[Clients], Awaitable[Answer]]:
    def call(c: Clients) -> Awaitable[Answer]:
        return answer_of(c.raw(c.verifier_channel, f"/specdec.v1.Verifier/{method}")(data, timeout=10))
    return call


def release(*ids: str) -> Callable[[Clients], Awaitable[Answer]]:
    def call(c: Clients) -> Awaitable[Answer]:
        return answer_of(c.verifier.Release(verifier_pb2.ReleaseRequest(request_ids=ids), timeout=10),
                         lambda r: f"released {r.released}")
    return call


# -- the proposers ------------------------------------------------------------------------------------------


def propose(kind: str, *items: proposer_pb2.ProposeItem) -> Callable[[Clients], Awaitable[Answer]]:
    """One step on a new Propose stream; then a good step on the same stream, which must still be answered."""
    async def call(c: Clients) -> Answer:
        stream = c.proposers[kind].Propose(timeout=10)
        try:
            await stream.write(proposer_pb2.ProposeRequest(step_id=1, items=items))
            first = await stream.read()
            await stream.write(proposer_pb2.ProposeRequest(step_id=2, items=[
                proposer_pb2.ProposeItem(request_id="after", new_token_ids=[1, 2, 1, 2], reset=True, budget=2)]))
            second = await stream.read()
            await stream.done_writing()
        except grpc.aio.AioRpcError as exc:
            return Answer(exc.code().name, exc.details() or "")
        if first is grpc.aio.EOF or second is grpc.aio.EOF or second.step_id != 2:
            return Answer("EOF", "the stream ended")
        sizes = [len(cand.token_ids) for cand in first.candidates]
        return Answer("OK", f"candidate sets of {sizes} nodes; the next step was answered")
    return call


def pitem(request_id: str = "p", tokens=(1, 2, 3, 1, 2), budget: int = 3, hidden: bytes = b"",
          reset: bool = True) -> proposer_pb2.ProposeItem:
    return proposer_pb2.ProposeItem(request_id=request_id, new_token_ids=list(tokens), reset=reset, budget=budget,
                                    hidden_state=hidden)


def propose_raw(kind: str, data: bytes) -> Callable[[Clients], Awaitable[Answer]]:
    async def call(c: Clients) -> Answer:
        stream = c.raw(c.proposer_channels[kind], "/specdec.v1.Proposer/Propose", "stream_stream")(timeout=10)
        try:
            await stream.write(data)
            await stream.done_writing()
            await stream.read()
            await stream.code()
        except grpc.aio.AioRpcError as exc:
            return Answer(exc.code().name, exc.details() or "")
        code = await stream.code()
        return Answer(code.name, await stream.details() or "")
    return call


MEDUSA_HIDDEN = 64  # the tiny target's hidden size (specdec.testing.TINY_DIMS)
LONG = "x" * 10_000
INVALID = "INVALID_ARGUMENT"

CASES = [
    # The public API (specdec.v1.Generation), through GenerateUnary unless said.
    Case("public API", "no prompt", INVALID, generate()),
    Case("public API", "prompt text and prompt_token_ids both", INVALID,
         generate(prompt="hi", prompt_token_ids=[1])),
    Case("public API", "max_tokens 0", INVALID, generate(prompt="hi", max_tokens=0)),
    Case("public API", "max_tokens -5", INVALID, generate(prompt="hi", max_tokens=-5)),
    Case("public API", "max_tokens above the server's limit", INVALID, generate(prompt="hi", max_tokens=100_000)),
    Case("public API", "temperature -1", INVALID, generate(prompt="hi", temperature=-1.0)),
    Case("public API", "temperature NaN", INVALID, generate(prompt="hi", temperature=math.nan)),
    Case("public API", "temperature +inf", INVALID, generate(prompt="hi", temperature=math.inf)),
    Case("public API", "top_p 0", INVALID, generate(prompt="hi", temperature=1.0, top_p=0.0)),
    Case("public API", "top_p 1.5", INVALID, generate(prompt="hi", temperature=1.0, top_p=1.5)),
    Case("public API", "top_p NaN", INVALID, generate(prompt="hi", temperature=1.0, top_p=math.nan)),
    Case("public API", "top_k -3", INVALID, generate(prompt="hi", top_k=-3)),
    Case("public API", "unknown proposer", INVALID, generate(prompt="hi", proposer="bogus")),
    Case("public API", "proposer name of 10,000 characters (quoted back cut short)", INVALID,
         generate(prompt="hi", proposer=LONG)),
    Case("public API", "an empty stop string", INVALID, generate(prompt="hi", stop=[""])),
    Case("public API", "17 stop strings", INVALID, generate(prompt="hi", stop=[f"s{i}" for i in range(17)])),
    Case("public API", "a stop string of 2,000 characters", INVALID, generate(prompt="hi", stop=["y" * 2000])),
    Case("public API", "token id = vocabulary size", INVALID, generate(prompt_token_ids=[1, VOCAB])),
    Case("public API", "token id -1", INVALID, generate(prompt_token_ids=[1, -1])),
    Case("public API", "600 prompt tokens (context 512)", INVALID, generate(prompt_token_ids=[1] * 600)),
    Case("public API", "prompt + max_tokens beyond the context", INVALID,
         generate(prompt_token_ids=[1] * 500, max_tokens=100)),
    Case("public API", "200 kB prompt text (refused before tokenising)", INVALID,
         generate(prompt="word " * 40_000)),
    Case("public API", "3.5 MB request (above the 1 MiB request limit: refused unread)", "RESOURCE_EXHAUSTED",
         generate(prompt="word " * 700_000)),
    Case("public API", "5 MB request", "RESOURCE_EXHAUSTED", generate(prompt="z" * 5_000_000)),
    Case("public API", "prompt bytes that are not UTF-8", INVALID, generate_raw(b"\x0a\x02\xff\xfe\x18\x04")),
    Case("public API", "bytes that are not a protobuf message", INVALID, generate_raw(b"\xff\xff\xff\xff")),
    Case("public API", "streaming Generate with max_tokens 0", INVALID,
         generate_stream(prompt="hi", max_tokens=0)),
    Case("public API", "streaming Generate with an unknown proposer", INVALID,
         generate_stream(prompt="hi", proposer="bogus")),
    Case("public API", "temperature 1e-40 (valid: as cold as greedy)", "OK",
         generate_with(temperature=1e-40, seed=3)),
    Case("public API", "temperature 3e38 (valid: near uniform)", "OK", generate_with(temperature=3e38, seed=3)),
    Case("public API", "seed 2^64 - 1", "OK", generate_with(temperature=1.0, seed=2**64 - 1)),
    Case("public API", "a malformed traceparent header (ignored)", "OK",
         generate_with(metadata=(("traceparent", "00-zz-yy-01"),))),
    Case("public API", "an authorization header on a server without keys (ignored)", "OK",
         generate_with(metadata=(("authorization", "Bearer whatever"),))),
    Case("public API", "a metadata value of 20 KB", "RESOURCE_EXHAUSTED",
         generate_with(metadata=(("x-padding", "p" * 20_000),))),
    Case("public API", "a deadline of 1 ms", "DEADLINE_EXCEEDED", generate_with(timeout=0.001)),
    Case("public API", "an unknown method", "UNIMPLEMENTED", call_method("/specdec.v1.Generation/Nope")),
    Case("public API", "an unknown service", "UNIMPLEMENTED", call_method("/specdec.v9.Nothing/Generate")),
    # The verifier (specdec.v1.Verifier), called directly.
    Case("verifier", "Prefill with an empty request id", INVALID, prefill(item(""))),
    Case("verifier", "Prefill naming one request twice", INVALID, prefill(item("dup"), item("dup"))),
    Case("verifier", "Prefill with no tokens", INVALID, prefill(item(tokens=()))),
    Case("verifier", "Prefill with token id = vocabulary size", INVALID, prefill(item(tokens=(1, VOCAB)))),
    Case("verifier", "Prefill of 600 tokens (context 512)", INVALID, prefill(item(tokens=[1] * 600))),
    Case("verifier", "Prefill with temperature NaN", INVALID, prefill(item(temperature=math.nan))),
    Case("verifier", "Prefill with top_p 0", INVALID, prefill(item(temperature=1.0, top_p=0.0))),
    Case("verifier", "Prefill with top_k -1", INVALID, prefill(item(top_k=-1))),
    Case("verifier", "Prefill with a request id of 100,000 characters (message cut)", INVALID,
         prefill(item("i" * 100_000, tokens=()))),
    Case("verifier", "Prefill of an already admitted request", INVALID, prefill_twice()),
    Case("verifier", "Prefill of more requests than free slots", "RESOURCE_EXHAUSTED",
         prefill(*(item(f"many-{i}") for i in range(40)))),
    Case("verifier", "Verify of an unknown request", "NOT_FOUND",
         verify(candidates([], [], request_id="ghost"))),
    Case("verifier", "Verify with a parent index pointing forward", INVALID, verify(candidates([1, 2], [-1, 5]))),
    Case("verifier", "Verify with 1 parent index for 2 tokens", INVALID, verify(candidates([1, 2], [-1]))),
    Case("verifier", "Verify with a candidate = vocabulary size", INVALID, verify(candidates([1, VOCAB], [-1, 0]))),
    Case("verifier", "Verify with a candidate -4", INVALID, verify(candidates([-4], [-1]))),
    Case("verifier", "Verify of a tree carrying draft distributions", INVALID,
         verify(candidates([1, 2], [-1, -1], [[1.0] * VOCAB] * 2))),
    Case("verifier", "Verify with negative draft probabilities", INVALID,
         verify(candidates([1], [-1], [[-1.0] * VOCAB]))),
    Case("verifier", "Verify with a draft distribution longer than the vocabulary", INVALID,
         verify(candidates([1], [-1], [[1.0] * (VOCAB + 5)]))),
    Case("verifier", "Verify with candidates beyond the context", INVALID,
         verify(candidates([1] * CONTEXT, list(range(-1, CONTEXT - 1))))),
    Case("verifier", "Verify naming one request twice", INVALID, verify(candidates([], []), candidates([], []))),
    Case("verifier", "Verify of candidates labelled for another request", INVALID,
         verify(verifier_pb2.VerifyItem(request_id="probe", candidates=common_pb2.Candidates(
             request_id="someone-else", token_ids=[1], parent_indices=[-1])))),
    Case("verifier", "Verify of 40 requests (batch limit 32)", INVALID,
         verify(*(candidates([], [], request_id=f"v{i}") for i in range(40)))),
    Case("verifier", "Release of unknown ids (ignored)", "OK", release("never-seen", "")),
    Case("verifier", "Prefill bytes that are not a protobuf message", INVALID, verifier_raw("Prefill", b"\xff\xff")),
    Case("verifier", "Verify bytes that are not a protobuf message", INVALID, verifier_raw("Verify", b"\x0a\xff")),
    # The proposers (specdec.v1.Proposer): a bad item costs that item its candidates, never the stream.
    Case("proposer", "ngram: a token id = vocabulary size", "OK", propose("ngram", pitem(tokens=(1, VOCAB)))),
    Case("proposer", "ngram: a negative budget", "OK", propose("ngram", pitem(budget=-2), pitem("q"))),
    Case("proposer", "ngram: one request twice in a step", "OK", propose("ngram", pitem("d"), pitem("d"))),
    Case("proposer", "ngram: a budget of 10^9 (capped)", "OK", propose("ngram", pitem(budget=10**9))),
    Case("proposer", "ngram: an empty request id", "OK", propose("ngram", pitem(""))),
    Case("proposer", "draft: a token id -7", "OK", propose("draft", pitem(tokens=(1, -7)))),
    Case("proposer", "draft: 2,000 tokens at once (its context is 1,024)", "OK",
         propose("draft", pitem(tokens=[3] * 2000))),
    Case("proposer", "draft: new tokens for a request it never saw, without reset", "OK",
         propose("draft", pitem("fresh", reset=False))),
    Case("proposer", "medusa: a hidden state of the wrong size", "OK",
         propose("medusa", pitem(hidden=b"\x00" * 12))),
    Case("proposer", "medusa: no hidden state", "OK", propose("medusa", pitem())),
    Case("proposer", "medusa: a NaN hidden state", "OK",
         propose("medusa", pitem(hidden=b"\x00\x00\xc0\x7f" * MEDUSA_HIDDEN))),
    Case("proposer", "ngram: bytes that are not a protobuf message", INVALID, propose_raw("ngram", b"\xff\xff")),
    Case("proposer", "draft: bytes that are not a protobuf message", INVALID, propose_raw("draft", b"\x0a\xff")),
]


def render(answers: list[Answer]) -> str:
    def cell(text: str) -> str:
        text = text.replace("|", "\\|").replace("\n", " ")
        # How many slots are free depends on whether the good stream still runs when the case is sent.
        text = re.sub(r"but only \d+ of (\d+) KV-cache slots", r"but only N of \1 KV-cache slots", text)
        return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "…"

    lines = [
        "# Bad input: what each case gets",
        "",
        "Every row was sent to a running stack (tiny test models, all services as processes on loopback) while a",
        "good greedy stream ran; none disturbed it or any service. Regenerate with",
        "`SPECDEC_WRITE_DOCS=1 .venv/bin/python -m pytest tests/e2e/test_bad_input.py`; the test fails when this",
        "table no longer matches what the services answer. Proposers answer a bad item with no candidates",
        "for it (speculation is lost, never output) and go on with the stream: their rows say what came back.",
        "",
        f"{len(answers)} cases.",
        "",
        "| # | service | input | code | message |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, (case, answer) in enumerate(zip(CASES, answers), 1):
        lines.append(f"| {i} | {case.surface} | {cell(case.what)} | {answer.code} | {cell(answer.message)} |")
    return "\n".join(lines) + "\n"


# The good stream runs in a process of its own, as an independent client would: the storm's client spends
# milliseconds building and parsing megabyte messages, and in one process that would delay reading the
# stream's tokens and be counted as the services' gap.
GOOD_STREAM = f"""
import json, sys, time
import grpc
from specdec.pb import generation_pb2, generation_pb2_grpc
request = generation_pb2.GenerateRequest(prompt_token_ids={GOOD_PROMPT}, max_tokens={GOOD_TOKENS}, proposer="none",
                                         ignore_eos=True)
tokens, arrivals = [], []
with grpc.insecure_channel(sys.argv[1]) as channel:
    for message in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120):
        if message.token_ids:
            if not tokens:
                print("streaming", flush=True)
            tokens.extend(message.token_ids)
            arrivals.append(time.monotonic())
print(json.dumps({{"tokens": tokens, "arrivals": arrivals}}), flush=True)
"""


class GoodStream:
    """The good greedy stream in its own process: started() once its first tokens came, then result()."""

    def __init__(self, address: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", GOOD_STREAM, address], stdout=subprocess.PIPE,
                                        text=True)

    async def started(self) -> None:
        line = await asyncio.to_thread(self.process.stdout.readline)
        assert line.strip() == "streaming", line

    def done(self) -> bool:
        return self.process.poll() is not None

    async def result(self) -> tuple[list[int], list[float]]:
        out, _ = await asyncio.to_thread(self.process.communicate, timeout=120)
        assert self.process.returncode == 0, out
        data = json.loads(out.strip().splitlines()[-1])
        return data["tokens"], data["arrivals"]


async def good_stream(address: str) -> tuple[list[int], list[float]]:
    stream = GoodStream(address)
    await stream.started()
    return await stream.result()


async def paced(call: Awaitable[Answer]) -> Answer:
    """One bad request, then a pause of STORM_PAUSE_S: on two cores a client sending without pause takes a
    core from the services by itself, which would slow the good stream whatever the services did."""
    answer = await call
    await asyncio.sleep(STORM_PAUSE_S)
    return answer


# With the storm's client, the good stream's process and four services on two cores, the operating system
# alone delays a process by a time slice now and then: such blips (9.8 ms against a quiet 4.9 ms) failed a
# bare 2x bound in two of five full runs, the test running first on a just-started stack. A service held up
# by a bad input (a megabyte parsed on the event loop, an exception's retry) stalls the stream for longer.
STORM_JITTER_S = 0.02


def largest_gap(arrivals: list[float]) -> float:
    return max(b - a for a, b in zip(arrivals, arrivals[1:]))


def test_bad_input_gets_clear_errors_and_disturbs_nothing(tiny_stack):
    stack = tiny_stack
    pids = {name: p.pid for name, p in stack.processes.items()}

    async def body() -> tuple[list[Answer], list[int], list[int], float, float, int]:
        address = stack.spec("scheduler").address
        alone, quiet = await good_stream(address)
        quiet_gap = largest_gap(quiet)
        clients = Clients(stack)
        try:
            stream = GoodStream(address)
            await stream.started()
            answers = [await paced(case.call(clients)) for case in CASES]
            rounds = 1
            while not stream.done():  # the storm lasts as long as the stream
                for case in CASES:
                    await paced(case.call(clients))
                rounds += 1
            with_storm, stormy = await stream.result()
        finally:
            await clients.close()
        # The quiet gap measured before and after the storm: the machine's own drift is not the storm's.
        again, quiet = await good_stream(address)
        assert again == alone
        return answers, alone, with_storm, max(quiet_gap, largest_gap(quiet)), largest_gap(stormy), rounds

    answers, alone, with_storm, quiet_gap, storm_gap, rounds = asyncio.run(body())
    assert len(CASES) >= 50
    for case, answer in zip(CASES, answers):
        assert answer.code == case.expected, (case.what, answer)
        assert len(answer.message) <= 1024, (case.what, len(answer.message))
    for case, answer in zip(CASES, answers):
        if case.surface == "proposer" and case.expected == "OK":
            assert "the next step was answered" in answer.message, (case.what, answer)
    assert stack.exited() == {} and {n: p.pid for n, p in stack.processes.items()} == pids, "a service crashed"
    deadline = time.monotonic() + 10
    while any(held_state(stack).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(held_state(stack).values()), held_state(stack)
    assert with_storm == alone and len(alone) == GOOD_TOKENS
    assert storm_gap <= 2 * quiet_gap + STORM_JITTER_S, (storm_gap, quiet_gap, rounds)
    rendered = render(answers)
    if os.environ.get("SPECDEC_WRITE_DOCS"):
        DOC.write_text(rendered)
    assert DOC.read_text() == rendered, "docs/bad_input.md is stale: regenerate it (see its header)"

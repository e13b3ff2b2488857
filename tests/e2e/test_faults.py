"""Fault injection: every service of a running stack killed with SIGKILL and restarted, under load.

One stack of real processes on loopback (conftest's tiny_stack: tiny target with the real tokenizer, draft,
Medusa heads; the prompt-lookup, draft and tree proposers; the scheduler) restarted by the launcher's own supervisor
(Stack.supervise, what `specdec up` runs). For each service in turn, 24 concurrent streaming greedy requests
(six pinned to each proposer, six left to the server) run while it is killed and restarted. Checked:

- every request the scheduler accepted completes with output identical to the target alone (transformers'
  forward); when the scheduler itself is killed, the streams end with UNAVAILABLE and the same requests
  succeed when the client retries them against the restarted scheduler;
- each request still running when the restarted service reports SERVING gets its next token within
  STALL_LIMIT_S of that moment (the service's own start-up is not counted);
- while the verifier is down the scheduler reports NOT_SERVING and refuses a new request at once with
  UNAVAILABLE;
- afterwards no slot or per-request state is held anywhere (verifier and proposers' Info).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM

from specdec.ops.launcher import Stack
from specdec.pb import proposer_pb2, proposer_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from specdec_client import AsyncClient, Unavailable
from test_e2e import target_alone

pytestmark = pytest.mark.timeout(600)

PROPOSERS = ("ngram", "draft", "medusa")
REQUESTS = 24
MAX_TOKENS = 440  # with prompts of at most 40 tokens, within the tiny target's context of 512
STALL_LIMIT_S = 1.0


@pytest.fixture(scope="module")
def stack(tiny_stack):
    return tiny_stack


@pytest.fixture(scope="module")
def workload(tiny_models) -> list[tuple[list[int], str, list[int]]]:
    """(prompt, proposer, the target alone's greedy output) for each request."""
    rng = random.Random(7)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[0], dtype=torch.float32).eval()
    requests = []
    for i in range(REQUESTS):
        if i % 2:  # repetitive prompts give prompt lookup something to find
            unit = [rng.randrange(1, 4096) for _ in range(rng.randint(2, 6))]
            prompt = (unit * 20)[: rng.randint(8, 40)]
        else:
            prompt = [rng.randrange(1, 4096) for _ in range(rng.randint(3, 40))]
        proposer = (*PROPOSERS, "")[i % 4]
        requests.append((prompt, proposer, target_alone(model, prompt, MAX_TOKENS)))
    return requests


@dataclass
class Run:
    """One streamed request: when each chunk arrived, its tokens, and how it ended."""

    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each chunk with tokens
    error: Exception | None = None
    finished_at: float | None = None


async def stream_one(client: AsyncClient, prompt: list[int], proposer: str, run: Run) -> None:
    try:
        async for chunk in client.stream(prompt, max_tokens=MAX_TOKENS, proposer=proposer, timeout=180):
            if chunk.token_ids:
                run.tokens.extend(chunk.token_ids)
                run.arrivals.append(time.monotonic())
    except Exception as exc:  # the scheduler-kill case ends streams with UNAVAILABLE; checked by the test
        run.error = exc
    run.finished_at = time.monotonic()


def health_status(address: str, timeout_s: float = 0.5) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


async def until(condition, timeout_s: float, what: str, poll_s: float = 0.02) -> float:
    """Poll `condition` (blocking calls run in a thread) until true; returns the monotonic time it was."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if await asyncio.to_thread(condition):
            return time.monotonic()
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def kill(stack: Stack, name: str) -> None:
    process = stack.processes[name]
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def held_state(stack: Stack) -> dict[str, list[str]]:
    """Request ids each service still holds (verifier slots, proposers' per-request state)."""
    held = {}
    with grpc.insecure_channel(stack.spec("verifier").address) as channel:
        info = verifier_pb2_grpc.VerifierStub(channel).Info(verifier_pb2.VerifierInfoRequest(), timeout=5)
        held["verifier"] = list(info.active_request_ids)
    for kind in PROPOSERS:
        with grpc.insecure_channel(stack.spec(f"proposer-{kind}").address) as channel:
            info = proposer_pb2_grpc.ProposerStub(channel).Info(proposer_pb2.ProposerInfoRequest(), timeout=5)
            held[kind] = list(info.active_request_ids)
    return held


async def kill_and_restart_under_load(stack: Stack, workload, victim: str) -> tuple[list[Run], float]:
    """Start every request, kill `victim` once each has its first tokens, restart it with the supervisor;
    returns the runs (all ended) and the time the restarted service reported SERVING."""
    address = stack.spec(victim).address
    scheduler = stack.spec("scheduler").address
    async with AsyncClient(scheduler, retries=0) as client:
        runs = [Run() for _ in workload]
        tasks = [asyncio.create_task(stream_one(client, prompt, proposer, run))
                 for (prompt, proposer, _), run in zip(workload, runs)]
        await until(lambda: all(run.tokens or run.finished_at for run in runs), 60, "every request's first tokens")
        kill(stack, victim)
        if victim == "verifier":
            # Readiness follows the verifier: NOT_SERVING, and a new request is refused at once.
            await until(lambda: health_status(scheduler) == "NOT_SERVING", 5, "the scheduler's NOT_SERVING")
            began = time.monotonic()
            with pytest.raises(Unavailable, match="unreachable"):
                await client.generate([1, 2, 3], max_tokens=4, timeout=5)
            assert time.monotonic() - began < 1.0
        assert stack.supervise() == [victim]
        serving_at = await until(lambda: health_status(address) == "SERVING", 120, f"{victim} SERVING again")
        if victim.startswith("proposer-"):
            # Speculation resumes: the scheduler sends the restarted proposer its requests again (from scratch).
            kind = victim.removeprefix("proposer-")
            await until(lambda: held_state(stack)[kind] or all(run.finished_at for run in runs), 3,
                        f"the scheduler to use the restarted {kind} proposer again", poll_s=0.05)
        await asyncio.wait_for(asyncio.gather(*tasks), 180)
    return runs, serving_at


def check_stalls(runs: list[Run], serving_at: float) -> None:
    for i, run in enumerate(runs):
        if run.error is None and run.arrivals and run.arrivals[-1] > serving_at:
            next_token_at = min(t for t in run.arrivals if t > serving_at)
            assert next_token_at - serving_at <= STALL_LIMIT_S, (
                f"request {i} waited {next_token_at - serving_at:.2f} s after the service was SERVING")


async def settle(stack: Stack) -> None:
    await until(lambda: not any(held_state(stack).values()), 10, "every service to hold no request",
                poll_s=0.1)


@pytest.mark.parametrize("victim", ["proposer-ngram", "proposer-draft", "proposer-medusa", "verifier"])
def test_a_killed_service_loses_no_request_and_no_token(stack, workload, victim):
    async def body():
        runs, serving_at = await kill_and_restart_under_load(stack, workload, victim)
        for i, ((prompt, proposer, want), run) in enumerate(zip(workload, runs)):
            assert run.error is None, f"request {i} ({proposer or 'auto'}) failed: {run.error}"
            assert run.tokens == want, f"request {i} ({proposer or 'auto'}) differs from the target alone"
        check_stalls(runs, serving_at)
        await settle(stack)

    asyncio.run(body())


def test_a_killed_scheduler_fails_its_streams_with_unavailable_and_a_retry_succeeds(stack, workload):
    async def body():
        runs, _ = await kill_and_restart_under_load(stack, workload, "scheduler")
        cut = [i for i, run in enumerate(runs) if run.error is not None]
        assert cut, "the kill came after every request had finished"
        for i in cut:
            assert isinstance(runs[i].error, Unavailable), runs[i].error
            prompt, proposer, want = workload[i]
            assert runs[i].tokens == want[: len(runs[i].tokens)]  # what it streamed before the kill was right
        for i, run in enumerate(runs):
            if run.error is None:
                assert run.tokens == workload[i][2]
        # The client retries the cut requests against the restarted scheduler, which releases what the
        # killed one left in the verifier and the proposers.
        async with AsyncClient(stack.spec("scheduler").address, retries=20, backoff_s=0.1,
                               backoff_max_s=0.5) as client:
            results = await asyncio.gather(*(client.generate(workload[i][0], max_tokens=MAX_TOKENS,
                                                             proposer=workload[i][1], timeout=120) for i in cut))
        for i, result in zip(cut, results):
            assert result.token_ids == workload[i][2], f"request {i} retried"
        await settle(stack)

    asyncio.run(body())

"""End to end over real gRPC on loopback, every service in its own process.

The stack runs on a tiny random target that uses the real tokenizer, and a draft made from the target's
weights plus noise (so that it is often, not always, right). Checked here:

- greedy output is identical, token for token, to the target model alone (transformers' forward, no
  runner involved), for the ngram and draft proposers at fixed k in {1, 3, 5} and under the goodput
  policy (each proposer, and the policy's own choice), with 10 concurrent requests of different lengths
  arriving at different times;
- sampled output has the target's distribution: 600 seeded requests of 3 tokens with top-k 3 (27
  possible completions, enumerated exactly from the target) pass Pearson's chi-square test at
  significance 0.001 (cells with expected count below 5 pooled);
- bad input gets INVALID_ARGUMENT and a request running meanwhile is untouched; malformed candidates
  sent to the verifier directly get INVALID_ARGUMENT;
- a cancelled stream frees its slot in the verifier and its state in every proposer (through Info).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from specdec.ops.launcher import Stack, free_ports, local_specs
from specdec.pb import common_pb2, proposer_pb2, proposer_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from specdec.testing import chi_square_passes, exact_topk_distribution, make_tiny_stack_checkpoints
from specdec_client import AsyncClient, Client, InvalidArgument

PROPOSERS = ("ngram", "draft")
SERVICE_ENV = {"SPECDEC_TORCH_THREADS": "1"}
EOS = 0  # <|endoftext|> of the embedded tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_stack_checkpoints(tmp_path_factory.mktemp("models"), eos_token_id=EOS)


@pytest.fixture(scope="module")
def backends(checkpoints):
    """Verifier and both proposers, shared by the schedulers the tests start."""
    target, draft = checkpoints
    specs = local_specs(free_ports(1)[0], PROPOSERS, model=target, draft_model=draft, env=SERVICE_ENV)
    with Stack(specs[:-1], startup_timeout_s=180, grace_s=5) as stack:
        yield stack, specs[-1]


def start_scheduler(backends, policy: str = "fixed", k: int = 3) -> Stack:
    stack, scheduler = backends
    args = list(scheduler.args)
    args[args.index("--policy") + 1] = policy
    args[args.index("--k") + 1] = str(k)
    spec = dataclasses.replace(scheduler, args=args, depends_on=[])
    return Stack([spec], startup_timeout_s=120, grace_s=5).start()


@pytest.fixture(scope="module")
def reference_model(checkpoints):
    return AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float32).eval()


@torch.inference_mode()
def target_alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding with transformers' own forward and cache; stops at EOS (not included)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        token = int(out.logits[0, -1].argmax())
        if token == EOS:
            break
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def workload(seed: int, count: int = 10) -> list[tuple[list[int], int, float]]:
    """(prompt token ids, max_tokens, arrival delay s): different lengths, staggered arrivals."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        length = rng.randint(3, 60)
        if i % 3 == 0:  # repetitive prompts give prompt lookup something to find
            unit = [rng.randrange(1, 4096) for _ in range(rng.randint(2, 6))]
            prompt = (unit * 30)[:length]
        else:
            prompt = [rng.randrange(1, 4096) for _ in range(length)]
        requests.append((prompt, rng.randint(5, 40), 0.03 * i))
    return requests


async def run_concurrently(port: int, requests, proposer: str, **kwargs):
    async with AsyncClient(f"127.0.0.1:{port}", timeout=120) as client:
        async def one(prompt, max_tokens, delay):
            await asyncio.sleep(delay)
            return await client.generate(prompt, max_tokens=max_tokens, proposer=proposer, **kwargs)

        return await asyncio.gather(*(one(*r) for r in requests))


@pytest.mark.parametrize("policy,k", [("fixed", 1), ("fixed", 3), ("fixed", 5), ("smartspec", 5)])
def test_greedy_output_equals_target_alone(backends, reference_model, policy, k):
    requests = workload(seed=k + (policy == "smartspec"))
    expected = [target_alone(reference_model, prompt, max_tokens) for prompt, max_tokens, _ in requests]
    scheduler = start_scheduler(backends, policy=policy, k=k)
    # Under smartspec the policy also picks the proposer per request and step ("" = its choice).
    proposers = PROPOSERS if policy == "fixed" else (*PROPOSERS, "")
    try:
        for proposer in proposers:
            results = asyncio.run(run_concurrently(scheduler.specs[0].port, requests, proposer))
            for (prompt, _, _), want, got in zip(requests, expected, results):
                assert got.token_ids == want, f"{policy} {proposer} k={k} prompt of {len(prompt)} tokens"
            proposed = sum(r.stats.proposed for r in results)
            accepted = sum(r.stats.accepted for r in results)
            assert 0 <= accepted <= proposed, (proposer, k, proposed, accepted)
            if policy == "fixed":  # fixed k always speculates; smartspec may rightly choose not to
                assert proposed > 0 and accepted > 0, (proposer, k, proposed, accepted)
            for r in results:
                assert r.stats.completion_tokens == len(r.token_ids)
                assert sum(p.proposed for p in r.stats.proposers.values()) == r.stats.proposed
                if proposer:
                    assert set(r.stats.proposers) <= {proposer}
    finally:
        scheduler.stop()


def test_sampled_output_has_the_target_distribution(backends, reference_model):
    prompt = [17, 230, 17, 230, 17]
    temperature, top_k, n_tokens, n_samples = 1.5, 3, 3, 600

    exact = exact_topk_distribution(reference_model, prompt, temperature, top_k, n_tokens)
    assert len(exact) == top_k**n_tokens
    assert EOS not in set(itertools.chain(*exact))  # else completions would be cut short

    scheduler = start_scheduler(backends, k=3)
    try:
        for proposer in PROPOSERS:
            requests = [(prompt, n_tokens, 0.0)] * n_samples
            counts = dict.fromkeys(exact, 0)
            for start in range(0, n_samples, 50):
                results = asyncio.run(run_concurrently(
                    scheduler.specs[0].port, requests[start:start + 50], proposer, temperature=temperature,
                    top_k=top_k, seed=None, ignore_eos=True))
                for r in results:
                    counts[tuple(r.token_ids)] += 1  # a KeyError would mean an impossible completion
            keys = sorted(exact)
            passes, stat, df = chi_square_passes(torch.tensor([counts[k] for k in keys]),
                                                 torch.tensor([exact[k] for k in keys]), min_expected=5)
            assert passes, f"{proposer}: chi-square {stat:.1f} with {df} degrees of freedom"
    finally:
        scheduler.stop()


def test_seeded_sampling_is_the_same_with_and_without_speculation(backends):
    requests = workload(seed=11, count=8)
    scheduler = start_scheduler(backends, k=4)
    try:
        port = scheduler.specs[0].port
        runs = {p: asyncio.run(run_concurrently(port, requests, p, temperature=0.8, top_p=0.9, seed=1234))
                for p in ("none", *PROPOSERS)}
    finally:
        scheduler.stop()
    for proposer in PROPOSERS:
        assert [r.token_ids for r in runs[proposer]] == [r.token_ids for r in runs["none"]], proposer


def test_bad_input_is_rejected_and_disturbs_nothing(backends, reference_model):
    stack, _ = backends
    scheduler = start_scheduler(backends, k=3)
    prompt = [5, 6, 7, 8, 5, 6, 7]
    want = target_alone(reference_model, prompt, 40)
    bad = {  # a phrase the error message must hold -> the bad part of the request
        "prompt is empty": dict(prompt=""),
        "context is 512 tokens": dict(prompt=[5] * 600),
        "max_tokens must be >= 1": dict(max_tokens=0),
        "above this server's limit": dict(max_tokens=100_000),
        "temperature must be": dict(temperature=-0.5),
        "top_p must be in (0, 1], got 1.5": dict(temperature=1.0, top_p=1.5),
        "top_p must be in (0, 1], got 0": dict(temperature=1.0, top_p=0.0),
        "top_k must be >= 0": dict(temperature=1.0, top_k=-1),
        "unknown proposer 'medusa9'": dict(proposer="medusa9"),
        "outside the vocabulary": dict(prompt=[5, 99999]),
    }

    async def scenario(port):
        async with AsyncClient(f"127.0.0.1:{port}", timeout=60) as client:
            good = asyncio.ensure_future(client.generate(prompt, max_tokens=40, proposer="ngram"))
            errors = {}
            for phrase, kwargs in bad.items():
                kwargs = {"prompt": "def f():", "max_tokens": 8, **kwargs}
                try:
                    await client.generate(**kwargs)
                except InvalidArgument as exc:
                    errors[phrase] = exc.message
            return await good, errors

    try:
        result, errors = asyncio.run(scenario(scheduler.specs[0].port))
    finally:
        scheduler.stop()
    assert set(errors) == set(bad), f"accepted bad requests: {set(bad) - set(errors)}"
    for phrase, message in errors.items():
        assert phrase in message, (phrase, message)
    assert result.token_ids == want

    # Malformed candidates straight to the verifier process.
    with grpc.insecure_channel(stack.spec("verifier").address) as channel:
        verifier = verifier_pb2_grpc.VerifierStub(channel)
        verifier.Prefill(verifier_pb2.PrefillRequest(items=[verifier_pb2.PrefillItem(
            request_id="direct", token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams())]), timeout=30)
        for tokens, parents, word in (([5, 6], [-1, 3], "parent"), ([5, 99999], [-1, 0], "vocabulary")):
            with pytest.raises(grpc.RpcError) as info:
                verifier.Verify(verifier_pb2.VerifyRequest(items=[verifier_pb2.VerifyItem(
                    request_id="direct", candidates=common_pb2.Candidates(
                        request_id="direct", token_ids=tokens, parent_indices=parents))]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert word in info.value.details()
        # The request is intact: a plain decode step still works.
        verifier.Verify(verifier_pb2.VerifyRequest(items=[verifier_pb2.VerifyItem(request_id="direct")]), timeout=30)
        verifier.Release(verifier_pb2.ReleaseRequest(request_ids=["direct"]), timeout=30)


def test_cancelled_stream_frees_state_everywhere(backends):
    stack, _ = backends
    scheduler = start_scheduler(backends, k=3)
    try:
        with Client(f"127.0.0.1:{scheduler.specs[0].port}", timeout=60) as client:
            stream = client.stream([5, 6, 7, 8] * 4, max_tokens=400, proposer="draft", ignore_eos=True)
            chunks = iter(stream)
            next(chunks)
            next(chunks)
            # Both proposers hold state while it runs: the draft serves it, and ngram is told nothing
            # unless it serves it, so check the draft's state and the verifier's slot.
            assert_active(stack, expect=True)
            stream.cancel()
        assert wait_until(lambda: not any_active(stack), timeout_s=20), "state left after cancel"
    finally:
        scheduler.stop()


def any_active(stack) -> bool:
    return bool(verifier_active(stack)) or any(proposer_active(stack, kind) for kind in PROPOSERS)


def assert_active(stack, expect: bool) -> None:
    assert wait_until(lambda: bool(verifier_active(stack)) == expect, timeout_s=10)
    assert wait_until(lambda: bool(proposer_active(stack, "draft")) == expect, timeout_s=10)


def verifier_active(stack) -> list[str]:
    with grpc.insecure_channel(stack.spec("verifier").address) as channel:
        info = verifier_pb2_grpc.VerifierStub(channel).Info(verifier_pb2.VerifierInfoRequest(), timeout=10)
        assert info.free_slots == info.max_slots - len(info.active_request_ids)
        return list(info.active_request_ids)


def proposer_active(stack, kind: str) -> list[str]:
    with grpc.insecure_channel(stack.spec(f"proposer-{kind}").address) as channel:
        stub = proposer_pb2_grpc.ProposerStub(channel)
        return list(stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=10).active_request_ids)


def wait_until(predicate, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()

"""The scheduler end to end over gRPC, in front of fake verifier and proposer services (in-process)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from scheduler_svc.config import ProposerAddress
from scheduler_svc.policy.base import FixedPolicy
from specdec.pb import generation_pb2, proposer_pb2_grpc
from test_scheduler_fakes import (
    EOS,
    TOKENIZER,
    TOKENIZER_DIR,
    FakeProposer,
    FakeVerifier,
    cluster,
    generate,
    reference,
    run,
    serve_fake,
    token_before,
)

pytestmark = pytest.mark.timeout(60)

PROMPTS = [[5 + 31 * i, 17 * i + 2, 100 + i] for i in range(8)]


def check_stats(stats, n_tokens: int, prompt_len: int) -> None:
    assert stats.completion_tokens == n_tokens
    assert stats.prompt_tokens == prompt_len
    assert 0 <= stats.accepted <= stats.proposed
    assert sum(p.proposed for p in stats.proposers.values()) == stats.proposed
    assert sum(p.accepted for p in stats.proposers.values()) == stats.accepted
    for p in stats.proposers.values():
        assert 0 <= p.accepted <= p.proposed and p.steps <= stats.steps
    # Every step commits accepted + 1 tokens, the prefill one more; truncation only cuts the last step.
    assert n_tokens <= 1 + stats.steps + stats.accepted
    assert stats.time_to_first_token_ms > 0 and stats.total_ms >= stats.time_to_first_token_ms


def test_greedy_output_equals_the_model_for_staggered_concurrent_requests():
    async def body():
        # 8 requests on 4 slots: some wait. Each step takes a few ms, so that the staggered requests overlap
        # however fast the machine runs the fakes.
        verifier = FakeVerifier(max_slots=4, max_batch_size=8, verify_delay_s=0.003)
        async with cluster(verifier, {"fake": FakeProposer("mixed")}, k=3) as c:
            async def one(i):
                await asyncio.sleep(0.01 * i)
                return await generate(c.stub, prompt_token_ids=PROMPTS[i], max_tokens=20 + 3 * i)

            results = await asyncio.gather(*(one(i) for i in range(8)))
            for i, (tokens, text, reason, stats, messages) in enumerate(results):
                want, want_reason = reference(PROMPTS[i], 20 + 3 * i)
                assert tokens == want, f"request {i}"
                assert reason == want_reason
                assert text == TOKENIZER.decode(want)
                check_stats(stats, len(tokens), len(PROMPTS[i]))
                assert stats.proposers["fake"].steps > 0 and 0 < stats.accepted < stats.proposed
            # Continuous batching: several requests per Verify, never more than the slots, k capped at 3.
            assert max(len(b) for b in c.verifier.verify_batches) > 1
            assert max(len(b) for b in c.verifier.verify_batches) <= 4
            assert max(n for b in c.verifier.verify_batches for n in b.values()) == 3
            # Everything is released everywhere once done.
            await asyncio.sleep(0.1)
            assert c.verifier.seqs == {}
            assert set(c.proposers["fake"].released) == set(c.verifier.prefilled)

    run(body())


def test_a_right_proposer_gets_everything_accepted_and_stays_in_sync():
    async def body():
        async with cluster(proposers={"fake": FakeProposer("good")}, k=4) as c:
            prompt = [7, 8, 9]
            tokens, text, reason, stats, messages = await generate(c.stub, prompt_token_ids=prompt, max_tokens=40)
            want, _ = reference(prompt, 40)
            assert tokens == want
            assert stats.accepted == stats.proposed > 0
            assert stats.steps < 40 // 2  # speculation pays: up to 5 tokens a step
            # The proposer was sent exactly the committed tokens, none twice, none skipped.
            await asyncio.sleep(0.1)
            (history,) = c.proposers["fake"].history_at_release.values()
            assert history == (prompt + want)[: len(history)] and len(history) > len(want) // 2
            # Each verify asked for at most what max_tokens could still use.
            assert all(n <= 4 for b in c.verifier.verify_batches for n in b.values())

    run(body())


def test_policy_none_and_request_level_none_do_not_speculate():
    async def body():
        async with cluster(k=3) as c:
            prompt = [3, 4]
            tokens, _, _, stats, _ = await generate(c.stub, prompt_token_ids=prompt, max_tokens=6, proposer="none")
            assert tokens == reference(prompt, 6)[0]
            assert stats.proposed == 0 and stats.steps == 5 and dict(stats.proposers) == {}
            tokens, _, _, stats, _ = await generate(c.stub, prompt_token_ids=prompt, max_tokens=6, proposer="fake")
            assert tokens == reference(prompt, 6)[0] and stats.proposers["fake"].steps > 0
        async with cluster(policy="none") as c:
            tokens, _, _, stats, _ = await generate(c.stub, prompt_token_ids=prompt, max_tokens=6)
            assert tokens == reference(prompt, 6)[0] and stats.proposed == 0
            assert c.proposers["fake"].requests == []

    run(body())


def test_eos_ends_the_output_unless_ignore_eos():
    async def body():
        async with cluster() as c:
            before_eos = token_before(EOS)
            prompt = [1, token_before(token_before(before_eos))]
            tokens, _, reason, stats, _ = await generate(c.stub, prompt_token_ids=prompt, max_tokens=10)
            assert tokens == [token_before(before_eos), before_eos] and reason == "FINISH_REASON_EOS"
            assert stats.completion_tokens == 2
            tokens, _, reason, _, _ = await generate(c.stub, prompt_token_ids=prompt, max_tokens=10, ignore_eos=True)
            assert tokens == reference(prompt, 10, eos=None)[0] and EOS in tokens
            assert reason == "FINISH_REASON_LENGTH"
            # EOS as the very first token (from the prefill).
            tokens, text, reason, _, _ = await generate(c.stub, prompt_token_ids=[before_eos], max_tokens=10)
            assert (tokens, text, reason) == ([], "", "FINISH_REASON_EOS")

    run(body())


def test_max_tokens_one_and_exact_lengths():
    async def body():
        async with cluster(proposers={"fake": FakeProposer("good")}, k=5) as c:
            for n, steps in ((1, 0), (2, 1), (7, 1), (8, 2)):
                tokens, _, reason, stats, _ = await generate(c.stub, prompt_token_ids=[42], max_tokens=n)
                assert tokens == reference([42], n)[0] and reason == "FINISH_REASON_LENGTH"
                assert stats.completion_tokens == n and stats.steps == steps
                # k is capped so that no verified token is thrown away by max_tokens.
                assert stats.proposed == stats.accepted == n - 1 - steps

    run(body())


def test_stop_strings_cut_the_text_and_end_the_request():
    async def body():
        prompt = [50, 60]
        want, _ = reference(prompt, 30)
        full_text = TOKENIZER.decode(want)
        # A stop string made of the end of token 9's text and the start of token 10's: it spans tokens.
        cut = len(TOKENIZER.decode(want[:10]))
        stop = full_text[cut - 2 : cut + 2]
        first = full_text.find(stop)
        async with cluster(k=3) as c:
            tokens, text, reason, stats, _ = await generate(
                c.stub, prompt_token_ids=prompt, max_tokens=30, stop=["never-there", stop])
            assert reason == "FINISH_REASON_STOP"
            assert text == full_text[:first]
            # Tokens go up to the one that completed the stop string.
            done = next(i for i in range(len(want) + 1) if stop in TOKENIZER.decode(want[:i]))
            assert tokens == want[:done] and stats.completion_tokens == done
            # The unary call says the same.
            result = await c.stub.GenerateUnary(generation_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=30, stop=[stop]), timeout=10)
            assert result.text == text and list(result.token_ids) == tokens
            assert result.finish_reason == generation_pb2.FINISH_REASON_STOP

    run(body())


BAD_REQUESTS = [
    (dict(max_tokens=5), "prompt is empty"),
    (dict(prompt="x", prompt_token_ids=[1], max_tokens=5), "not both"),
    (dict(prompt_token_ids=[1] * 128, max_tokens=1), "at most 127"),
    (dict(prompt_token_ids=[1] * 100, max_tokens=60), "lower max_tokens to at most 28"),
    (dict(prompt_token_ids=[1], max_tokens=0), "max_tokens must be >= 1"),
    (dict(prompt_token_ids=[1], max_tokens=-3), "max_tokens must be >= 1"),
    (dict(prompt_token_ids=[1], max_tokens=100), "limit of 64"),
    (dict(prompt_token_ids=[1], max_tokens=5, temperature=-0.5), "temperature"),
    (dict(prompt_token_ids=[1], max_tokens=5, temperature=float("nan")), "temperature"),
    (dict(prompt_token_ids=[1], max_tokens=5, top_p=0.0), "top_p"),
    (dict(prompt_token_ids=[1], max_tokens=5, top_p=1.5), "top_p"),
    (dict(prompt_token_ids=[1], max_tokens=5, top_k=-1), "top_k"),
    (dict(prompt_token_ids=[1], max_tokens=5, proposer="medusa"), "'medusa': the configured proposers are fake;"),
    (dict(prompt_token_ids=[1, 4096], max_tokens=5), "prompt_token_ids[1] = 4096 is outside the vocabulary"),
    (dict(prompt_token_ids=[-1], max_tokens=5), "outside the vocabulary"),
    (dict(prompt_token_ids=[1], max_tokens=5, stop=[""]), "stop strings must not be empty"),
]


def test_bad_requests_get_invalid_argument_and_disturb_nothing():
    async def body():
        async with cluster(FakeVerifier(verify_delay_s=0.005), max_tokens_limit=64) as c:
            prompt = [9, 9, 9]
            valid = asyncio.create_task(generate(c.stub, prompt_token_ids=prompt, max_tokens=60, proposer="none"))
            while c.engine.num_running == 0:
                await asyncio.sleep(0.005)
            for fields, message in BAD_REQUESTS:
                for call in (c.stub.GenerateUnary, None):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        if call is None:
                            async for _ in c.stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=5):
                                pass
                        else:
                            await call(generation_pb2.GenerateRequest(**fields), timeout=5)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
                    assert message in info.value.details(), (fields, info.value.details())
            tokens, _, reason, stats, _ = await valid
            assert tokens == reference(prompt, 60)[0] and reason == "FINISH_REASON_LENGTH"
            assert len(c.verifier.prefilled) == 1  # none of the bad ones reached the verifier

    run(body())


@pytest.mark.parametrize("mode", ["garbage_step", "garbage_vocab", "over_budget", "bad_parents", "die", "hang"])
def test_a_misbehaving_proposer_changes_speculation_not_output(mode):
    async def body():
        verifier = FakeVerifier(verify_delay_s=0.01)  # long enough to outlast the proposer backoff
        async with cluster(verifier, proposers={"bad": FakeProposer(mode)}, k=3, proposer_timeout_s=0.2) as c:
            outs = await asyncio.gather(*(generate(c.stub, prompt_token_ids=p, max_tokens=25) for p in PROMPTS[:3]))
            for prompt, (tokens, text, reason, stats, _) in zip(PROMPTS, outs):
                assert tokens == reference(prompt, 25)[0], mode
                assert text == TOKENIZER.decode(tokens)
                check_stats(stats, len(tokens), len(prompt))
            client = c.scheduler.scheduler.proposers["bad"]
            assert client.faults > 0
            # After a fault every request goes again from scratch on a fresh stream.
            assert c.proposers["bad"].streams >= 2
            resent = [item for req in c.proposers["bad"].requests[1:] for item in req.items if item.reset]
            assert resent and all(len(item.new_token_ids) > 3 for item in resent[3:])

    run(body())


def test_a_proposer_that_goes_away_and_comes_back():
    async def body():
        fake = FakeProposer("good")
        async with cluster(FakeVerifier(verify_delay_s=0.01), proposers={"p": fake}, k=2) as c:
            task = asyncio.create_task(generate(c.stub, prompt_token_ids=[3, 1, 4], max_tokens=60))
            await asyncio.sleep(0.1)
            await c.proposer_servers["p"].stop(0)
            tokens, _, _, stats, _ = await task
            assert tokens == reference([3, 1, 4], 60)[0]
            assert c.scheduler.scheduler.proposers["p"].faults >= 1
            assert stats.proposers["p"].steps < stats.steps  # it served only part of the steps

    run(body())


def test_cancelled_stream_is_released_in_the_verifier_and_the_proposer():
    async def body():
        async with cluster(FakeVerifier(verify_delay_s=0.02), k=2) as c:
            call = c.stub.Generate(generation_pb2.GenerateRequest(prompt_token_ids=[5, 6], max_tokens=100))
            got = 0
            async for _ in call:
                got += 1
                if got == 3:
                    break
            call.cancel()
            (rid,) = c.verifier.prefilled
            for _ in range(100):
                if rid in c.verifier.released and rid in c.proposers["fake"].released:
                    break
                await asyncio.sleep(0.02)
            assert rid in c.verifier.released and rid not in c.verifier.seqs
            assert rid in c.proposers["fake"].released
            assert c.engine.num_running == 0
            # The scheduler still serves.
            tokens, *_ = await generate(c.stub, prompt_token_ids=[5, 6], max_tokens=5)
            assert tokens == reference([5, 6], 5)[0]

    run(body())


def test_a_cancelled_unary_call_is_released_too():
    async def body():
        async with cluster(FakeVerifier(verify_delay_s=0.02)) as c:
            call = c.stub.GenerateUnary(generation_pb2.GenerateRequest(prompt_token_ids=[5, 6], max_tokens=100))
            await asyncio.sleep(0.2)
            call.cancel()
            for _ in range(100):
                if c.verifier.prefilled and c.verifier.prefilled[0] in c.verifier.released:
                    break
                await asyncio.sleep(0.02)
            assert c.verifier.prefilled[0] in c.verifier.released

    run(body())


def test_resource_exhausted_when_the_queue_is_full():
    async def body():
        async with cluster(FakeVerifier(max_slots=2, verify_delay_s=0.01), max_waiting=1) as c:
            calls = [asyncio.create_task(generate(c.stub, prompt_token_ids=[i + 1], max_tokens=60, proposer="none"))
                     for i in range(3)]
            while (c.engine.num_running, c.engine.num_waiting) != (2, 1):
                await asyncio.sleep(0.005)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.GenerateUnary(generation_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=5))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "waiting" in info.value.details()
            for i, task in enumerate(calls):
                tokens, *_ = await task
                assert tokens == reference([i + 1], 60)[0]

    run(body())


def test_verifier_failures_and_a_verifier_restart_lose_no_token():
    async def body():
        verifier = FakeVerifier(verify_delay_s=0.01)

        async def until(condition):
            while not condition():
                await asyncio.sleep(0.002)

        async with cluster(verifier, proposers={"fake": FakeProposer("good")}, k=3) as c:
            tasks = [asyncio.create_task(generate(c.stub, prompt_token_ids=p, max_tokens=100)) for p in PROMPTS[:3]]
            await until(lambda: len(verifier.verify_batches) >= 2 and c.engine.num_running == 3)
            verifier.fail_verifies = 2
            await until(lambda: c.engine.verifier_failures == 2)
            done = len(verifier.verify_batches)
            await until(lambda: len(verifier.verify_batches) > done)
            verifier.forget_on_next_verify = True  # as if it restarted
            await until(lambda: c.engine.verifier_failures == 3)
            assert not any(t.done() for t in tasks)
            outs = await asyncio.gather(*tasks)
            for prompt, (tokens, *_rest) in zip(PROMPTS, outs):
                assert tokens == reference(prompt, 100)[0]
            assert c.engine.verifier_failures >= 3
            assert len(verifier.prefilled) >= 3 * 3  # admitted, then prefilled again twice
            resets = [item for req in c.proposers["fake"].requests for item in req.items if item.reset]
            assert len(resets) >= 3 * 3

    run(body())


POISON = 4000  # a token the fake verifier crashes on (FakeVerifier.poison_token)


@pytest.mark.parametrize("where", ["prefill", "verify"])
def test_requests_that_crash_the_verifier_fail_alone_and_the_others_finish_on_time(where):
    """Poison pills: requests whose own input makes the verifier fail (an exception, UNKNOWN) run beside good
    ones, arriving while those stream. Each fails alone with INTERNAL and the verifier's message; the good
    ones keep their exact output and finish within twice their time in the same run without the pills plus
    0.2 s per pill (finding whose input failed costs a few steps: a re-prefill and one Verify per request)."""
    good = PROMPTS[:6]
    poisoned = [[3, POISON, 11 + i] for i in range(3)]

    async def run_all(verifier, with_poison: bool):
        async with cluster(verifier, proposers={"fake": FakeProposer("good")}, k=3) as c:
            started = asyncio.get_running_loop().time()
            tasks = [asyncio.create_task(generate(c.stub, prompt_token_ids=p, max_tokens=60)) for p in good]
            errors = []
            if with_poison:
                for prompt in poisoned:  # spread over the good requests' lifetime
                    await asyncio.sleep(0.03)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await generate(c.stub, prompt_token_ids=prompt, max_tokens=60)
                    errors.append(info.value)
            outs = await asyncio.gather(*tasks)
            elapsed = asyncio.get_running_loop().time() - started
            for prompt, (tokens, _, reason, *_rest) in zip(good, outs):
                assert (tokens, reason) == (reference(prompt, 60)[0], "FINISH_REASON_LENGTH")
            assert c.engine.num_running == 0 and c.engine.num_waiting == 0
            await asyncio.sleep(0.05)  # the last releases
            assert not verifier.seqs, "a slot is still held"
            return elapsed, errors

    async def body():
        baseline, _ = await run_all(FakeVerifier(verify_delay_s=0.01), with_poison=False)
        verifier = FakeVerifier(verify_delay_s=0.01)
        verifier.poison_token, verifier.poison_prefill = POISON, where == "prefill"
        elapsed, errors = await run_all(verifier, with_poison=True)
        assert [e.code() for e in errors] == [grpc.StatusCode.INTERNAL] * len(poisoned)
        assert all("the verifier could not serve this request" in e.details() for e in errors), errors[0].details()
        assert verifier.poisoned_calls >= len(poisoned)
        assert elapsed <= 2 * baseline + 0.2 * len(poisoned), (elapsed, baseline)

    run(body())


def test_sampling_params_reach_the_verifier():
    async def body():
        async with cluster() as c:
            await generate(c.stub, prompt_token_ids=[1, 2], max_tokens=2, temperature=0.7, top_p=0.9, top_k=40,
                           seed=1234)
            await generate(c.stub, prompt_token_ids=[1, 2], max_tokens=2)
            sampled, greedy = (c.verifier.sampling[rid] for rid in c.verifier.prefilled)
            assert sampled.temperature == pytest.approx(0.7) and sampled.top_p == pytest.approx(0.9)
            assert sampled.top_k == 40 and sampled.seed == 1234
            assert greedy.temperature == 0 and not greedy.HasField("top_p") and not greedy.HasField("seed")

    run(body())


class RecordingPolicy(FixedPolicy):
    """The fixed policy, keeping what observe() is told."""

    def __init__(self, proposers, k):
        super().__init__(proposers, k)
        self.observed = []

    def observe(self, outcomes, record):
        self.observed.append((outcomes, record))


def test_step_records_measure_every_step():
    async def body():
        async with cluster(k=2) as c:
            c.engine.policy = policy = RecordingPolicy(["fake"], 2)
            observed = policy.observed
            tokens, _, _, stats, _ = await generate(c.stub, prompt_token_ids=[8], max_tokens=12)
            records = list(c.engine.step_records)
            assert len(records) == stats.steps
            # The policy hears about every step: what each request was given and what came of it.
            assert [r for _, r in observed] == records
            assert all(len(o) == 1 and o[0].k <= 2 and o[0].accepted <= o[0].proposed <= o[0].k for o, _ in observed)
            assert sum(o[0].proposed for o, _ in observed) == stats.proposed
            assert records[0].admitted == 1 and records[0].prefill_forward_ms == 1.0
            for r in records:
                assert r.verify_forward_ms == 2.0 and r.batch_size == 1
                assert r.wall_ms > 0 and r.overhead_ms == pytest.approx(r.wall_ms - r.forward_ms)
                assert r.accepted <= r.proposed
            assert sum(r.proposed for r in records) == stats.proposed
            assert sum(r.committed for r in records) >= len(tokens)

    run(body())


def test_health_turns_serving_once_dependencies_answer_and_tokenizer_comes_from_the_verifier():
    async def body():
        # The proposer is not up yet: take a free port now and serve it there later.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        late = (ProposerAddress("late", f"127.0.0.1:{port}"),)
        async with cluster(FakeVerifier(model=str(TOKENIZER_DIR)), proposers={}, extra_proposers=late,
                           tokenizer=None, wait_ready=False) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            await asyncio.sleep(0.3)
            status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.GenerateUnary(generation_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=2))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            async with serve_fake(FakeProposer("good"), proposer_pb2_grpc.add_ProposerServicer_to_server,
                                  port=port):
                await asyncio.wait_for(c.scheduler.scheduler.ready.wait(), 20)
                for service in ("", "specdec.v1.Generation"):
                    status = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert status.status == health_pb2.HealthCheckResponse.SERVING
                reflection = reflection_pb2_grpc.ServerReflectionStub(c.channel)
                async for answer in reflection.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5):
                    services = {s.name for s in answer.list_services_response.service}
                assert {"specdec.v1.Generation", "grpc.health.v1.Health"} <= services
                # A text prompt, tokenized by the tokenizer loaded from the verifier's model folder.
                prompt = "def add(a, b):"
                result = await c.stub.GenerateUnary(
                    generation_pb2.GenerateRequest(prompt=prompt, max_tokens=4), timeout=10)
                ids = TOKENIZER.encode(prompt)
                assert list(result.token_ids) == reference(ids, 4)[0]
                assert result.stats.prompt_tokens == len(ids)
                assert result.stats.proposers["late"].steps > 0

    run(body())

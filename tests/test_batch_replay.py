"""bench/batch_replay.py: the batched replay's clock, admissions and caps, on texts whose misses are known."""

import pytest

from bench import batch_replay
from bench.chain_phase import CONTEXT, COSTS, make_policy, step_ms

COST = COSTS["fitted here"]


def test_a_lone_request_takes_its_admission_and_steps():
    # No misses: k = 3 commits 4 tokens a step, so 8 tokens take two steps, the last one capped at 3.
    latency = batch_replay.replay([[False] * 8], [0.0], COST, 8, fixed_k=3)
    steps = step_ms(COST, [3], CONTEXT) + step_ms(COST, [3], CONTEXT + 4)
    assert latency == [pytest.approx(batch_replay.ADMIT_MS + steps)]


def test_a_chain_stops_at_the_first_miss_and_caps_keep_to_max_tokens():
    # A miss at every second token: k = 5 accepts one candidate, then the bonus token, a step.
    latency = batch_replay.replay([[False, True] * 4], [0.0], COST, 8, fixed_k=5)
    contexts = [CONTEXT + 2 * s for s in range(4)]
    ks = [5, 5, 3, 1]  # the cap: max_tokens - committed - 1
    assert latency == [pytest.approx(batch_replay.ADMIT_MS + sum(
        step_ms(COST, [k], c) for k, c in zip(ks, contexts)))]


def test_a_request_arriving_during_a_step_joins_at_its_end_and_is_timed_from_its_arrival():
    first_step = batch_replay.ADMIT_MS + step_ms(COST, [0], CONTEXT)
    arrival_ms = first_step / 2
    latency = batch_replay.replay([[True] * 2, [True] * 2], [0.0, arrival_ms / 1e3], COST, 2, fixed_k=0)
    second_step = batch_replay.ADMIT_MS + step_ms(COST, [0, 0], CONTEXT * 2 + 1)
    assert latency[0] == pytest.approx(first_step + second_step)
    third_step = step_ms(COST, [0], CONTEXT + 1)
    assert latency[1] == pytest.approx(first_step + second_step + third_step - arrival_ms)


def test_smartspec_speculates_on_a_draft_that_never_misses():
    misses = [[False] * 32 for _ in range(4)]
    arrivals = [0.0, 0.01, 0.02, 0.03]
    chosen = batch_replay.replay(misses, arrivals, COST, 32, make_policy(COST, by_age=True))
    plain = batch_replay.replay(misses, arrivals, COST, 32, fixed_k=0)
    assert all(c is not None for c in chosen)
    assert sum(chosen) < 0.5 * sum(plain)

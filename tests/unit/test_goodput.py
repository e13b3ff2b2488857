"""Goodput maths and the chooser (scheduler_svc/policy/goodput.py)."""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest

from scheduler_svc.policy.goodput import (
    StepCost,
    best_uniform_k,
    choose,
    expected_tokens,
    plan_goodput,
    survival,
)


def iid(rates: list[list[float]], k_max: int) -> np.ndarray:
    """Survival table [B, P, K] for iid acceptance rates[b][p]."""
    a = np.asarray(rates, dtype=float)[..., None]
    return survival(np.broadcast_to(a, (*a.shape[:2], k_max)).copy())


def cost(base=10.0, token=1.0, fixed=(0.0,), request=(0.0,), prop_token=(0.0,), depth=None) -> StepCost:
    return StepCost(base, token, np.array(fixed, float), np.array(request, float), np.array(prop_token, float),
                    None if depth is None else np.array(depth, float))


def random_cost(rng: np.random.Generator, p: int) -> StepCost:
    """Any mix of free proposers and ones with fixed, per-request, per-token and per-pass costs."""
    return StepCost(
        base_ms=float(rng.uniform(0.5, 20)),
        token_ms=float(rng.uniform(0.0, 3)),
        fixed_ms=rng.uniform(0, 5, p) * (rng.random(p) < 0.7),
        request_ms=rng.uniform(0, 1, p),
        proposer_token_ms=rng.uniform(0, 1, p) * (rng.random(p) < 0.7),
        depth_ms=rng.uniform(0, 4, p) * (rng.random(p) < 0.7),
    )


def random_case(rng: np.random.Generator, b: int, p: int, k_max: int) -> tuple[np.ndarray, np.ndarray, StepCost]:
    """Survival curves from any per-position rates (so marginal gains are any decreasing sequence), caps
    that sometimes exceed K (K caps them) and a random_cost, drawn in that order."""
    surv = survival(rng.uniform(0.0, 1.0, size=(b, p, k_max)))
    max_k = rng.integers(0, k_max + 2, size=(b, p))
    return surv, max_k, random_cost(rng, p)


def exhaustive(surv: np.ndarray, max_k: np.ndarray, step: StepCost) -> float:
    """Best goodput over every (proposer, k) per request."""
    b, p, k_max = surv.shape
    options = [[(-1, 0)] + [(q, k) for q in range(p) for k in range(1, min(max_k[i, q], k_max) + 1)]
               for i in range(b)]
    best = 0.0
    for combo in itertools.product(*options):
        props, ks = map(np.array, zip(*combo))
        best = max(best, plan_goodput(surv, ks, props, step))
    return best


def test_expected_tokens_formula_and_edge_cases():
    assert expected_tokens(0, 0.7) == 1.0
    assert expected_tokens(3, 1.0) == 4.0
    assert expected_tokens(2, 0.5) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(4, 0.0) == 1.0
    # Same as 1 + sum of the survival probabilities.
    assert expected_tokens(5, 0.8) == pytest.approx(1 + survival(np.full(5, 0.8)).sum())


def test_low_acceptance_gives_k_zero_and_high_acceptance_batch_one_gives_long_k():
    # A candidate token costs 15% of a plain step: worth it only when it is likely to be accepted.
    step = cost(base=10.0, token=1.5)
    low = choose(iid([[0.1]], 8), np.array([[8]]), step)
    assert low.ks.tolist() == [0] and low.proposer.tolist() == [-1]
    high = choose(iid([[0.9]], 8), np.array([[8]]), step)
    assert high.ks.tolist()[0] >= 6 and high.proposer.tolist() == [0]


def test_large_batch_with_expensive_tokens_gives_k_zero():
    b = 32
    # Base cost small next to the per-token cost: the batch is compute bound, extra tokens cost full price.
    step = cost(base=2.0, token=3.0)
    choice = choose(iid([[0.6]] * b, 5), np.full((b, 1), 5), step)
    assert choice.ks.sum() == 0
    # The same acceptance at batch 1 with a large fixed cost per step: speculation pays.
    assert choose(iid([[0.6]], 5), np.array([[5]]), cost(base=20.0, token=0.5)).ks[0] > 0


def test_step_time_charges_a_proposer_per_pass_of_its_longest_chain():
    # Proposer 0 free; proposer 1 a draft: 1 ms when used, 0.2 per request, 0.1 per token, 0.4 per pass.
    step = cost(base=10.0, token=1.0, fixed=(0, 1.0), request=(0, 0.2), prop_token=(0, 0.1), depth=(0, 0.4))
    ks, props = np.array([3, 1, 2, 0]), np.array([1, 1, 0, -1])
    draft = 1.0 + 2 * 0.2 + 4 * 0.1 + 0.4 * 3  # passes: the longest draft chain (3), not the total (4)
    assert step.step_ms(ks, props) == pytest.approx(10.0 + 1.0 * (ks + 1).sum() + draft)
    # A proposer named with k = 0 is not asked for anything; no speculation at all costs the base only.
    assert step.step_ms(np.array([0, 2]), np.array([1, 0])) == pytest.approx(10.0 + 4.0)
    assert step.step_ms(np.zeros(2, int), np.full(2, -1)) == pytest.approx(12.0)
    # Without per-pass costs (older callers) the field defaults to zeros.
    assert cost(fixed=(1.0, 2.0)).depth_ms.tolist() == [0.0, 0.0]


def test_draft_like_costs_long_k_at_batch_one_and_none_for_a_large_batch_or_low_acceptance():
    # A draft whose passes cost 0.4 ms each; a verifier step of 20 ms that barely grows with tokens.
    def draft_cost(base, token):
        return cost(base=base, token=token, fixed=(0, 1.0), request=(0, 0.2), prop_token=(0, 0.1), depth=(0, 0.4))

    high = choose(iid([[0.0, 0.85]], 5), np.array([[0, 5]]), draft_cost(20.0, 0.3))
    assert high.ks[0] >= 4 and high.proposer.tolist() == [1]
    low = choose(iid([[0.0, 0.05]], 5), np.array([[0, 5]]), draft_cost(20.0, 0.3))
    assert low.ks.tolist() == [0]
    b = 32  # compute bound: every batched token costs as much as a tenth of the step
    large = choose(iid([[0.0, 0.85]] * b, 5), np.full((b, 2), [0, 5]), draft_cost(3.0, 2.0))
    assert large.ks.sum() == 0


def test_per_pass_cost_couples_requests_through_the_longest_chain():
    # Tokens are nearly free, passes are not: once the draft runs m passes for one request, the others
    # get up to m candidates for almost nothing, so all chains come out the same length.
    step = cost(base=10.0, token=0.01, fixed=(0.5,), request=(0.0,), prop_token=(0.0,), depth=(2.0,))
    surv = iid([[0.9], [0.5], [0.3]], 5)
    choice = choose(surv, np.full((3, 1), 5), step)
    assert choice.goodput == pytest.approx(exhaustive(surv, np.full((3, 1), 5), step), rel=1e-9)
    assert len(set(choice.ks.tolist())) == 1 and choice.ks[0] > 0
    # Charging passes per request instead (as if each chain ran alone) gives different, worse chains:
    # the coupling is what the exact search is for.
    alone = cost(base=10.0, token=0.01, fixed=(0.5,), request=(0.0,), prop_token=(2.0,))
    other = choose(surv, np.full((3, 1), 5), alone)
    assert other.ks.tolist() != choice.ks.tolist()
    assert plan_goodput(surv, other.ks, other.proposer, step) < choice.goodput


def test_k_respects_max_k_and_unavailable_options():
    choice = choose(iid([[0.95, 0.95], [0.95, 0.95]], 6), np.array([[2, 0], [0, 0]]), cost(fixed=(0, 0),
                    request=(0, 0), prop_token=(0, 0)))
    assert choice.ks.tolist() == [2, 0] and choice.proposer.tolist() == [0, -1]


@pytest.mark.parametrize("seed", range(40))
def test_matches_exhaustive_search_on_small_cases(seed):
    rng = np.random.default_rng(seed)
    b, p, k_max = int(rng.integers(1, 5)), int(rng.integers(1, 3)), int(rng.integers(1, 5))
    surv, max_k, step = random_case(rng, b, p, k_max)
    choice = choose(surv, max_k, step)
    assert choice.goodput == pytest.approx(exhaustive(surv, max_k, step), rel=1e-9, abs=1e-12)
    # The reported numbers are those of the plan it returns.
    assert choice.goodput == pytest.approx(plan_goodput(surv, choice.ks, choice.proposer, step), rel=1e-12)
    assert np.all(choice.ks <= np.where(choice.proposer >= 0, max_k[np.arange(b), choice.proposer], 0))
    assert np.all(choice.ks <= k_max)


@pytest.mark.parametrize("seed", range(40))
def test_batch_of_one_matches_exhaustive_search(seed):
    # A batch of one is scored directly (no caps, no Dinkelbach rounds): the same optimum.
    rng = np.random.default_rng(1000 + seed)
    p, k_max = int(rng.integers(1, 4)), int(rng.integers(1, 9))
    surv, max_k, step = random_case(rng, 1, p, k_max)
    choice = choose(surv, max_k, step)
    assert choice.goodput == pytest.approx(exhaustive(surv, max_k, step), rel=1e-9, abs=1e-12)
    assert choice.goodput == pytest.approx(plan_goodput(surv, choice.ks, choice.proposer, step), rel=1e-12)
    assert choice.step_ms == pytest.approx(step.step_ms(choice.ks, choice.proposer), rel=1e-12)
    k, q = int(choice.ks[0]), int(choice.proposer[0])
    assert (k == 0 and q == -1) or (q >= 0 and 0 < k <= min(max_k[0, q], k_max))


@pytest.mark.parametrize("seed", range(30))
def test_per_request_catch_up_charges_match_exhaustive_search(seed):
    # A request the draft has not read yet costs it more (its prompt): the chooser weighs that per request.
    rng = np.random.default_rng(2000 + seed)
    b, p, k_max = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(1, 5))
    surv, max_k, base = random_case(rng, b, p, k_max)
    step = dataclasses.replace(base, catch_up_ms=rng.uniform(0, 6, size=(b, p)) * (rng.random((b, p)) < 0.6))
    choice = choose(surv, max_k, step)
    assert choice.goodput == pytest.approx(exhaustive(surv, max_k, step), rel=1e-9, abs=1e-12)
    assert choice.goodput == pytest.approx(plan_goodput(surv, choice.ks, choice.proposer, step), rel=1e-12)


def test_a_request_new_to_the_draft_goes_to_prompt_lookup_when_catching_up_costs_more():
    # Both requests could use prompt lookup (free, a lower rate) or the draft; the draft has read request 0
    # already and would have to read request 1's prompt first.
    surv = iid([[0.5, 0.8], [0.5, 0.8]], 4)
    max_k = np.array([[4, 4], [4, 4]])
    plain = cost(base=20.0, token=0.3, fixed=(0.0, 1.0), request=(0.0, 0.2), prop_token=(0.0, 0.5))
    assert choose(surv, max_k, plain).proposer.tolist() == [1, 1]
    charged = dataclasses.replace(plain, catch_up_ms=np.array([[0.0, 0.0], [0.0, 8.0]]))
    assert choose(surv, max_k, charged).proposer.tolist() == [1, 0]


def test_free_proposer_preferred_where_it_matches_costly_one_elsewhere():
    # Proposer 0: free prompt lookup (matched for request 0 only), proposer 1: a draft with costs.
    surv = iid([[0.8, 0.7], [0.8, 0.7]], 4)
    max_k = np.array([[4, 4], [0, 4]])
    step = cost(base=20.0, token=0.3, fixed=(0.0, 1.0), request=(0.0, 0.2), prop_token=(0.0, 0.5))
    choice = choose(surv, max_k, step)
    assert choice.proposer.tolist() == [0, 1] and choice.ks.min() > 0


def test_batch_uniform_picks_one_k_for_all():
    surv = iid([[0.9], [0.2], [0.5]], 5)
    step = cost(base=10.0, token=0.5)
    choice = best_uniform_k(surv, np.full((3, 1), 5), step, np.zeros(3, dtype=int))
    assert len(set(choice.ks.tolist())) == 1
    best = max(plan_goodput(surv, [k] * 3, [0 if k else -1] * 3, step) for k in range(6))
    assert choice.goodput == pytest.approx(best)
    # Per-request choice can only do better.
    assert choose(surv, np.full((3, 1), 5), step).goodput >= choice.goodput - 1e-12


def test_batch_uniform_scores_plans_with_the_per_pass_cost():
    surv = iid([[0.9], [0.8], [0.5]], 5)
    step = cost(base=10.0, token=0.1, fixed=(1.0,), request=(0.1,), prop_token=(0.1,), depth=(3.0,))
    choice = best_uniform_k(surv, np.array([[5], [2], [5]]), step, np.zeros(3, dtype=int))
    plans = [np.minimum([5, 2, 5], k) for k in range(6)]
    best = max(plan_goodput(surv, ks, np.where(ks > 0, 0, -1), step) for ks in plans)
    assert choice.goodput == pytest.approx(best)
    assert choice.step_ms == pytest.approx(step.step_ms(choice.ks, choice.proposer))


@pytest.mark.parametrize("b, k_max", [(32, 5), (64, 5), (64, 8)])
def test_chooser_is_fast_enough(capsys, b, k_max):
    """Prints the chooser's own time (part of every step's overhead) with prompt lookup (free) and a
    draft (fixed, per-request, per-token and per-pass costs: k_max caps tried); bounds it loosely."""
    rng = np.random.default_rng(0)
    p = 2
    surv = survival(rng.uniform(0.3, 0.95, size=(b, p, k_max)))
    max_k = rng.integers(0, k_max + 1, size=(b, p))
    max_k[:, 1] = k_max  # the draft can serve anyone, at any length
    step = cost(base=15.0, token=0.2, fixed=(0.0, 1.0), request=(0.0, 0.2), prop_token=(0.0, 0.1),
                depth=(0.0, 0.4))
    choose(surv, max_k, step)
    runs = 20
    t0 = time.perf_counter()
    for _ in range(runs):
        choose(surv, max_k, step)
    ms = (time.perf_counter() - t0) / runs * 1e3
    with capsys.disabled():
        print(f"\nchooser: {ms:.3f} ms per plan for batch {b}, {p} proposers, K={k_max}")
    assert ms < 50  # generous: shared CPUs; typically well under 1 ms


def test_no_options_means_no_speculation():
    step = cost()
    for choice in (choose(np.zeros((3, 0, 4)), np.zeros((3, 0), int), step),
                   choose(iid([[0.9]] * 3, 4), np.zeros((3, 1), int), step),
                   best_uniform_k(np.zeros((2, 0, 4)), np.zeros((2, 0), int), step, np.full(2, -1))):
        assert choice.ks.sum() == 0 and (choice.proposer == -1).all()
    assert choose(np.zeros((0, 1, 4)), np.zeros((0, 1), int), step).ks.size == 0

"""Online acceptance estimates (scheduler_svc/policy/acceptance.py)."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler_svc.policy.acceptance import AcceptanceEstimator, Observation


def geometric_steps(rng: np.random.Generator, a: float, k: int, steps: int) -> list[int]:
    """Accepted counts of `steps` chains of k candidates with iid acceptance a."""
    out = []
    for _ in range(steps):
        accepted = 0
        while accepted < k and rng.random() < a:
            accepted += 1
        out.append(accepted)
    return out


def test_observations_count_tested_positions():
    assert Observation.from_verified("d", proposed=5, accepted=2) == Observation("d", 3, 2)
    assert Observation.from_verified("d", proposed=4, accepted=4) == Observation("d", 4, 4)
    # Shadow: a chain of 5 against committed accepted + bonus (3 tokens): two match, the third does not.
    assert Observation.from_shadow("n", [1, 2, 3, 4, 5], [1, 2, 9]) == Observation("n", 3, 2)
    # All three committed tokens match: positions 1..3 tested and accepted, beyond unknown.
    assert Observation.from_shadow("n", [1, 2, 3, 4, 5], [1, 2, 3]) == Observation("n", 3, 3)
    assert Observation.from_shadow("n", [7], [1, 2]) == Observation("n", 1, 0)


@pytest.mark.parametrize("a", [0.2, 0.5, 0.85])
def test_prior_converges_to_the_true_conditional_rate(a):
    rng = np.random.default_rng(1)
    est = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.02)
    for i, accepted in enumerate(geometric_steps(rng, a, 5, 3000)):
        est.observe(f"r{i % 7}", Observation.from_verified("draft", 5, accepted))
    # accepted / proposed would be far off (for a = 0.5, k = 5 it reads about 0.19).
    assert est.prior("draft") == pytest.approx(a, abs=0.06)


def test_request_estimate_starts_at_the_prior_and_moves_with_its_own_outcomes():
    est = AcceptanceEstimator(4, alpha=0.3, prior_alpha=0.05, initial_rate=0.5)
    assert est.rate("new", "ngram") == pytest.approx(0.5)
    for _ in range(200):  # many requests teach the proposer's prior: 0.8
        for rid in ("a", "b"):
            est.observe(rid, Observation("ngram", tested=5, accepted=4))
    assert est.prior("ngram") == pytest.approx(0.8, abs=0.02)
    assert est.rate("fresh", "ngram") == pytest.approx(est.prior("ngram"))  # a new request starts there
    for _ in range(10):  # a request that keeps missing moves well below the prior
        est.observe("bad", Observation("ngram", tested=1, accepted=0))
    assert est.rate("bad", "ngram") < 0.1
    assert est.prior("ngram") > 0.7  # one request does not drag the prior far
    # Estimates are per proposer.
    assert est.rate("bad", "draft") == pytest.approx(0.5)
    est.forget(["a"])
    assert est.tracked_requests == 1


def test_position_rates_shape_the_estimate_once_observed():
    est = AcceptanceEstimator(3, alpha=0.3, prior_alpha=0.1)
    assert np.allclose(est.position_rates(["x"], "p"), 0.5)  # nothing observed: flat at the prior
    # Position 1 is accepted half the time; given that, positions 2 and 3 always are.
    for i in range(400):
        accepted = 3 if i % 2 else 0
        est.observe(f"r{i % 5}", Observation.from_verified("p", 3, accepted))
    rates = est.position_rates(["fresh"], "p")[0]
    assert rates[0] < 0.7 and rates[1] > rates[0] and rates[2] > rates[0]
    assert rates.max() <= 0.99


def fallen(est: AcceptanceEstimator, rid: str = "x", misses: int = 10) -> None:
    """Let `rid` miss `misses` times in a row, while other requests teach the draft's prior 0.8."""
    for _ in range(misses):
        est.observe(rid, Observation("draft", 1, 0))
    for i in range(100):
        est.observe(f"teach{i % 5}", Observation("draft", 5, 4))


def test_an_estimate_without_evidence_drifts_back_to_the_prior():
    est = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05, drift=0.1)
    fallen(est)
    low, prior = est.rate("x", "draft"), est.prior("draft")
    assert low < 0.15 and prior == pytest.approx(0.8, abs=0.02)
    est.advance()  # the plan after the last evidence: no step without evidence yet
    assert est.rate("x", "draft") == pytest.approx(low)
    for n in range(1, 30):
        est.advance()
        assert est.rate("x", "draft") == pytest.approx(prior + (low - prior) * 0.9 ** n)
    assert est.rate("x", "draft") == pytest.approx(prior, abs=0.05)
    # Without the clock nothing drifts (and drift=0 turns it off).
    still = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05)
    fallen(still)
    assert still.rate("x", "draft") == pytest.approx(low)
    off = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05, drift=0.0)
    fallen(off)
    for _ in range(50):
        off.advance()
    assert off.rate("x", "draft") == pytest.approx(low)
    with pytest.raises(ValueError, match="drift"):
        AcceptanceEstimator(5, drift=1.0)


def test_a_retry_updates_the_drift_by_its_evidence_and_failed_retries_slow_it():
    est = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05, drift=0.1)
    fallen(est)
    low = est.rate("x", "draft")
    for _ in range(8):
        est.advance()
    drifted = est.rate("x", "draft")
    assert drifted > 0.4
    # A miss at the first position: far more likely for this request than for the prior's 0.8, so
    # most of the drift is taken back before the miss counts, unlike an EMA step from the drifted rate.
    own = est._requests[("x", "draft")]
    ema_alone = 0.7 * drifted * own.tested / (0.7 * own.tested + 0.3)
    est.observe("x", Observation("draft", 1, 0))
    assert est.rate("x", "draft") < 0.6 * ema_alone
    assert own.patience == 2.0
    # The next drift is twice as slow; each further failed re-try doubles it again, up to a cap.
    est.advance()
    before = est.rate("x", "draft")
    for _ in range(8):
        est.advance()
    assert est.rate("x", "draft") == pytest.approx(
        est.prior("draft") + (before - est.prior("draft")) * 0.9 ** (8 / 2))
    for expected in (4.0, 8.0, 8.0):
        est.observe("x", Observation("draft", 1, 0))
        est.advance()
        est.advance()
        assert own.patience == expected
    # A re-try that hits resets it, and hits where only the prior expected them complete the drift.
    for _ in range(20):
        est.advance()
    est.observe("x", Observation("draft", 4, 4))
    assert own.patience == 1.0 and est.rate("x", "draft") > 0.6
    # Evidence in every step: no drift at all (the EMA alone moves the estimate).
    steady = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05, drift=0.1)
    fallen(steady)
    for _ in range(20):
        steady.advance()
        steady.observe("x", Observation("draft", 1, 0))
    assert steady.rate("x", "draft") < 0.02


def closed_loop(true_rate: float, cost, *, drift: float, steps: int, seed: int = 0) -> list[int]:
    """The policy's loop for one request pinned to a costly draft: advance the clock, plan with the
    chooser, verify what it asked for (iid acceptance true_rate), observe. Returns its k per step."""
    from scheduler_svc.policy.goodput import choose, survival

    rng = np.random.default_rng(seed)
    est = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05, drift=drift)
    fallen(est)
    ks = []
    for _ in range(steps):
        est.advance()
        surv = survival(est.position_rates(["x"], "draft"))[:, None, :]  # [1, 1, K]
        k = int(choose(surv, np.array([[5]]), cost).ks[0])
        ks.append(k)
        if k > 0:
            accepted = geometric_steps(rng, true_rate, k, 1)[0]
            est.observe("x", Observation.from_verified("draft", k, accepted))
        est.observe("other", Observation("draft", 5, 4))  # the rest of the batch keeps the prior at 0.8
    return ks


def draft_cost(token_ms: float, pass_ms: float):
    """A 10 ms step, each batched token token_ms, a draft of 1 ms + 0.2 per request + 0.1 per token + passes."""
    from scheduler_svc.policy.goodput import StepCost

    return StepCost(10.0, token_ms, np.array([1.0]), np.array([0.2]), np.array([0.1]), np.array([pass_ms]))


@pytest.mark.parametrize("token_ms, pass_ms", [(1.0, 0.4), (2.0, 1.0)])
def test_a_request_that_fell_by_noise_is_retried_and_recovers(token_ms, pass_ms):
    cost = draft_cost(token_ms, pass_ms)
    ks = closed_loop(0.8, cost, drift=0.07, steps=120)
    first = next(i for i, k in enumerate(ks) if k > 0)
    assert first <= 30  # about three half lives at most
    assert np.mean(ks[-60:]) >= 3  # back to long chains once its evidence comes in
    # Without the drift the fallen estimate never gets a chance: k = 0 for good.
    assert sum(closed_loop(0.8, cost, drift=0.0, steps=120)) == 0


@pytest.mark.parametrize("token_ms, pass_ms", [(1.0, 0.4), (2.0, 1.0), (0.3, 0.4)])
def test_a_request_that_keeps_failing_stays_mostly_at_k_zero(token_ms, pass_ms):
    ks = np.array(closed_loop(0.0, draft_cost(token_ms, pass_ms), drift=0.07, steps=300))
    retries = int((ks > 0).sum())
    assert 3 <= retries <= 0.08 * len(ks)  # still explored now and then, but rarely
    assert ks[ks > 0].max() <= 2  # and never with a long chain


def serve_pinned(est: AcceptanceEstimator, cost, true_rate: float, requests: int, rng, tag: str,
                 tokens: int = 32) -> list[int]:
    """Requests of `tokens` tokens one after another, pinned to the draft, planned by the chooser and
    verified with iid acceptance true_rate; returns k per step."""
    from scheduler_svc.policy.goodput import choose, survival

    ks = []
    for r in range(requests):
        rid, left = f"{tag}{r}", tokens
        while left > 0:
            est.advance()
            cap = min(est.max_k, left - 1)
            surv = survival(est.position_rates([rid], "draft"))[:, None, :]
            k = int(choose(surv, np.array([[cap]]), cost).ks[0]) if cap > 0 else 0
            accepted = geometric_steps(rng, true_rate, k, 1)[0] if k > 0 else 0
            if k > 0:
                est.observe(rid, Observation.from_verified("draft", k, accepted))
            left -= accepted + 1
            ks.append(k)
        est.forget([])
    return ks


def test_a_prior_that_fell_recovers_when_the_requests_are_good_again():
    # A draft that served well, then a stretch of requests it cannot guess at all: the prior falls below
    # where speculation pays and no new request brings evidence any more. Without the prior's drift the
    # draft would stay off for good; with it, good requests get long chains again within a few.
    cost = draft_cost(0.3, 1.0)
    est = AcceptanceEstimator(8, alpha=0.3, prior_alpha=0.05)
    rng = np.random.default_rng(0)
    assert np.mean(serve_pinned(est, cost, 0.85, 20, rng, "good")) > 3
    bad = serve_pinned(est, cost, 0.05, 60, rng, "bad")
    assert np.mean(np.array(bad[-600:]) > 0) < 0.1  # rarely re-tried while its requests keep failing
    again = serve_pinned(est, cost, 0.85, 20, rng, "again")
    assert np.mean(again[-300:]) > 3
    # drift = 0 turns every drift off, the prior's too: the same history leaves the draft off.
    frozen = AcceptanceEstimator(8, alpha=0.3, prior_alpha=0.05, drift=0.0)
    serve_pinned(frozen, cost, 0.85, 20, rng, "good")
    serve_pinned(frozen, cost, 0.05, 60, rng, "bad")
    assert sum(serve_pinned(frozen, cost, 0.85, 20, rng, "again")) == 0


def test_a_failed_retry_of_the_prior_takes_its_drift_back_and_slows_the_next():
    est = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05, drift=0.1)
    for i in range(200):
        est.observe(f"r{i % 5}", Observation("draft", 5, 4))  # ceiling 0.8
    for i in range(200):
        est.observe(f"s{i % 5}", Observation("draft", 1, 0))  # then nothing accepted
    low = est.prior("draft")
    assert low < 0.1
    for _ in range(60):
        est.advance()
    drifted = est.prior("draft")
    assert drifted > low + 0.2  # towards the ceiling while nobody brings evidence
    patience = est._stats("draft").prior.patience
    est.observe("t", Observation("draft", 1, 0))  # the re-try fails
    # Its evidence took much of the drift back (a miss is 5 times likelier at the fallen rate than at
    # the ceiling's 0.8, weighed against the drift's own weight).
    assert est.prior("draft") < drifted - 0.2
    assert est._stats("draft").prior.patience == 2 * patience


def test_deep_positions_seen_rarely_or_long_ago_shape_little():
    est = AcceptanceEstimator(5, alpha=0.3, prior_alpha=0.05)
    for i in range(300):  # long chains mostly accepted: every position observed often
        est.observe(f"r{i % 5}", Observation.from_verified("draft", 5, 5 if i % 3 else 1))
    shaped = est._stats("draft").shape.copy()
    assert abs(shaped[1] - 1) > 0.05  # position 2 is accepted more often than the average position
    for i in range(600):  # then the first candidate always fails: deeper positions are never reached
        est.observe(f"s{i % 5}", Observation("draft", 1, 0))
    stats = est._stats("draft")
    raw = stats.position_accepted[1:] / stats.evidence.rate  # the stale ratios: 0.8 / 0.01
    assert raw.min() > 20
    assert np.all(np.abs(stats.shape[1:] - 1) < 0.2)  # shrunk to about 1: their counts have decayed
    rates = est.position_rates(["fresh"], "draft")[0]
    assert rates.max() < 0.1  # no promise of long chains after a first candidate that fails

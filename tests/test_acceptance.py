"""Online acceptance estimates (scheduler_svc/acceptance.py)."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler_svc.acceptance import AcceptanceEstimator, Observation


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

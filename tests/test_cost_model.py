"""The online step-time model (scheduler_svc/cost_model.py)."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler_svc.cost_model import CostModel, RidgeFit, StepShape


def synthetic_steps(rng: np.random.Generator, n: int):
    """(batch size, batched tokens, context tokens) of varied steps."""
    for _ in range(n):
        b = int(rng.integers(1, 17))
        k = rng.integers(0, 6, size=b)
        yield b, int(b + k.sum()), int(rng.integers(20, 400, size=b).sum())


def test_ridge_fit_recovers_known_coefficients_from_noisy_timings():
    rng = np.random.default_rng(0)
    true = np.array([4.0, 0.8, 0.35, 0.002])
    fit = RidgeFit((2.0, 0.5, 0.5, 0.0), window=300)  # the defaults-like seed, off in every coefficient
    for b, n, c in synthetic_steps(rng, 300):
        x = (1.0, b, n, c)
        fit.add(x, float(true @ x) * (1 + rng.normal(0, 0.01)), refit=False)
    fit.refit()
    assert fit.coef == pytest.approx(true, rel=0.1, abs=0.002)


def test_ridge_fit_keeps_coefficients_non_negative_and_uses_the_seed_without_data():
    fit = RidgeFit((2.0, 0.5, 0.1), window=50)
    assert fit.predict((1.0, 2, 3)) == pytest.approx(2.0 + 1.0 + 0.3)
    # Timings that fall with more tokens (noise): the token cost must not go negative.
    for n in range(1, 40):
        fit.add((1.0, 1, n), 10.0 - 0.1 * n, refit=False)
    fit.refit()
    assert (fit.coef >= 0).all()


def test_ridge_fit_window_forgets_old_regimes():
    fit = RidgeFit((0.0, 0.0), window=20)
    for n in range(40):
        fit.add((1.0, n % 5), 1.0 + 2.0 * (n % 5))  # then the machine gets slower
    for n in range(40):
        fit.add((1.0, n % 5), 3.0 + 4.0 * (n % 5))
    assert fit.coef == pytest.approx([3.0, 4.0], rel=0.1)


def test_cost_model_learns_verify_proposer_and_overhead_and_reports_its_error():
    rng = np.random.default_rng(2)
    model = CostModel(window=200)
    for b, n, c in synthetic_steps(rng, 200):
        drafted = n - b
        shape = StepShape(b, n, c, {"draft": b if drafted else 0}, {"draft": drafted})
        verify = 3.0 + 0.5 * b + 0.2 * n + 0.001 * c
        draft = 1.0 + 0.1 * b + 0.6 * drafted
        overhead = 0.5 + 0.05 * b
        predicted = model.predict_step_ms(shape)
        model.observe(shape, verify_ms=verify, proposer_ms={"draft": draft} if drafted else {},
                      overhead_ms=overhead, predicted_ms=predicted, measured_ms=verify + draft + overhead)
    assert model.verify.coef == pytest.approx([3.0, 0.5, 0.2, 0.001], rel=0.05, abs=1e-3)
    assert model.proposer("draft").coef == pytest.approx([1.0, 0.1, 0.6], rel=0.05, abs=1e-3)
    assert model.last_relative_error is not None and model.last_relative_error < 0.01
    assert model.relative_error_ema < 0.05
    # The chooser's linear view agrees with the full prediction.
    cost = model.step_cost(4, 800, ["ngram", "draft"], [True, False])
    ks, props = np.array([2, 0, 3, 1]), np.array([1, -1, 1, 0])
    shape = StepShape(4, int(4 + ks.sum()), 800, {"draft": 2}, {"draft": 5})
    assert cost.step_ms(ks, props) == pytest.approx(model.predict_step_ms(shape))


def test_cost_model_error_of_a_bad_prediction():
    model = CostModel()
    model.record_error(predicted_ms=15.0, measured_ms=10.0)
    assert model.last_relative_error == pytest.approx(0.5)

"""The acceptance model's rates against what the chains did (scheduler_svc/policy/rate_calibration.py), alone and in
smartspec."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler_svc.policy.acceptance import MAX_RATE
from scheduler_svc.config import config_from_args
from scheduler_svc.policy import policy_from_config
from scheduler_svc.types import ProposerSpec, RequestOutcome, RequestView, StepRecord
from scheduler_svc.policy.rate_calibration import RateCalibration
from scheduler_svc.policy.smartspec import BatchUniformPolicy, SmartSpecPolicy


def test_a_proposer_never_observed_keeps_the_model_s_rates():
    calibration = RateCalibration(4)
    rates = np.full((2, 4), 0.6)
    assert np.array_equal(calibration.apply("draft", rates), rates)
    assert np.array_equal(calibration.factors("draft"), np.ones(4))
    calibration.observe("draft", [0.6] * 4, proposed=0, accepted=0)  # a failed proposer: nothing verified
    assert np.array_equal(calibration.apply("draft", rates), rates)


def test_only_the_positions_the_verifier_tested_are_counted():
    calibration = RateCalibration(5, prior_hits=1.0, decay=0.0)
    calibration.observe("draft", [0.5] * 5, proposed=5, accepted=2)  # hits at 1 and 2, a miss at 3
    factors = calibration.factors("draft")
    assert factors[:3] == pytest.approx([(1 + 1) / (0.5 + 1), (1 + 1) / (0.5 + 1), (0 + 1) / (0.5 + 1)])
    assert factors[3:].tolist() == [1.0, 1.0]  # never looked at
    calibration.observe("draft", [0.5] * 5, proposed=3, accepted=3)  # all of a short chain: no miss tested
    assert calibration.factors("draft")[2] == pytest.approx((1 + 1) / (1.0 + 1))
    assert calibration.factors("other").tolist() == [1.0] * 5


def test_factors_converge_to_the_ratio_of_hits_to_predicted_rates():
    """The model says 0.6 at every position; the chains hit at 0.8 (iid): each factor tends to 0.8 / 0.6,
    the deep positions (tested less often) more slowly."""
    rng = np.random.default_rng(0)
    calibration = RateCalibration(5, prior_hits=20.0, decay=0.002)
    for _ in range(3000):
        hits = rng.random(5) < 0.8
        accepted = int(np.argmin(hits)) if not hits.all() else 5
        calibration.observe("draft", [0.6] * 5, proposed=5, accepted=accepted)
    assert calibration.factors("draft") == pytest.approx(np.full(5, 0.8 / 0.6), rel=0.06)
    # Applied: scaled, and kept inside the rates' range.
    assert calibration.apply("draft", np.full((1, 5), 0.6)) == pytest.approx(np.full((1, 5), 0.8), rel=0.06)
    assert calibration.apply("draft", np.full((1, 5), 0.9)).max() == MAX_RATE


def test_decay_forgets_old_chains():
    calibration = RateCalibration(1, prior_hits=1.0, decay=0.1)
    for _ in range(200):
        calibration.observe("draft", [0.5], proposed=1, accepted=1)
    assert calibration.factors("draft")[0] == pytest.approx(2.0, rel=0.1)
    for _ in range(200):
        calibration.observe("draft", [0.5], proposed=1, accepted=0)
    assert calibration.factors("draft")[0] == pytest.approx(1 / 6, rel=0.1)  # (0 + 1) / (5 + 1)


def _draft_policy(cls=SmartSpecPolicy):
    policy = cls(["draft"], max_k=4)
    policy.bind_proposers({"draft": ProposerSpec("draft", 8)})
    policy.cost_model.verify.reseed((20.0, 0.1, 0.5, 0.0))
    policy.cost_model.overhead.reseed((0.0, 0.0, 0.0))
    policy.cost_model.proposer("draft").reseed((1.0, 0.2, 0.5))
    return policy


def test_smartspec_scores_the_draft_s_chains_with_calibrated_rates_and_feeds_back_the_model_s():
    policy = _draft_policy()
    rids = [f"r{i}" for i in range(4)]
    for step in range(40):
        plans = policy.plan([RequestView(request_id=rid, proposer="", context_len=50, max_k=100) for rid in rids])
        # Every chain is accepted in full: the model, which starts at the prior, lags behind.
        outcomes = [RequestOutcome(rid, "draft", plans[rid].k, plans[rid].k, plans[rid].k, committed=(1,) * (
            plans[rid].k + 1)) for rid in rids]
        policy.observe(outcomes, StepRecord(step_id=step, start_s=0.0, wall_ms=40.0, verify_total_ms=30.0,
                                            propose_ms={"draft": 5.0}, propose_wall_ms=5.0,
                                            propose_new_tokens={"draft": (3,) * 4}))
    assert all(plans[rid].k > 0 for rid in rids)
    factors = policy.rate_calibration.factors("draft")
    assert factors[0] > 1.0  # chains did better than the model's rates said
    # The rates the chooser scores with are the model's, scaled (before clipping) by those factors.
    policy.plan([RequestView(request_id="r0", proposer="", context_len=50, max_k=100)])
    model = policy._model_rates["draft"]["r0"]
    assert policy.rate_calibration.apply("draft", model[None, :])[0] == pytest.approx(
        np.clip(model * factors, 0.01, MAX_RATE))


def test_batch_uniform_keeps_the_published_rates_and_a_flag_turns_the_calibration_off():
    assert _draft_policy(BatchUniformPolicy).rate_calibration is None
    args = ["--verifier", "127.0.0.1:1", "--proposer", "draft=127.0.0.1:2"]
    assert policy_from_config(config_from_args(args), ["draft"]).rate_calibration is not None  # the default
    policy = policy_from_config(config_from_args(args + ["--rate-calibration", "0"]), ["draft"])
    assert policy.rate_calibration is None
    policy.bind_proposers({"draft": ProposerSpec("draft", 8)})
    plans = policy.plan([RequestView(request_id="r", proposer="", context_len=50, max_k=100)])
    assert plans["r"].proposer == "draft" and policy._model_rates == {}  # planned from the estimates alone

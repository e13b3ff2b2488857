"""Acceptance by the distance from the last miss (scheduler_svc/policy/chain_calibration.py), alone and in smartspec."""

from __future__ import annotations

import numpy as np
import pytest

from bench import chain_phase
from scheduler_svc.policy.chain_calibration import ChainCalibration

MODEL = np.full((1, 4), 0.6)


def test_a_request_without_chains_keeps_the_position_model():
    calibration = ChainCalibration(4)
    assert np.array_equal(calibration.rates(["r"], "draft", MODEL), MODEL)
    calibration.skip("r", "draft", 3)  # no record yet: nothing to age
    assert calibration.tracked == 0


def test_a_miss_lowers_its_age_and_the_next_chain_starts_after_it():
    calibration = ChainCalibration(4, prior_tests=4.0, decay=0.0)
    calibration.observe("r", "draft", k=4, accepted=2)  # ages 1, 2 accepted, age 3 rejected
    rates = calibration.rates(["r"], "draft", MODEL)[0]
    # The next chain starts right after the miss: its positions are ages 1..4 again.
    assert rates[0] == pytest.approx((1 + 4 * 0.6) / 5)
    assert rates[1] == pytest.approx((1 + 4 * 0.6) / 5)
    assert rates[2] == pytest.approx((0 + 4 * 0.6) / 5)
    assert rates[3] == pytest.approx(0.6)  # age 4 was never tested
    assert np.array_equal(calibration.rates(["other"], "draft", MODEL), MODEL)
    assert np.array_equal(calibration.rates(["r"], "ngram", MODEL), MODEL)


def test_a_full_chain_ages_the_text_past_its_unseen_bonus_token():
    calibration = ChainCalibration(4, prior_tests=4.0, decay=0.0)
    calibration.observe("r", "draft", k=4, accepted=1)  # age 2 missed: restart
    calibration.observe("r", "draft", k=1, accepted=1)  # age 1 accepted, the bonus is age 2 (unseen)
    rates = calibration.rates(["r"], "draft", MODEL)[0]
    # The next chain's positions are ages 3, 4, 5, 6, none of them tested yet.
    assert np.allclose(rates, 0.6)
    calibration.observe("r", "draft", k=4, accepted=0)  # age 3 missed
    calibration.skip("r", "draft", 2)  # two tokens without the draft: the next chain starts at age 3
    rates = calibration.rates(["r"], "draft", MODEL)[0]
    assert rates[0] == pytest.approx((0 + 4 * 0.6) / 5)  # age 3: one miss
    assert np.allclose(rates[1:], 0.6)


def test_ages_beyond_the_last_share_its_count_and_counts_decay():
    calibration = ChainCalibration(2, ages=3, prior_tests=1.0, decay=0.5)
    calibration.observe("r", "draft", k=2, accepted=2)  # ages 1, 2 accepted; now age 3
    calibration.observe("r", "draft", k=2, accepted=1)  # ages 4 -> 3 (accepted) and 5 -> 3 (missed)
    rates = calibration.rates(["r"], "draft", np.full((1, 2), 0.5))[0]
    # Age 1 after one decay: tested 0.5, accepted 0.5 -> (0.5 + 0.5) / 1.5.
    assert rates[0] == pytest.approx(1.0 / 1.5)
    calibration.skip("r", "draft", 10)  # stays in the last bucket
    rates = calibration.rates(["r"], "draft", np.full((1, 2), 0.5))[0]
    assert rates[0] == pytest.approx((1 + 0.5) / (2 + 1))  # age 3: tested 2, accepted 1
    calibration.forget(["someone else"])
    assert calibration.tracked == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        ChainCalibration(4, prior_tests=0.0)
    with pytest.raises(ValueError):
        ChainCalibration(4, decay=1.0)


# -- in the policy: chains replayed over a text whose draft misses are known (bench/chain_phase.py) ------

# Where the embedded draft misses the embedded target's greedy text, token by token (x), for
# bench/step_overhead.py's prompt: irregular at first, then a miss every 6 tokens (a repeated line).
REPEATED_LINES = ("...x.x.x.......x..x.....x..xx........x.........x.....x...x.x.x....."
                  + "x....." * 10 + "x")


def _goodput(misses: list[bool], by_age: bool) -> float:
    """Committed tokens per cost-model ms of one request served over `misses` by smartspec."""
    costs = chain_phase.COSTS["fitted here"]
    return len(misses) / chain_phase.replay(misses, costs, chain_phase.make_policy(costs, by_age))


def test_smartspec_finds_where_chains_should_end_on_repeated_lines():
    misses = [c == "x" for c in REPEATED_LINES]
    # By position alone, the chooser alternates chains that stop short of the miss and chains that run
    # into it; by age it learns that the 6th token after a miss is the one to leave to the bonus.
    assert _goodput(misses, by_age=True) > 1.15 * _goodput(misses, by_age=False)


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.9])
def test_smartspec_by_age_costs_nothing_where_misses_are_independent(rate):
    misses = (np.random.default_rng(7).random(600) > rate).tolist()
    assert _goodput(misses, by_age=True) > 0.97 * _goodput(misses, by_age=False)

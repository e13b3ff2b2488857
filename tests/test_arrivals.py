"""The arrival-rate estimate (scheduler_svc/policy/arrivals.py)."""

from __future__ import annotations

import pytest

from scheduler_svc.policy.arrivals import ArrivalRate


def test_counts_arrivals_in_the_window_and_falls_back_to_zero_when_they_stop():
    rate = ArrivalRate(window_s=0.5)
    assert rate.per_ms(100.0) == 0.0
    for i in range(8):  # 16 per second for half a second
        rate.observe(100.0 + i / 16)
    assert rate.per_ms(100.0 + 7 / 16) == pytest.approx(8 / 500)
    assert rate.per_ms(100.7) == pytest.approx(4 / 500)  # only those after 100.2 remain (i = 4..7)
    assert rate.per_ms(101.0) == 0.0


def test_a_zero_window_ignores_arrivals_and_a_negative_one_is_refused():
    rate = ArrivalRate(window_s=0.0)
    rate.observe(1.0)
    assert rate.per_ms(1.0) == 0.0
    with pytest.raises(ValueError, match="arrival-window-s"):
        ArrivalRate(window_s=-1.0)

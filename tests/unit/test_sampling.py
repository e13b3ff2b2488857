"""specdec.model.sampling: filtered target distributions and position-seeded draws.

Statistical checks use Pearson's chi-square at significance alpha = 0.001 with critical values from
the chi-square table (df 4: 18.467, df 24: 51.179). Draws are seeded, so each check is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from specdec.model.sampling import (
    STREAM_ACCEPT,
    STREAM_TARGET,
    SamplingParams,
    position_generator,
    sample,
    target_probs,
)

CHI2_CRITICAL_0_001 = {4: 18.467, 24: 51.179}


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs.double() * observed.sum()
    return float(((observed.double() - expected) ** 2 / expected).sum())


def log_probs(*p: float) -> torch.Tensor:
    return torch.tensor(p).log()[None, :]  # [1, V]


def test_temperature_zero_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0]])
    probs = target_probs(logits, temperature=0.0, top_p=0.1, top_k=1)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_temperature_scales_logits():
    probs = target_probs(torch.tensor([[0.0, math.log(2.0)]]), temperature=0.5)
    torch.testing.assert_close(probs, torch.tensor([[0.2, 0.8]]))


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, 1e30, 3.4e38])
def test_extreme_but_valid_temperatures_give_a_distribution(temperature):
    # logits / 1e-40 overflows to inf and softmax(inf, inf) is NaN: the row maximum is shifted out first.
    logits = torch.tensor([[3.0, 9.5, -2.0, 9.0], [0.0, 0.0, 1.0, -50.0]])
    probs = target_probs(logits, temperature=temperature, top_p=0.95, top_k=3)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    if temperature < 1e-6:  # as cold as greedy
        assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    for row in probs:
        assert row[sample(row, position_generator(7, 3))] > 0


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (0, 1.0, [0.1, 0.4, 0.2, 0.3]),
        (2, 1.0, [0.0, 4 / 7, 0.0, 3 / 7]),
        (3, 1.0, [0.0, 4 / 9, 2 / 9, 3 / 9]),
        (0, 0.5, [0.0, 4 / 7, 0.0, 3 / 7]),  # 0.4 < 0.5, so the second token is needed too
        (0, 0.75, [0.0, 4 / 9, 2 / 9, 3 / 9]),
        (0, 0.3, [0.0, 1.0, 0.0, 0.0]),
        # top-k first: {0.4, 0.3} renormalised is {0.571, 0.429}, and 0.571 alone reaches 0.5.
        # (top-p first would have kept both tokens.)
        (2, 0.5, [0.0, 1.0, 0.0, 0.0]),
        (3, 0.6, [0.0, 4 / 7, 0.0, 3 / 7]),
    ],
)
def test_top_k_then_top_p(top_k, top_p, expected):
    probs = target_probs(log_probs(0.1, 0.4, 0.2, 0.3), temperature=1.0, top_p=top_p, top_k=top_k)
    torch.testing.assert_close(probs, torch.tensor([expected]))


def test_filtering_is_per_row():
    logits = torch.cat([log_probs(0.1, 0.4, 0.2, 0.3), log_probs(0.5, 0.05, 0.05, 0.4)])
    probs = target_probs(logits, temperature=1.0, top_k=2)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7], [5 / 9, 0.0, 0.0, 4 / 9]]))


@pytest.mark.parametrize(
    "params", [SamplingParams(-0.1), SamplingParams(1.0, top_p=0.0), SamplingParams(1.0, top_p=1.5),
               SamplingParams(1.0, top_k=-1), SamplingParams(float("nan"))]
)
def test_invalid_params_are_rejected(params):
    with pytest.raises(ValueError):
        params.validate()


def test_same_seed_and_position_give_same_token():
    probs = torch.full((50,), 1 / 50)
    for seed, position in [(0, 0), (7, 3), (2**64 - 1, 1023)]:
        draws = {sample(probs, position_generator(seed, position)) for _ in range(5)}
        assert len(draws) == 1


def test_seed_position_and_stream_all_change_the_draw():
    probs = torch.full((1000,), 1 / 1000)
    base = [sample(probs, position_generator(1, t)) for t in range(20)]
    other_seed = [sample(probs, position_generator(2, t)) for t in range(20)]
    other_stream = [sample(probs, position_generator(1, t, STREAM_ACCEPT)) for t in range(20)]
    # With 1000 equally likely tokens, a handful of coincidences at most.
    assert sum(a == b for a, b in zip(base, other_seed)) <= 2
    assert sum(a == b for a, b in zip(base, other_stream)) <= 2
    assert len(set(base)) >= 18  # positions give different draws


def test_draws_over_positions_follow_the_distribution_independently():
    """Across positions of one seed, draws follow probs and consecutive draws are independent."""
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    n = 5000
    draws = torch.tensor([sample(probs, position_generator(123, t, STREAM_TARGET)) for t in range(n + 1)])
    counts = torch.bincount(draws[:n], minlength=5)
    assert chi_square(counts, probs) < CHI2_CRITICAL_0_001[4]
    pairs = torch.bincount(draws[:n] * 5 + draws[1:], minlength=25)
    assert chi_square(pairs, torch.outer(probs, probs).flatten()) < CHI2_CRITICAL_0_001[24]


def test_chi_square_check_detects_a_wrong_distribution():
    """The statistic used above does reject draws from another distribution (the check can fail)."""
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    wrong = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    draws = torch.tensor([sample(wrong, position_generator(5, t)) for t in range(5000)])
    assert chi_square(torch.bincount(draws, minlength=5), probs) > CHI2_CRITICAL_0_001[4]


def test_sample_never_picks_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    draws = {sample(probs, position_generator(9, t)) for t in range(500)}
    assert draws == {1, 3}
    one_hot = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    assert {sample(one_hot, position_generator(s, 0)) for s in range(200)} == {4}

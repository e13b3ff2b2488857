"""specdec.model.verification: greedy on hand-made logits; the sampled rules are lossless.

Losslessness: on a 5-token vocabulary with fixed target distributions per context, each rule drives a
tiny generation (one verification step, then plain decoding if it emitted a single token) over
N_TRIALS seeds. The empirical distribution of the first emitted token and of the first two emitted
tokens must equal the target's exact distribution: Pearson's chi-square statistic is compared with
the chi-square critical value at significance alpha = 0.001 for the number of non-empty cells - 1
degrees of freedom (table below, e.g. df 4: 18.467, df 24: 51.179). Seeds are 0..N_TRIALS-1 and the
draft RNG is seeded, so every run sees the same draws. A deliberately biased rejection sampler
(bonus drawn from p instead of norm(max(p - q, 0))) must fail the same check.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from specdec.model.sampling import STREAM_ACCEPT, STREAM_TARGET, SamplingParams, position_generator, sample, target_probs
from specdec.model.sampling import uniform
from specdec.model.verification import Verdict, children_of, is_chain, verify_greedy, verify_rejection, verify_sampled
from specdec.model.verification import verify_step
from specdec.testing import chi_square_passes

N_TRIALS = 20000
V = 5
START = 10  # absolute position of the first new token

# Target: P1 after the prompt, P2[a] after the prompt + token a, P3 deeper (never reaches the first two tokens).
P1 = torch.tensor([0.35, 0.25, 0.20, 0.12, 0.08], dtype=torch.float64)
P2 = torch.tensor(
    [
        [0.10, 0.40, 0.20, 0.20, 0.10],
        [0.30, 0.10, 0.30, 0.15, 0.15],
        [0.20, 0.20, 0.20, 0.20, 0.20],
        [0.50, 0.10, 0.10, 0.10, 0.20],
        [0.05, 0.15, 0.25, 0.25, 0.30],
    ],
    dtype=torch.float64,
)
P3 = torch.tensor([0.2, 0.3, 0.1, 0.3, 0.1], dtype=torch.float64)
# Draft: deliberately unlike the target so that rejections and residual draws matter.
Q1 = torch.tensor([0.10, 0.10, 0.20, 0.30, 0.30], dtype=torch.float64)
Q2 = torch.tensor(
    [
        [0.30, 0.10, 0.20, 0.20, 0.20],
        [0.10, 0.40, 0.10, 0.20, 0.20],
        [0.20, 0.20, 0.20, 0.20, 0.20],
        [0.10, 0.10, 0.40, 0.30, 0.10],
        [0.25, 0.25, 0.20, 0.20, 0.10],
    ],
    dtype=torch.float64,
)
L1, L2, L3 = P1.log().float(), P2.log().float(), P3.log().float()


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tensors here are tiny: intra-op threads only add synchronisation (ms per op on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def node_logits(tokens: list[int], parents: list[int]) -> torch.Tensor:
    """[1 + m, V] target logits of a candidate tree: root -> P1, depth-0 node carrying a -> P2[a], deeper -> P3."""
    rows = [L1]
    for tok, parent in zip(tokens, parents):
        rows.append(L2[tok] if parent == -1 else L3)
    return torch.stack(rows)




Step = Callable[[int], Verdict]  # seed -> verdict of the first step


def first_two_tokens(step: Step, seed: int, params: SamplingParams) -> tuple[int, int]:
    """First two generated tokens: one verification step, then plain decoding (an empty tree) if needed."""
    emitted = step(seed).emitted
    if len(emitted) < 2:
        plain = verify_sampled(L2[emitted[0]][None, :], [], [], params, seed, START + 1)
        emitted = emitted + plain.emitted
    return emitted[0], emitted[1]


def expected_distributions(params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact target distribution of the first token [V] and of the first two tokens [V, V]."""
    first = target_probs(L1[None, :], params.temperature, params.top_p, params.top_k)[0].double()
    second = target_probs(L2, params.temperature, params.top_p, params.top_k).double()
    return first, first[:, None] * second


def run_trials(step: Step, params: SamplingParams, n: int = N_TRIALS) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = torch.tensor([first_two_tokens(step, seed, params) for seed in range(n)])
    first = torch.bincount(pairs[:, 0], minlength=V)
    both = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).view(V, V)
    return first, both


def assert_lossless(step: Step, params: SamplingParams, n: int = N_TRIALS) -> None:
    first, both = run_trials(step, params, n)
    expected_first, expected_both = expected_distributions(params)
    ok, stat, df = chi_square_passes(first, expected_first)
    assert ok, f"first token: chi2 {stat:.1f} (df {df}), counts {first.tolist()} vs {expected_first.tolist()}"
    ok, stat, df = chi_square_passes(both, expected_both)
    assert ok, f"first two tokens: chi2 {stat:.1f} (df {df})"


def deterministic_step(tokens: list[int], parents: list[int], params: SamplingParams) -> Step:
    logits = node_logits(tokens, parents)
    return lambda seed: verify_sampled(logits, tokens, parents, params, seed, START)


def rejection_step(params: SamplingParams, rule=verify_rejection) -> Step:
    """A 2-token draft chain x0 ~ Q1, x1 ~ Q2[x0], drawn from its own seeded RNG, checked by `rule`."""
    rng = np.random.default_rng(2024)
    q1, q2 = Q1.numpy(), Q2.numpy()
    logits = {a: node_logits([a, 0], [-1, 0]) for a in range(V)}

    def step(seed: int) -> Verdict:
        x0 = int(rng.choice(V, p=q1))
        x1 = int(rng.choice(V, p=q2[x0]))
        draft = torch.stack([Q1, Q2[x0]])
        return rule(logits[x0], [x0, x1], draft, params, seed, START)

    return step


def biased_rejection(logits, tokens, draft_probs, params, seed, start_position) -> Verdict:
    """A classic bug: after a rejection, the bonus is drawn from p rather than norm(max(p - q, 0))."""
    p = target_probs(logits, params.temperature, params.top_p, params.top_k).double()
    q = draft_probs.double()
    for i, x in enumerate(tokens):
        if uniform(position_generator(seed, start_position + i, STREAM_ACCEPT)) * q[i, x] >= p[i, x]:
            bonus = sample(p[i], position_generator(seed, start_position + i, STREAM_TARGET))
            return Verdict(list(range(i)), list(tokens[:i]), bonus)
    m = len(tokens)
    return Verdict(list(range(m)), list(tokens), sample(p[m], position_generator(seed, start_position + m)))


# -- tree helpers and greedy --------------------------------------------------------------------


def one_hot_logits(argmaxes: list[int], vocab: int = 10) -> torch.Tensor:
    """[len, vocab] logits whose row i has its maximum at argmaxes[i] (and a runner-up elsewhere)."""
    logits = torch.randn(len(argmaxes), vocab, generator=torch.Generator().manual_seed(0))
    for i, a in enumerate(argmaxes):
        logits[i, a] = 10.0
    return logits


def test_children_and_chain_detection():
    assert children_of([-1, 0, -1, 1]) == [[0, 2], [1], [3], [], []]
    assert is_chain([]) and is_chain([-1, 0, 1]) and not is_chain([-1, -1]) and not is_chain([-1, 0, 0])


def test_greedy_chain_partial_acceptance():
    # Candidates 3, 1, 4; the target wants 3, 1, then 2.
    verdict = verify_greedy(one_hot_logits([3, 1, 2, 7]), [3, 1, 4], [-1, 0, 1])
    assert verdict == Verdict([0, 1], [3, 1], 2)


def test_greedy_chain_full_acceptance_takes_bonus_after_last():
    verdict = verify_greedy(one_hot_logits([3, 1, 4, 7]), [3, 1, 4], [-1, 0, 1])
    assert verdict == Verdict([0, 1, 2], [3, 1, 4], 7)


def test_greedy_rejects_first_candidate():
    verdict = verify_greedy(one_hot_logits([6, 1, 4]), [3, 1], [-1, 0])
    assert verdict == Verdict([], [], 6)


def test_greedy_without_candidates_is_argmax():
    assert verify_greedy(one_hot_logits([8]), [], []) == Verdict([], [], 8)


def test_greedy_tree_accepts_second_branch():
    # Root children: node 0 (token 5) and node 1 (token 7); node 2 (token 8) under node 1; node 3 (token 2) under 0.
    tokens, parents = [5, 7, 8, 2], [-1, -1, 1, 0]
    logits = one_hot_logits([7, 2, 8, 9, 0])  # root wants 7 -> node 1; node 1 wants 8 -> node 2; then 9
    assert verify_greedy(logits, tokens, parents) == Verdict([1, 2], [7, 8], 9)


def test_greedy_tree_first_branch_and_deep_stop():
    tokens, parents = [5, 7, 8, 2], [-1, -1, 1, 0]
    logits = one_hot_logits([5, 2, 0, 0, 4])  # root wants 5 -> node 0; node 0 wants 2 -> node 3; then 4
    assert verify_greedy(logits, tokens, parents) == Verdict([0, 3], [5, 2], 4)


def test_verify_step_dispatch():
    logits = one_hot_logits([3, 1, 2])
    greedy = SamplingParams(0.0)
    assert verify_step(logits, [3, 1], [-1, 0], greedy, 0, START) == Verdict([0, 1], [3, 1], 2)
    # Greedy ignores draft distributions, sampling with them refuses trees.
    assert verify_step(logits, [3, 1], [-1, 0], greedy, 0, START, torch.full((2, 10), 0.1)).bonus_token == 2
    with pytest.raises(ValueError, match="chains only"):
        verify_step(logits, [3, 1], [-1, -1], SamplingParams(1.0), 0, START, torch.full((2, 10), 0.1))


# -- sampled rules -----------------------------------------------------------------------------


def test_sampled_rule_reproduces_plain_sampling_token_for_token():
    """With candidates equal to what plain sampling draws, every candidate is accepted and the bonus is
    the plain draw after them: output does not depend on speculation."""
    params = SamplingParams(1.0)
    for seed in range(100):
        a = sample(P1, position_generator(seed, START))
        b = sample(P2[a], position_generator(seed, START + 1))
        c = sample(P3, position_generator(seed, START + 2))
        # A tree whose right branch is the path plain sampling takes.
        tokens, parents = [(a + 1) % V, a, b], [-1, -1, 1]
        verdict = verify_sampled(node_logits(tokens, parents), tokens, parents, params, seed, START)
        assert verdict == Verdict([1, 2], [a, b], c)


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_p=0.9, top_k=4)])
def test_deterministic_chain_is_lossless(params):
    assert_lossless(deterministic_step([0, 1, 2], [-1, 0, 1], params), params)


def test_deterministic_tree_is_lossless():
    # Root children carry tokens 1 and 3; node 0 has children 0 and 2, node 1 has child 4.
    params = SamplingParams(1.0)
    assert_lossless(deterministic_step([1, 3, 0, 2, 4], [-1, -1, 0, 0, 1], params), params)


def test_rejection_sampling_is_lossless():
    params = SamplingParams(1.0)
    assert_lossless(rejection_step(params), params)


def test_biased_rejection_sampler_fails_the_same_check():
    params = SamplingParams(1.0)
    first, _ = run_trials(rejection_step(params, rule=biased_rejection), params, n=5000)
    ok, stat, df = chi_square_passes(first, expected_distributions(params)[0])
    assert not ok, f"biased rule passed: chi2 {stat:.1f} (df {df})"


def test_rejection_accepts_everything_when_draft_equals_target():
    params = SamplingParams(1.0)
    for seed in range(50):
        verdict = verify_rejection(node_logits([2, 0], [-1, 0]), [2, 0], torch.stack([P1, P2[2]]), params, seed, START)
        assert verdict.accepted_indices == [0, 1]


def test_rejection_never_accepts_a_token_the_target_excludes():
    # top_k=2 keeps tokens 0 and 1 at the root; a draft token 4 must always be rejected.
    params = SamplingParams(1.0, top_k=2)
    for seed in range(50):
        verdict = verify_rejection(node_logits([4], [-1]), [4], Q1[None, :], params, seed, START)
        assert verdict.accepted_indices == [] and verdict.bonus_token in (0, 1)

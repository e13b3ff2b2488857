"""Verification rules: which speculated tokens the target keeps, and the bonus token after them.

Every rule sees one request's step: `logits` [1 + m, V] for the tree nodes, row 0 being the root
(the pending token, whose logits give the distribution of the first new token) and row j + 1 being
candidate node j; the candidate tree as `tokens` [m] and `parents` [m] (parents[j] is the index of
node j's parent among the candidates, -1 = child of the root, parents before children). A rule
returns the accepted root path and the bonus token sampled after it.

Random draws are position-seeded (see specdec.model.sampling): the token chosen after the root has
absolute position `start_position`; the one chosen after a node at depth d (depth 0 = child of the
root) has position start_position + d + 1.

All three rules are exact: greedy output equals the target's argmax sequence, sampled output has the
target's distribution (tests/unit/test_verification.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.model.sampling import (
    STREAM_ACCEPT,
    STREAM_RESIDUAL,
    STREAM_TARGET,
    SamplingParams,
    position_generator,
    sample,
    target_probs,
    uniform,
)


@dataclass(frozen=True)
class Verdict:
    """One request's step outcome: accepted candidates (a root path) then the bonus token."""

    accepted_indices: list[int]  # indices into the candidate tokens, root to leaf
    accepted_tokens: list[int]
    bonus_token: int

    @property
    def emitted(self) -> list[int]:
        return [*self.accepted_tokens, self.bonus_token]


def children_of(parents: Sequence[int]) -> list[list[int]]:
    """children[0] lists the root's children, children[j + 1] those of candidate node j (in index order)."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for j, p in enumerate(parents):
        children[p + 1].append(j)
    return children


def is_chain(parents: Sequence[int]) -> bool:
    """True when the tree is a single path -1, 0, 1, ..., m - 2 (also for m = 0)."""
    return all(p == j - 1 for j, p in enumerate(parents))


def _verdict(path: list[int], tokens: Sequence[int], bonus: int) -> Verdict:
    return Verdict(path, [int(tokens[j]) for j in path], int(bonus))


def verify_greedy(logits: torch.Tensor, tokens: Sequence[int], parents: Sequence[int]) -> Verdict:
    """Longest root path whose every token is the target argmax after its prefix; bonus = argmax after it.

    logits: [1 + m, V]. Among siblings carrying the same token the first is taken.
    """
    best = logits.argmax(-1).tolist()  # [1 + m], one device sync
    children = children_of(parents)
    path: list[int] = []
    row = 0
    while True:
        nxt = next((c for c in children[row] if tokens[c] == best[row]), None)
        if nxt is None:
            return _verdict(path, tokens, best[row])
        path.append(nxt)
        row = nxt + 1


def verify_sampled(
    logits: torch.Tensor,
    tokens: Sequence[int],
    parents: Sequence[int],
    params: SamplingParams,
    seed: int,
    start_position: int,
) -> Verdict:
    """Deterministic candidates (chain or tree): sample y from the target at each node on the path;
    descend into the child carrying y, else y is the bonus.

    logits: [1 + m, V]. Exact because y is exactly what plain sampling would draw at that position;
    the candidates only decide how many of those draws one forward pass can vouch for.
    """
    probs = target_probs(logits, params.temperature, params.top_p, params.top_k).cpu()  # [1 + m, V]
    children = children_of(parents)
    path: list[int] = []
    row = 0
    while True:
        y = sample(probs[row], position_generator(seed, start_position + len(path), STREAM_TARGET))
        nxt = next((c for c in children[row] if tokens[c] == y), None)
        if nxt is None:
            return _verdict(path, tokens, y)
        path.append(nxt)
        row = nxt + 1


def verify_rejection(
    logits: torch.Tensor,
    tokens: Sequence[int],
    draft_probs: torch.Tensor,
    params: SamplingParams,
    seed: int,
    start_position: int,
) -> Verdict:
    """Sampled draft chain with its distributions: standard speculative rejection sampling.

    logits: [1 + m, V]; tokens: [m], a chain, tokens[i] drawn from draft_probs[i]; draft_probs: [m, V]
    (rows need not be normalised). Accept x_i with probability min(1, p(x_i) / q(x_i)); at the first
    rejection the bonus comes from norm(max(p - q, 0)); after a full acceptance, from p.
    """
    p = target_probs(logits, params.temperature, params.top_p, params.top_k).to("cpu", torch.float64)  # [1+m, V]
    q = draft_probs.to("cpu", torch.float64)
    q = q / q.sum(-1, keepdim=True)  # [m, V]
    for i, x in enumerate(tokens):
        position = start_position + i
        # u < p/q, written without a division so that q(x) = 0 accepts exactly when p(x) > 0.
        if uniform(position_generator(seed, position, STREAM_ACCEPT)) * q[i, x] < p[i, x]:
            continue
        residual = (p[i] - q[i]).clamp_(min=0.0)
        if residual.sum() <= 0:  # p == q up to rounding: a rejection had probability ~0
            residual = p[i]
        bonus = sample(residual, position_generator(seed, position, STREAM_RESIDUAL))
        return _verdict(list(range(i)), tokens, bonus)
    m = len(tokens)
    bonus = sample(p[m], position_generator(seed, start_position + m, STREAM_TARGET))
    return _verdict(list(range(m)), tokens, bonus)


def verify_step(
    logits: torch.Tensor,
    tokens: Sequence[int],
    parents: Sequence[int],
    params: SamplingParams,
    seed: int,
    start_position: int,
    draft_probs: torch.Tensor | None = None,
) -> Verdict:
    """Pick the rule for one request's step: greedy, rejection sampling (draft_probs [m, V] given, chain
    only), or the deterministic-candidate rule. logits: [1 + m, V]."""
    if params.greedy:
        return verify_greedy(logits, tokens, parents)
    if draft_probs is not None and len(tokens) > 0:
        if not is_chain(parents):
            raise ValueError("draft distributions are supported for chains only, not trees")
        return verify_rejection(logits, tokens, draft_probs, params, seed, start_position)
    return verify_sampled(logits, tokens, parents, params, seed, start_position)

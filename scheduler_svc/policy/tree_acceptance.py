"""Acceptance of candidate trees, tracked per (depth, rank): the expected gain of every node of a tree.

A tree proposer (Medusa heads) orders each node's children best first, so a node is described by its
depth d (1 = follows the pending token) and its rank r among its siblings (0 = its parent's best guess).
What is estimated is the conditional rate a[d, r]: the chance that a node is accepted given that its
parent was (a root's parent, the pending token, always is). Siblings exclude each other, so the rates of
one parent's children add up to at most 1; they are estimated each on its own all the same.

The expected gain of node j is the chance that its whole path is accepted, prod a[d, r] along the path;
a tree's expected accepted length is the sum over its nodes, and the gains of its first n nodes, added
up, are what keeping n nodes is worth. A chain is the tree whose nodes all have rank 0.

Evidence comes from comparing a tree with the tokens a step committed (accepted + bonus): walking down
from the root, a node was tested when its parent was on the matched path, and accepted when its token
is the committed token at its depth. That holds for the verified tree and, for a proposer that proposes
the same tree whatever is verified, for the full tree it offered before the plan cut it down.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

MIN_RATE = 0.005
MAX_RATE = 0.99


def depths_and_ranks(parents: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per node: depth (1 for roots) and rank among its siblings (order of appearance, 0 first)."""
    depth = np.zeros(len(parents), dtype=int)
    rank = np.zeros(len(parents), dtype=int)
    children: dict[int, int] = {}
    for j, p in enumerate(parents):
        depth[j] = 1 if p < 0 else depth[p] + 1
        rank[j] = children.get(p, 0)
        children[p] = rank[j] + 1
    return depth, rank


def matched_nodes(tokens: Sequence[int], parents: Sequence[int], committed: Sequence[int]) -> tuple[list[int], list[int]]:
    """(tested nodes, accepted path) of a tree against the tokens a step committed (accepted + bonus).

    Only depths with a committed token to compare with count: a node deeper than the committed tokens
    was never tested.
    """
    tested: list[int] = []
    path: list[int] = []
    current = -1
    for depth in range(len(committed)):
        kids = [j for j, p in enumerate(parents) if p == current]
        if not kids:
            break
        tested.extend(kids)
        hit = next((j for j in kids if tokens[j] == committed[depth]), None)
        if hit is None:
            break
        path.append(hit)
        current = hit
    return tested, path


class TreeAcceptance:
    """Per proposer, EMA estimates of a[d, r] for d in 1..max_depth, r in 0..max_rank-1 (deeper or
    later-ranked nodes share the last row/column)."""

    def __init__(self, max_depth: int = 8, max_rank: int = 8, *, alpha: float = 0.05,
                 initial_rate: float = 0.5) -> None:
        self.max_depth = max_depth
        self.max_rank = max_rank
        self.alpha = alpha
        # Before any evidence: the best guess as likely as not, later ranks less and less likely.
        self.initial = np.clip(initial_rate / (1.0 + np.arange(max_rank))[None, :].repeat(max_depth, 0),
                               MIN_RATE, MAX_RATE)
        self._rates: dict[str, np.ndarray] = {}

    def rates(self, proposer: str) -> np.ndarray:
        """a[d - 1, r] for one proposer [max_depth, max_rank]."""
        table = self._rates.get(proposer)
        if table is None:
            table = self._rates[proposer] = self.initial.copy()
        return table

    def ordered_rates(self, proposer: str) -> np.ndarray:
        """The rates the gains use: a[d, r] capped by every earlier rank's, a[d, r] <= a[d, r'] for r' < r.

        Children come best first, so a later rank is never expected to do better. The cap also carries
        the evidence to ranks a proposer never offers (heads with top-4 children leave ranks 4..7 untested):
        left at their initial rates, those would promise gains that never come, step after step."""
        return np.minimum.accumulate(self.rates(proposer), axis=1)

    def node_gains(self, proposer: str, parents: Sequence[int]) -> np.ndarray:
        """P(the path to node j is accepted) for every node of a tree [n]."""
        depth, rank = depths_and_ranks(parents)
        table = self.ordered_rates(proposer)
        rate = table[np.minimum(depth, self.max_depth) - 1, np.minimum(rank, self.max_rank - 1)]
        gains = np.empty(len(parents))
        for j, p in enumerate(parents):
            gains[j] = rate[j] * (gains[p] if p >= 0 else 1.0)
        return gains

    def best_tree_gains(self, proposer: str, n: int) -> np.ndarray:
        """Node gains of the best n-node tree the rates allow, best first [n]: what a best-first tree
        proposer is expected to build when its tree is not known before the plan."""
        table = self.ordered_rates(proposer)
        gains: list[float] = []
        # Frontier of (-gain, depth) of nodes not taken yet; taking a node opens its children. Gains
        # shrink along a path, so the n best nodes always form a tree.
        frontier = [(-table[0, r], 1) for r in range(self.max_rank)]
        heapq.heapify(frontier)
        while frontier and len(gains) < n:
            neg, d = heapq.heappop(frontier)
            gains.append(-neg)
            if d < self.max_depth:
                for r in range(self.max_rank):
                    heapq.heappush(frontier, (neg * table[d, r], d + 1))
        return np.asarray(gains)

    def observe(self, proposer: str, tokens: Sequence[int], parents: Sequence[int],
                committed: Sequence[int]) -> None:
        """Fold in one step's evidence about one tree against the tokens the step committed."""
        tested, path = matched_nodes(tokens, parents, committed)
        self._update(proposer, parents, tested, path)

    def observe_verified(self, proposer: str, parents: Sequence[int], accepted: Sequence[int]) -> None:
        """Fold in a verified tree's outcome: its accepted path (node indices, root first)."""
        on_path = {-1, *accepted}
        deepest = len(accepted)
        depth, _ = depths_and_ranks(parents)
        tested = [j for j, p in enumerate(parents) if p in on_path and depth[j] <= deepest + 1]
        self._update(proposer, parents, tested, list(accepted))

    def _update(self, proposer: str, parents: Sequence[int], tested: Sequence[int], path: Sequence[int]) -> None:
        if not tested:
            return
        depth, rank = depths_and_ranks(parents)
        table = self.rates(proposer)
        accepted = set(path)
        for j in tested:
            d, r = min(depth[j], self.max_depth) - 1, min(rank[j], self.max_rank - 1)
            table[d, r] += self.alpha * ((1.0 if j in accepted else 0.0) - table[d, r])
        np.clip(table, MIN_RATE, MAX_RATE, out=table)

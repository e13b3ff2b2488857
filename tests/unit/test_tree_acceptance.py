"""Tree acceptance estimates per (depth, rank), the engine's tree fitting, and smartspec's tree budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scheduler_svc.types import Candidates, ProposerSpec, RequestView
from scheduler_svc.policy.smartspec import SmartSpecPolicy
from scheduler_svc.policy.tree_acceptance import TreeAcceptance, depths_and_ranks, matched_nodes

# A tree: roots 0 (a) and 1 (b); 0's children 2 (c) and 3 (d); 2's child 4 (e).
TOKENS = (10, 11, 12, 13, 14)
PARENTS = (-1, -1, 0, 0, 2)


def test_depths_and_ranks():
    depth, rank = depths_and_ranks(PARENTS)
    assert depth.tolist() == [1, 1, 2, 2, 3]
    assert rank.tolist() == [0, 1, 0, 1, 0]


def test_matched_nodes_walks_the_committed_tokens():
    # Committed: a, d, then a bonus: roots tested, a accepted, its children tested, d accepted.
    tested, path = matched_nodes(TOKENS, PARENTS, (10, 13, 99))
    assert path == [0, 3] and sorted(tested) == [0, 1, 2, 3]
    # Nothing matches: only the roots were tested.
    assert matched_nodes(TOKENS, PARENTS, (77,)) == ([0, 1], [])
    # Only as deep as there are committed tokens: a matched, no token left to test its children with.
    assert matched_nodes(TOKENS, PARENTS, (10,)) == ([0, 1], [0])


def test_node_gains_are_path_products():
    est = TreeAcceptance(max_depth=4, max_rank=4)
    table = est.rates("m")
    table[:] = 0.0
    table[0, 0], table[0, 1], table[1, 0], table[1, 1], table[2, 0] = 0.8, 0.1, 0.5, 0.2, 0.4
    gains = est.node_gains("m", PARENTS)
    assert gains == pytest.approx([0.8, 0.1, 0.4, 0.16, 0.16])


def test_best_tree_gains_match_brute_force():
    rng = np.random.default_rng(0)
    est = TreeAcceptance(max_depth=3, max_rank=3)
    for _ in range(20):
        est.rates("m")[:] = rng.uniform(0.05, 0.95, (3, 3))
        table = np.minimum.accumulate(est.rates("m"), axis=1)  # what the gains use
        # Every node of the full tree (depth <= 3, 3 children each) with its gain.
        nodes = []
        for depth in range(1, 4):
            for ranks in itertools.product(range(3), repeat=depth):
                nodes.append(float(np.prod([table[d, r] for d, r in enumerate(ranks)])))
        best = sorted(nodes, reverse=True)
        for n in (1, 3, 7, 12):
            assert est.best_tree_gains("m", n) == pytest.approx(best[:n])


def test_gains_never_rank_a_later_child_above_an_earlier_one():
    est = TreeAcceptance(max_depth=4, max_rank=4)
    table = est.rates("m")
    table[:] = 0.1
    table[0, 2] = 0.9  # an estimate out of order (a lucky streak): the gains cap it at rank 1's
    assert est.node_gains("m", (-1, -1, -1)) == pytest.approx([0.1, 0.1, 0.1])
    assert est.best_tree_gains("m", 3) == pytest.approx([0.1, 0.1, 0.1])


def test_trees_that_are_never_accepted_stop_paying_soon():
    """Heads offering 4 children per node (ranks 0..3) that are never right: the best tree's expected gain
    falls with the evidence, including for ranks 4..7 the heads never offer and so never test."""
    est = TreeAcceptance()  # the policy's settings: 8 ranks, alpha 0.05
    parents = (-1, -1, -1, -1, 0, 0, 0, 0)  # 4 roots, the best root's 4 children
    start = est.best_tree_gains("m", 8).sum()
    for _ in range(60):
        est.observe_verified("m", parents, ())  # nothing accepted
    # Uncapped, ranks 4..7 would keep their initial 0.1 + 0.083 + 0.071 + 0.062 = 0.32 = 0.19 * start for ever.
    assert start > 1.0 and est.best_tree_gains("m", 8).sum() < 0.1 * start


def test_observe_learns_the_rates_of_tested_nodes_only():
    est = TreeAcceptance(max_depth=4, max_rank=4, alpha=0.5)
    before = est.rates("m").copy()
    for _ in range(20):
        est.observe("m", TOKENS, PARENTS, (10, 13, 99))  # a accepted, b not, c not, d accepted
    after = est.rates("m")
    assert after[0, 0] > 0.95 and after[0, 1] < 0.05  # roots: rank 0 hit, rank 1 missed
    assert after[1, 0] < 0.05 and after[1, 1] > 0.95  # depth 2: rank 0 missed, rank 1 hit
    assert after[2, 0] == before[2, 0]  # e's parent c was never accepted: e was never tested


def test_observe_verified_equals_the_token_walk():
    a, b = TreeAcceptance(alpha=0.3), TreeAcceptance(alpha=0.3)
    a.observe("m", TOKENS, PARENTS, (10, 12, 14, 99))  # a, c, e accepted, then a bonus
    b.observe_verified("m", PARENTS, (0, 2, 4))
    assert np.allclose(a.rates("m"), b.rates("m"))


def test_fitting_candidates_cuts_nodes_and_depth():
    tree = Candidates(tuple(TOKENS), tuple(PARENTS))
    cut = tree.fit(4, 8)
    assert cut.tokens == (10, 11, 12, 13) and cut.parents == (-1, -1, 0, 0)
    shallow = tree.fit(5, 1)
    assert shallow.tokens == (10, 11) and shallow.parents == (-1, -1)
    # Removing a middle node renumbers the parents of the ones after it.
    out = Candidates((1, 2, 3, 4), (-1, 0, -1, 2)).fit(4, 1)
    assert out.tokens == (1, 3) and out.parents == (-1, -1)
    assert Candidates.chain([5, 6, 7]).fit(8, 2) == Candidates((5, 6), (-1, 0))


def tree_policy(rate: float) -> SmartSpecPolicy:
    policy = SmartSpecPolicy(["medusa"], max_k=5, max_tree_nodes=8)
    policy.bind_proposers({"medusa": ProposerSpec("medusa", 16, free=True, tree=True)})
    policy.trees.rates("medusa")[:] = rate
    return policy


def view(rid: str, parents: tuple[int, ...]) -> RequestView:
    return RequestView(rid, "", 100, max_k=50, offered={"medusa": parents}, max_nodes=400)


WIDE = (-1, -1, 0, 0, 1, 2, 2, 3)  # 8 nodes


def test_smartspec_keeps_more_tree_nodes_when_acceptance_is_high():
    high = tree_policy(0.9).plan([view("a", WIDE)])["a"]
    low = tree_policy(0.02).plan([view("a", WIDE)])["a"]
    assert high.proposer == "medusa" and high.k >= 4
    assert low.k == 0


def test_smartspec_tree_budget_never_exceeds_the_offer_or_the_cap():
    policy = tree_policy(0.99)
    plans = policy.plan([view("a", WIDE[:3]), view("b", WIDE)])
    assert plans["a"].k <= 3 and plans["b"].k <= 8

"""Prompt-lookup proposer: what it proposes, and that its incremental index equals a from-scratch one."""

from __future__ import annotations

import random

from proposer_svc.base import ProposalRequest
from proposer_svc.ngram import NgramProposer, NgramState


def reference_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Brute force: scan backwards for the most recent earlier occurrence of the longest suffix."""
    length = len(tokens)
    for n in range(min(max_n, length), min_n - 1, -1):
        suffix = tokens[length - n :]
        for end in range(length - 1, n - 1, -1):  # occurrence tokens[end-n:end], with a continuation
            if tokens[end - n : end] == suffix:
                return tokens[end : end + k]
    return []


def scratch_index(tokens: list[int], min_n: int, max_n: int) -> dict:
    index = {}
    for end in range(1, len(tokens)):
        for n in range(min_n, min(max_n, end) + 1):
            index[tuple(tokens[end - n : end])] = end
    return index


def one(proposer: NgramProposer, request_id: str, new, budget: int, reset: bool = False):
    [proposal] = proposer.step([ProposalRequest(request_id, new, reset, budget)])
    assert proposal.request_id == request_id
    assert proposal.parent_indices == list(range(-1, len(proposal.token_ids) - 1))
    return proposal.token_ids


def test_proposes_continuation_of_most_recent_match():
    p = NgramProposer(min_n=1, max_n=1, max_budget=8)
    # "5" occurs at 1 (followed by 6 7) and at 4 (followed by 8 9); the most recent one wins.
    assert one(p, "a", [1, 5, 6, 7, 5, 8, 9, 2, 5], budget=2) == [8, 9]
    # The continuation is cut at the end of the text: fewer than k tokens.
    assert one(p, "b", [3, 4, 3], budget=5) == [4, 3]


def test_prefers_longer_n():
    p = NgramProposer(min_n=1, max_n=3, max_budget=8)
    # Last token 2 was most recently followed by 9 (1-gram), but the 3-gram (7, 1, 2) matched at the start.
    tokens = [7, 1, 2, 3, 4, 0, 2, 9, 5, 7, 1, 2]
    assert one(p, "a", tokens, budget=3) == [3, 4, 0]
    # With max_n = 1 the most recent 1-gram match wins instead.
    assert one(NgramProposer(min_n=1, max_n=1), "a", tokens, budget=3) == [9, 5, 7]


def test_nothing_without_a_match_and_budget_capped():
    p = NgramProposer(min_n=2, max_n=3, max_budget=4)
    assert one(p, "a", [1, 2, 3, 4, 5], budget=3) == []
    # Only 1-gram repeats, and min_n = 2 forbids those.
    assert one(p, "b", [1, 2, 3, 1], budget=3) == []
    # A budget above max_budget is capped.
    assert one(p, "c", [1, 2, 3, 4, 5, 6, 7, 1, 2], budget=100) == [3, 4, 5, 6]


def test_budget_zero_brings_state_up_to_date_without_a_proposal():
    p = NgramProposer()
    out = p.step([ProposalRequest("a", [1, 2, 3], budget=0), ProposalRequest("b", [4, 5, 4], budget=1)])
    assert [(x.request_id, x.token_ids) for x in out] == [("b", [5])]
    assert p._states["a"].tokens == [1, 2, 3]
    assert one(p, "a", [1], budget=2) == [2, 3]


def test_incremental_updates_equal_rebuild():
    rng = random.Random(0)
    min_n, max_n = 2, 4
    p = NgramProposer(min_n=min_n, max_n=max_n, max_budget=6)
    texts = {rid: [rng.randrange(6) for _ in range(rng.randint(1, 12))] for rid in "abcd"}
    first = True
    for _ in range(30):
        items = []
        sent = {}
        for rid, text in texts.items():
            new = text if first else [rng.randrange(6) for _ in range(rng.randint(0, 5))]
            if not first:
                text.extend(new)
            sent[rid] = new
            items.append(ProposalRequest(rid, new, budget=rng.randint(0, 6)))
        first = False
        proposals = iter(p.step(items))
        for item in items:
            text = texts[item.request_id]
            state: NgramState = p._states[item.request_id]
            assert state.tokens == text
            assert state.index == scratch_index(text, min_n, max_n)
            if item.budget > 0:
                assert next(proposals).token_ids == reference_lookup(text, item.budget, min_n, max_n)
        assert next(proposals, None) is None
    # The random texts over 6 symbols do repeat: the test exercised real matches.
    assert any(reference_lookup(t, 3, min_n, max_n) for t in texts.values())


def test_reset_and_unknown_id_rebuild_from_scratch():
    p = NgramProposer(min_n=1, max_n=2)
    assert one(p, "a", [1, 2, 3, 1], budget=2) == [2, 3]
    # reset: only the new tokens count; 1 was followed by 9 there.
    assert one(p, "a", [1, 9, 4, 1], budget=2, reset=True) == [9, 4]
    assert p._states["a"].tokens == [1, 9, 4, 1]
    # An unknown id without reset is a fresh state too.
    assert one(p, "z", [7, 8, 7], budget=2) == [8, 7]


def test_release_and_invalid_items():
    p = NgramProposer(vocab_size=10)
    p.step([ProposalRequest("a", [1, 2, 1]), ProposalRequest("b", [3, 4, 3])])
    assert sorted(p.active_request_ids()) == ["a", "b"]
    p.release(["a", "unknown"])
    assert p.active_request_ids() == ["b"]
    out = p.step([
        ProposalRequest("b", [10], budget=2),  # outside the vocab: empty, state dropped
        ProposalRequest("c", [5, 6, 5], budget=-1),  # negative budget: no proposal, tokens kept
        ProposalRequest("d", [5, 6, 5], budget=2),
        ProposalRequest("e", [-3], budget=0),  # bad but asks for nothing: no proposal
    ])
    assert [(x.request_id, x.token_ids) for x in out] == [("b", []), ("d", [6, 5])]
    assert sorted(p.active_request_ids()) == ["c", "d"]
    assert p._states["c"].tokens == [5, 6, 5]

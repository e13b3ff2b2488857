"""Draft proposer: its batched, cache-reusing proposals equal a plain greedy continuation of the committed tokens.

Scenario: 5 requests of different prompt lengths (one near the end of the slot context) go through
several steps in one batch, with per-request budgets (0 included). After each step a random prefix
of each proposal is "accepted" plus a bonus token that differs from the next proposal (so the
draft's cache must roll back), or, for budget 0, a few committed tokens arrive at once. Reference:
transformers' model of the same checkpoint, greedy argmax over the whole committed prefix, no cache.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from proposer_svc.base import ProposalRequest
from proposer_svc.draft import DraftProposer
from specdec.testing import make_tiny_checkpoint

VOCAB = 97  # specdec.testing.TINY_DIMS
MAX_SEQ_LEN = 64
MAX_SLOTS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft"), "llama", seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def greedy(model, prefix: list[int], k: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(k):
            logits = model(input_ids=torch.tensor([prefix + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def make_proposer(checkpoint, numpy_chains: bool = True) -> DraftProposer:
    return DraftProposer.from_checkpoint(checkpoint, device="cpu", dtype="float32", max_slots=MAX_SLOTS,
                                         max_seq_len=MAX_SEQ_LEN, max_budget=6, numpy_chains=numpy_chains)


class ForwardSpy:
    """Records the batches of runner.next_tokens (the draft's forwards): [[(slot, n_tokens), ...] per call]."""

    def __init__(self, runner):
        self.calls: list[list[tuple[int, int]]] = []
        inner = runner.next_tokens

        def next_tokens(batch, *args, **kwargs):
            self.calls.append([(seq.slot, len(seq.tokens)) for seq in batch])
            return inner(batch, *args, **kwargs)

        runner.next_tokens = next_tokens


def test_the_draft_runs_numpy_on_cpu_in_float32(checkpoint):
    assert make_proposer(checkpoint).runner.runs_numpy


@pytest.mark.parametrize("numpy_chains", [True, False], ids=["numpy", "torch"])
def test_proposals_equal_greedy_continuation_across_rollbacks(checkpoint, reference, numpy_chains):
    rng = random.Random(0)
    proposer = make_proposer(checkpoint, numpy_chains)  # False: the torch path, as on a GPU
    assert proposer.runner.runs_numpy == numpy_chains
    spy = ForwardSpy(proposer.runner)
    prompt_lengths = {"r1": 1, "r2": 4, "r3": 11, "r4": 23, "near-end": 58}
    committed = {rid: [rng.randrange(VOCAB) for _ in range(n)] for rid, n in prompt_lengths.items()}
    pending = {rid: list(tokens) for rid, tokens in committed.items()}  # not yet sent
    last_cands = {rid: [] for rid in committed}
    rolled_back = accepted_all = ignored = 0

    for step in range(7):
        budgets = {rid: rng.choice([0, 1, 3, 6, 6]) for rid in committed}
        budgets["r1"] = 0 if step == 2 else budgets["r1"] or 4
        if step == 1:
            budgets["r2"] = 0
        items = [ProposalRequest(rid, pending[rid], budget=budgets[rid]) for rid in committed]
        before = len(spy.calls)
        proposals = proposer.step(items)
        calls = spy.calls[before:]

        expected_k = {rid: max(0, min(budgets[rid], MAX_SEQ_LEN - len(committed[rid]) + 1)) for rid in committed}
        assert [p.request_id for p in proposals] == [rid for rid in committed if budgets[rid] > 0]
        # Batched: one forward for catch-up + first candidates, then one per further candidate.
        assert len(calls) == max(1, max(expected_k.values()))
        assert proposer.forward_ms > 0
        for p in proposals:
            rid = p.request_id
            assert p.token_ids == greedy(reference, committed[rid], expected_k[rid]), (step, rid)
            assert p.parent_indices == list(range(-1, len(p.token_ids) - 1))
        # The cache holds every committed token but the last plus the candidates it fed.
        proposed = {p.request_id: p.token_ids for p in proposals}
        for rid, state in proposer._states.items():
            fed = proposed.get(rid, [])[:-1]
            if len(committed[rid]) - 1 <= MAX_SEQ_LEN:
                assert state.cached == (committed[rid] + fed if expected_k[rid] else committed[rid][:-1]), rid
            else:  # past the end of the slot's context: nothing more is fed
                assert state.cached == committed[rid][: len(state.cached)] and len(state.cached) <= MAX_SEQ_LEN
            assert proposer.runner.length(state.slot) == len(state.cached)
        # Forward 1 re-feeds nothing the draft had cached right: the accepted candidates stay, so it gets
        # the bonus only (plus the last candidate when all were accepted: that one was never fed).
        fed_first = dict(calls[0])
        for rid in committed:
            if last_cands[rid] and expected_k[rid]:
                new, fed_before = pending[rid], last_cands[rid][:-1]
                agree = next((i for i, (x, y) in enumerate(zip(new, fed_before)) if x != y),
                             min(len(new), len(fed_before)))
                assert fed_first[proposer._states[rid].slot] == len(new) - min(agree, len(new) - 1), (step, rid)

        # The target "verifies": accept a random prefix, then a bonus token that differs from the next candidate.
        # Sometimes the scheduler verified another proposer's candidates instead: the draft's are simply wrong.
        for rid in committed:
            cands = proposed.get(rid, [])
            if cands and rng.random() < 0.25:
                new = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
                ignored += new[: len(cands)] != cands[: len(new)]
            elif cands:
                j = rng.randint(0, len(cands))
                bonus = rng.choice([t for t in range(VOCAB) if j == len(cands) or t != cands[j]])
                new = cands[:j] + [bonus]
                rolled_back += j < len(cands) - 1
                accepted_all += j == len(cands)
            else:
                new = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 3))]
            committed[rid] += new
            pending[rid] = new
            last_cands[rid] = cands

    assert rolled_back and accepted_all and ignored  # every cache path was exercised
    assert len(committed["near-end"]) > MAX_SEQ_LEN  # ... and the end of the context
    proposer.release(list(committed))
    assert proposer.active_request_ids() == []
    assert proposer.runner.free_slots == MAX_SLOTS


def test_reset_slots_exhausted_and_release(checkpoint, reference, caplog):
    rng = random.Random(1)
    proposer = make_proposer(checkpoint)
    prompts = {f"q{i}": [rng.randrange(VOCAB) for _ in range(3 + i)] for i in range(MAX_SLOTS + 1)}
    with caplog.at_level(logging.WARNING):
        out = proposer.step([ProposalRequest(rid, tokens, budget=2) for rid, tokens in prompts.items()])
    # One request too many: it gets nothing (and a warning), the others their candidates.
    assert [p.token_ids for p in out[:-1]] == [greedy(reference, prompts[r], 2) for r in list(prompts)[:-1]]
    assert out[-1].request_id == f"q{MAX_SLOTS}" and out[-1].token_ids == []
    assert "KV slots are in use" in caplog.text
    assert proposer.runner.free_slots == 0

    # Once a slot frees up, the waiting request gets one and catches up on everything it was sent.
    proposer.release(["q0"])
    last = f"q{MAX_SLOTS}"
    [p] = proposer.step([ProposalRequest(last, [5], budget=3)])
    assert p.token_ids == greedy(reference, prompts[last] + [5], 3)

    # reset: the state is rebuilt from the new tokens only (and the cache with it).
    [p] = proposer.step([ProposalRequest("q1", [7, 8, 9], reset=True, budget=3)])
    assert p.token_ids == greedy(reference, [7, 8, 9], 3)
    assert proposer._states["q1"].committed == [7, 8, 9]

    # A token outside the draft's vocabulary: empty for that item, the rest of the batch unaffected.
    out = proposer.step([ProposalRequest("q2", [VOCAB], budget=2), ProposalRequest("q3", [1], budget=2)])
    assert out[0].token_ids == [] and out[1].token_ids == greedy(reference, prompts["q3"] + [1], 2)
    assert "q2" not in proposer.active_request_ids()

    proposer.release(proposer.active_request_ids())
    assert proposer.runner.free_slots == MAX_SLOTS

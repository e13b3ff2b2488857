"""The Medusa tree proposer: trees from hidden states, and bad input that costs only that item's candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proposer_svc.base import ProposalRequest
from proposer_svc.medusa import MedusaProposer
from proposer_svc.server import build_proposer
from proposer_svc.config import ProposerConfig
from specdec.model.medusa import MedusaConfig, MedusaError, MedusaHeads, build_tree, save_medusa_heads

D, V, H = 16, 50, 3


@pytest.fixture
def heads() -> MedusaHeads:
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(hidden_size=D, vocab_size=V, num_heads=H))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return heads


def hidden(seed: int, size: int = D) -> bytes:
    return np.random.default_rng(seed).normal(size=size).astype("<f4").tobytes()


def test_proposes_the_best_first_tree_of_its_heads(heads):
    proposer = MedusaProposer(heads, max_budget=10, top_k=3)
    state = hidden(1)
    [tree] = proposer.step([ProposalRequest("r", [1, 2, 3], budget=7, hidden_state=state)])
    with torch.inference_mode():
        log_probs = torch.log_softmax(heads(torch.from_numpy(np.frombuffer(state, "<f4").copy())[None]), -1)[0]
    assert (tree.token_ids, tree.parent_indices) == build_tree(log_probs, 7, 3)
    assert len(tree.token_ids) == 7 and tree.parent_indices[0] == -1
    assert all(-1 <= p < j for j, p in enumerate(tree.parent_indices))
    assert proposer.active_request_ids() == ["r"]
    assert proposer.hidden_size == D


def test_budget_is_capped_and_batches_are_independent(heads):
    proposer = MedusaProposer(heads, max_budget=4, top_k=2)
    a, b = proposer.step([ProposalRequest("a", [1], budget=50, hidden_state=hidden(1)),
                          ProposalRequest("b", [2], budget=3, hidden_state=hidden(2))])
    assert len(a.token_ids) == 4 and len(b.token_ids) == 3
    [alone] = proposer.step([ProposalRequest("b", [], budget=3, hidden_state=hidden(2))])
    assert alone.token_ids == b.token_ids


def test_missing_or_wrong_size_hidden_state_gives_no_candidates(heads):
    proposer = MedusaProposer(heads, max_budget=8)
    out = proposer.step([
        ProposalRequest("none", [1, 2], budget=4),
        ProposalRequest("short", [1, 2], budget=4, hidden_state=hidden(1, D - 1)),
        ProposalRequest("ok", [1, 2], budget=4, hidden_state=hidden(1)),
        ProposalRequest("bad-token", [V + 5], budget=4, hidden_state=hidden(1)),
    ])
    assert [len(p.token_ids) for p in out] == [0, 0, 4, 0]
    assert sorted(proposer.active_request_ids()) == ["none", "ok", "short"]
    proposer.release(["ok", "none", "short", "unknown"])
    assert proposer.active_request_ids() == []


def test_build_proposer_loads_heads_and_names_a_bad_folder(heads, tmp_path):
    save_medusa_heads(heads, tmp_path / "heads")
    proposer = build_proposer(ProposerConfig(kind="medusa", model=tmp_path / "heads", top_k=2))
    assert isinstance(proposer, MedusaProposer) and proposer.hidden_size == D
    assert "num_heads=3" in proposer.describe()
    with pytest.raises(MedusaError, match="missing"):
        build_proposer(ProposerConfig(kind="medusa", model=tmp_path / "missing"))


def test_heads_are_free_only_when_their_vocabulary_projections_are_small(heads):
    import types

    from proposer_svc.medusa import FREE_PROJECTION_MACS

    assert MedusaProposer(heads).free  # the tiny heads: a few thousand multiply-adds
    assert not MedusaProposer(heads, free=False).free
    # SmolLM2's heads (3 heads reading through a 49152 x 576 lm_head) cost half a target forward per request.
    big = types.SimpleNamespace(config=types.SimpleNamespace(num_heads=3, vocab_size=49152, hidden_size=576),
                                eval=lambda: big)
    assert 3 * 49152 * 576 > FREE_PROJECTION_MACS and not MedusaProposer(big).free
    assert MedusaProposer(big, free=True).free

"""specdec.model.medusa: heads config, save/load and its errors, best-first trees, the hidden-state convention,
and the tiny-target heads of specdec.testing."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdec.model.medusa import MedusaConfig, MedusaError, MedusaHeads, build_tree, load_medusa_heads, save_medusa_heads

CONFIG = MedusaConfig(hidden_size=8, vocab_size=13, num_heads=3, num_layers=2, target="tiny")


def random_heads(config: MedusaConfig = CONFIG, seed: int = 0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(config)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    return heads


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "heads"
    save_medusa_heads(random_heads(), folder)
    return folder


# -- config ------------------------------------------------------------------------------------------


def test_config_round_trip():
    raw = CONFIG.to_dict()
    assert raw["model_type"] == "medusa"
    assert MedusaConfig.from_dict(json.loads(json.dumps(raw))) == CONFIG
    # num_layers and target have defaults
    assert MedusaConfig.from_dict({"model_type": "medusa", "hidden_size": 4, "vocab_size": 5, "num_heads": 2}) == \
        MedusaConfig(4, 5, 2, 1, "")


@pytest.mark.parametrize("change, message", [
    (dict(model_type="llama"), "model_type is 'llama', expected 'medusa'"),
    (dict(hidden_size=None), "missing field 'hidden_size'"),
    (dict(vocab_size=0), "'vocab_size' must be an integer >= 1, got 0"),
    (dict(num_heads=2.5), "'num_heads' must be an integer >= 1, got 2.5"),
    (dict(num_heads=True), "'num_heads' must be an integer >= 1, got True"),
    (dict(num_layers=-1), "'num_layers' must be an integer >= 0, got -1"),
    (dict(target=3), "'target' must be a string"),
])
def test_config_validation(change, message):
    raw = {**CONFIG.to_dict(), **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(MedusaError, match=message):
        MedusaConfig.from_dict(raw)


def test_forward_shape_and_lm_head_init():
    heads = random_heads()
    assert heads(torch.randn(5, 8)).shape == (5, 3, 13)
    lm_head = torch.randn(13, 8)
    heads.init_from_lm_head(lm_head)
    h = torch.randn(4, 8)
    # zero residual blocks: every head starts as the target's lm_head
    for i in range(3):
        torch.testing.assert_close(heads(h)[:, i], h @ lm_head.t())
    with pytest.raises(MedusaError, match=r"lm_head of shape \(8, 13\)"):
        heads.init_from_lm_head(lm_head.t())


# -- save / load -------------------------------------------------------------------------------------


def test_save_load_equality_bf16(saved):
    original = random_heads()
    files = sorted(p.name for p in saved.iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert all(t.dtype == torch.bfloat16 for t in load_file(saved / "model.safetensors").values())
    loaded = load_medusa_heads(saved)
    assert loaded.config == CONFIG
    assert not loaded.training
    for (name, a), (name_b, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b
        assert b.dtype == torch.float32
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    as_bf16 = load_medusa_heads(saved, dtype=torch.bfloat16)
    assert next(as_bf16.parameters()).dtype == torch.bfloat16


def _rewrite_config(folder, **change):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(change)
    (folder / "config.json").write_text(json.dumps(raw))


def _rewrite_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def _set(state, name, value):
    state[name] = value


@pytest.mark.parametrize("breakage, message", [
    (lambda f: (f / "config.json").unlink(), "has no config.json"),
    (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda f: _rewrite_config(f, model_type="llama"), "model_type is 'llama', expected 'medusa'"),
    (lambda f: _rewrite_config(f, hidden_size="8"), "'hidden_size' must be an integer >= 1, got '8'"),
    (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda f: (f / "model.safetensors").write_bytes(b"garbage"), "model.safetensors cannot be read"),
    (lambda f: _rewrite_config(f, num_heads=4), r"missing tensors heads\.3\.0\.linear\.bias"),
    (lambda f: _rewrite_config(f, num_layers=1),
     r"num_layers=1\): missing tensors heads\.0\.1\.weight.*; "
     r"unexpected tensors heads\.0\.1\.linear\.bias.* and 5 more"),
    (lambda f: _rewrite_config(f, vocab_size=14), r"tensor heads\.0\.2\.weight has shape \(13, 8\).*implies \(14, 8\)"),
    (lambda f: _rewrite_config(f, hidden_size=16), r"tensor heads\.0\.0\.linear\.weight has shape \(8, 8\)"),
    (lambda f: _rewrite_weights(f, lambda s: _set(s, "heads.1.0.linear.bias", torch.full((8,), math.nan))),
     r"tensor heads\.1\.0\.linear\.bias holds NaN or infinite values"),
    (lambda f: _rewrite_weights(f, lambda s: _set(s, "heads.2.2.weight", torch.full((13, 8), math.inf))),
     r"tensor heads\.2\.2\.weight holds NaN or infinite values"),
])
def test_load_errors_name_folder_and_problem(saved, breakage, message):
    breakage(saved)
    with pytest.raises(MedusaError, match=message) as info:
        load_medusa_heads(saved)
    assert str(saved) in str(info.value)


def test_load_missing_folder(tmp_path):
    with pytest.raises(MedusaError, match=r"heads folder .*nowhere does not exist \(train heads with"):
        load_medusa_heads(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedusaError, match="is not a folder"):
        load_medusa_heads(tmp_path / "file")


# -- build_tree --------------------------------------------------------------------------------------


def _scores(log_probs, tokens, parents):
    """Each node's path score, recomputed from the returned tree; also checks the node's token is one of
    its head's top tokens at the node's depth."""
    scores, depths = [], []
    for tok, parent in zip(tokens, parents):
        depth = 0 if parent < 0 else depths[parent] + 1
        depths.append(depth)
        scores.append((0.0 if parent < 0 else scores[parent]) + float(log_probs[depth, tok]))
    return scores, depths


def _all_trees(log_probs, top_k):
    """Every node of the full candidate tree as (path of ranks) -> score."""
    num_heads = log_probs.shape[0]
    values = log_probs.topk(top_k, dim=-1).values
    nodes = {}
    for depth in range(num_heads):
        for path in itertools.product(range(top_k), repeat=depth + 1):
            nodes[path] = sum(float(values[d, r]) for d, r in enumerate(path))
    return nodes


def _best_tree_value(nodes, n):
    """Brute force: the largest sum of path probabilities over ancestor-closed sets of n nodes."""
    best = -math.inf
    for subset in itertools.combinations(nodes, n):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in subset):
            best = max(best, sum(math.exp(nodes[p]) for p in subset))
    return best


def random_log_probs(num_heads, vocab, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(num_heads, vocab, generator=gen), dim=-1)


@pytest.mark.parametrize("seed", range(6))
def test_build_tree_is_best_first_and_optimal(seed):
    num_heads, top_k = 3, 2
    log_probs = random_log_probs(num_heads, 11, seed)
    full = _all_trees(log_probs, top_k)
    tokens, parents = build_tree(log_probs, budget=100, top_k=top_k)
    assert len(tokens) == len(full) == 2 + 4 + 8  # the whole tree when the budget allows
    scores, depths = _scores(log_probs, tokens, parents)
    assert all(-1 <= p < j for j, p in enumerate(parents))  # parents before children
    assert max(depths) == num_heads - 1  # depth at most H levels
    assert all(a >= b for a, b in zip(scores, scores[1:]))  # non-increasing: best first
    top = log_probs.topk(top_k, dim=-1).indices
    assert all(tok in top[d].tolist() for tok, d in zip(tokens, depths))
    for n in range(1, 7):
        prefix_tokens, prefix_parents = build_tree(log_probs, budget=n, top_k=top_k)
        assert (prefix_tokens, prefix_parents) == (tokens[:n], parents[:n])  # a budget cuts the same tree
        assert sum(math.exp(s) for s in scores[:n]) == pytest.approx(_best_tree_value(full, n), rel=1e-9)


def test_build_tree_distinct_children_and_paths():
    log_probs = random_log_probs(4, 50, seed=7)
    tokens, parents = build_tree(log_probs, budget=40, top_k=4)
    assert len(tokens) == 40
    children = {}
    for tok, parent in zip(tokens, parents):
        children.setdefault(parent, []).append(tok)
    # siblings are distinct tokens: no two nodes stand for the same path
    assert all(len(c) == len(set(c)) for c in children.values())


def test_build_tree_chain_when_top_k_is_one():
    log_probs = random_log_probs(4, 20, seed=3)
    tokens, parents = build_tree(log_probs, budget=10, top_k=1)
    assert parents == [-1, 0, 1, 2]  # at most one node per head
    assert tokens == log_probs.argmax(-1).tolist()
    assert build_tree(log_probs, budget=2, top_k=1) == (tokens[:2], [-1, 0])


def test_build_tree_small_budgets_and_top_k_beyond_vocab():
    log_probs = random_log_probs(2, 3, seed=1)
    assert build_tree(log_probs, budget=0) == ([], [])
    assert build_tree(log_probs, budget=-1) == ([], [])
    tokens, parents = build_tree(log_probs, budget=1)
    assert tokens == [int(log_probs[0].argmax())] and parents == [-1]
    tokens, parents = build_tree(log_probs, budget=50, top_k=10)  # top_k capped at the vocab
    assert len(tokens) == 3 + 9


# -- the hidden-state convention ---------------------------------------------------------------------


def test_runner_hidden_is_final_normed_and_lm_head_gives_logits(tmp_path):
    """The heads read what the runner (and the verifier) return as hidden state: the final-normed state
    at t, from which the target's lm_head gives the logits for token t + 1."""
    from transformers import AutoModelForCausalLM

    from specdec.model.runner import ModelRunner, SeqInput
    from specdec.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "target", "llama")
    runner = ModelRunner(folder, device="cpu", dtype=torch.float32, max_slots=2, max_seq_len=64)
    tokens = torch.randint(0, runner.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    slot = runner.allocate()
    (prompt,) = runner.forward([SeqInput(slot, tokens[:8])], return_hidden=True)
    (tree,) = runner.forward([SeqInput(slot, tokens[8:], parents=[-1, 0, 0, 2])], return_hidden=True)
    for out in (prompt, tree):
        torch.testing.assert_close(out.hidden @ runner.weights.lm_head.weight.t(), out.logits)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        last = reference(torch.tensor([tokens[:8]]), output_hidden_states=True).hidden_states[-1][0]
    # transformers' last hidden state is after the final norm; the runner's matches it
    torch.testing.assert_close(prompt.hidden, last, atol=1e-4, rtol=1e-4)


# -- training data -----------------------------------------------------------------------------------


def test_head_examples_label_head_i_with_token_t_plus_2_plus_i():
    from specdec.training.medusa_train import IGNORE, Rollouts, fit_heads, head_examples

    hidden = torch.arange(10, dtype=torch.float32).view(2, 5, 1)  # row j: h before continuation token j
    continuation = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    x, y = head_examples(Rollouts(hidden, continuation), num_heads=3)
    assert x.flatten().tolist() == [0, 1, 2, 3, 5, 6, 7, 8]  # the last row has no label and is dropped
    assert y[:4].tolist() == [[11, 12, 13], [12, 13, 14], [13, 14, IGNORE], [14, IGNORE, IGNORE]]
    assert y[4:, 0].tolist() == [21, 22, 23, 24]
    with pytest.raises(ValueError, match="no training examples"):
        fit_heads(random_heads(), x[:0], y[:0], steps=1)


# -- heads for tiny test targets ---------------------------------------------------------------------


def test_tiny_medusa_heads_learn_and_beat_chance(tmp_path):
    from specdec.training.medusa_train import greedy_rollouts, head_accuracy, head_examples
    from specdec.model.runner import ModelRunner
    from specdec.testing import make_tiny_checkpoint, make_tiny_medusa_heads, tiny_medusa_prompts

    target = make_tiny_checkpoint(tmp_path / "target", "llama")
    heads = load_medusa_heads(make_tiny_medusa_heads(target, tmp_path / "heads", num_heads=3))
    untrained = load_medusa_heads(make_tiny_medusa_heads(target, tmp_path / "init", num_heads=3, steps=0))
    assert heads.config.num_heads == 3 and heads.config.vocab_size == 97
    runner = ModelRunner(target, device="cpu", dtype=torch.float32, max_slots=16, max_seq_len=64)

    unseen = torch.randint(0, 97, (16, 8), generator=torch.Generator().manual_seed(99)).tolist()
    rollouts = greedy_rollouts(runner, unseen, 32)
    # row j of a rollout is the hidden state from which the target's lm_head picks continuation token j
    lm_logits = rollouts.hidden @ runner.weights.lm_head.weight.t()  # [S, N, V]
    assert torch.equal(lm_logits.argmax(-1), rollouts.continuation)
    head0 = head_accuracy(heads, *head_examples(rollouts, 3))[0]
    assert head0["count"] == 16 * 31
    assert head0["top1"] > 10 / 97, head0  # chance is 1/97

    # On the continuations they were trained on, the heads learnt token t+2 far beyond the lm_head copy
    # they start from (which only scores where the target repeats a token): labels and fit work.
    x, y = head_examples(greedy_rollouts(runner, tiny_medusa_prompts(97), 40, batch_size=16), 3)
    trained, init = head_accuracy(heads, x, y)[0], head_accuracy(untrained, x, y)[0]
    assert trained["top1"] > init["top1"] + 0.08, (trained, init)


def test_heads_that_read_through_the_targets_lm_head_store_no_projection_and_load_with_the_target(tmp_path):
    from specdec.testing import make_tiny_checkpoint

    target = make_tiny_checkpoint(tmp_path / "target", "llama")
    target_config = json.loads((target / "config.json").read_text())
    d, v = target_config["hidden_size"], target_config["vocab_size"]
    lm_head = load_file(target / "model.safetensors")["lm_head.weight"].float()
    config = MedusaConfig(hidden_size=d, vocab_size=v, num_heads=3, lm_head="target")
    assert MedusaConfig.from_dict(config.to_dict()) == config
    heads = MedusaHeads(config)
    heads.init_from_lm_head(lm_head)
    torch.manual_seed(3)
    with torch.no_grad():
        for head in heads.heads:
            for block in head:
                block.linear.weight.normal_(0, 0.05)
    save_medusa_heads(heads, tmp_path / "heads")
    stored = load_file(tmp_path / "heads" / "model.safetensors")
    assert not any(t.shape == (v, d) for t in stored.values()), "a projection was saved"

    with pytest.raises(MedusaError, match="read through the target's lm_head; give the target"):
        load_medusa_heads(tmp_path / "heads")
    loaded = load_medusa_heads(tmp_path / "heads", target=target)
    h = torch.randn(5, d)
    with torch.no_grad():  # the saved (bf16) blocks applied by hand, then the target's own lm_head
        expected = torch.stack([head(h) for head in loaded.heads], dim=-2) @ lm_head.T
        torch.testing.assert_close(loaded(h), expected)
        assert loaded(h).shape == (5, 3, v)
        assert not torch.allclose(loaded(h), (h @ lm_head.T)[:, None, :].expand(5, 3, v))  # the blocks count

    other = make_tiny_checkpoint(tmp_path / "other", "llama", vocab_size=v + 8)
    with pytest.raises(MedusaError, match="trained for another target"):
        load_medusa_heads(tmp_path / "heads", target=other)
    with pytest.raises(MedusaError, match="'lm_head' must be one of own, target"):
        MedusaConfig.from_dict({**config.to_dict(), "lm_head": "mine"})

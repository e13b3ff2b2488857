"""The NumPy forward (specdec/model/numpy_forward.py) computes what the torch runner computes, on the same KV cache.

Scenario: ragged batches of chains (a prompt chunk, single decode tokens, short chains) go through two
runners of the same checkpoint, one in torch and one in NumPy, with rollbacks of random length between
steps; some steps of the NumPy runner go through its torch `forward` instead, so each path continues a
slot the other filled. Every step, each chain's last logits agree within 1e-4 and `next_tokens` is their
argmax. Tolerance: fp32 on both sides, differences only from the order of floating-point operations.
"""

from __future__ import annotations

import random

import pytest
import torch

from specdec.model.runner import ModelRunner, SeqInput
from specdec.testing import TINY_DIMS, make_tiny_checkpoint

VOCAB = TINY_DIMS["vocab_size"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # untied head, grouped KV; tied head, q/k/v biases
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=5)


def runners(folder) -> tuple[ModelRunner, ModelRunner]:
    kwargs = {"device": "cpu", "dtype": "float32", "max_slots": 4, "max_seq_len": 200}
    return ModelRunner(folder, **kwargs), ModelRunner(folder, numpy_chains=True, **kwargs)


def test_numpy_chains_match_the_torch_forward_across_rollbacks(checkpoint):
    plain, fast = runners(checkpoint)
    assert fast.runs_numpy and not plain.runs_numpy
    rng = random.Random(0)
    slots = [(plain.allocate(), fast.allocate()) for _ in range(3)]
    via_torch = 0
    for step in range(12):
        chains = [[rng.randrange(VOCAB) for _ in range(rng.randint(20, 40) if step == 0 else rng.choice([1, 1, 3, 6]))]
                  for _ in slots]
        expected = plain.forward([SeqInput(p, c, last_logits_only=True) for (p, _), c in zip(slots, chains)])
        expected = torch.stack([o.logits[-1] for o in expected])  # [B, V]
        if step % 4 == 3:  # this step on the torch path of the NumPy runner: the next ones continue its cache
            got = fast.forward([SeqInput(f, c, last_logits_only=True) for (_, f), c in zip(slots, chains)])
            got = torch.stack([o.logits[-1] for o in got])
            via_torch += 1
        else:
            got = fast.last_logits([SeqInput(f, c) for (_, f), c in zip(slots, chains)])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        for p, f in slots:
            assert plain.length(p) == fast.length(f)
            keep = rng.randint(max(1, plain.length(p) - 5), plain.length(p))  # reject a random tail
            plain.truncate(p, keep)
            fast.truncate(f, keep)
    assert via_torch == 3


def test_next_tokens_is_the_argmax_of_the_forward_on_either_path(checkpoint):
    plain, fast = runners(checkpoint)
    rng = random.Random(1)
    pairs = [(plain.allocate(), fast.allocate()) for _ in range(2)]
    for step in range(6):
        chains = [[rng.randrange(VOCAB) for _ in range(30 if step == 0 else rng.randint(1, 4))] for _ in pairs]
        a = plain.next_tokens([SeqInput(p, c) for (p, _), c in zip(pairs, chains)])
        b = fast.next_tokens([SeqInput(f, c) for (_, f), c in zip(pairs, chains)])
        assert a == b, step
        for p, f in pairs:
            assert plain.length(p) == fast.length(f)


def test_models_numpy_cannot_run_take_the_torch_path(tmp_path):
    # A sliding window (Mistral) is not in the NumPy forward: next_tokens falls back to torch, still right.
    folder = make_tiny_checkpoint(tmp_path, "mistral", seed=2)
    plain, fast = runners(folder)
    assert not fast.runs_numpy
    p, f = plain.allocate(), fast.allocate()
    tokens = [random.Random(3).randrange(VOCAB) for _ in range(40)]
    assert plain.next_tokens([SeqInput(p, tokens)]) == fast.next_tokens([SeqInput(f, tokens)])


def test_trees_take_the_torch_path(checkpoint):
    plain, fast = runners(checkpoint)
    p, f = plain.allocate(), fast.allocate()
    for runner, slot in ((plain, p), (fast, f)):
        runner.forward([SeqInput(slot, list(range(10)))])
    tokens, parents = [3, 4, 5], [-1, -1, 0]
    assert plain.next_tokens([SeqInput(p, tokens, parents)]) == fast.next_tokens([SeqInput(f, tokens, parents)])
    assert fast.length(f) == 13


def test_bad_batches_are_rejected_before_numpy_writes_anything(checkpoint):
    _, fast = runners(checkpoint)
    slot = fast.allocate()
    fast.next_tokens([SeqInput(slot, [1, 2, 3])])
    before = [ck[slot].clone() for ck in fast.cache_k]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fast.next_tokens([SeqInput(slot, [1, VOCAB])])
    assert fast.length(slot) == 3
    assert all(torch.equal(a, ck[slot]) for a, ck in zip(before, fast.cache_k))

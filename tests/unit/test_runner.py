"""The runner's logits equal the transformers reference forward of the same checkpoint.

Scenario: a ragged batch of 6 requests with different context lengths is prefilled, then goes
through several cycles in which each request brings a single decode token, a chain or a tree, and
a random root path of it is accepted (rollback of the rest). After every forward, each new
position's logits are compared to transformers' full forward over that position's prefix.

Tolerance: fp32 weights on both sides; |runner - reference| <= 1e-4 + 1e-4 * |reference|
(differences come only from the order of floating-point operations).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdec.model.checkpoint import CODE_DRAFT, CODE_TARGET
from specdec.model.runner import BatchError, ModelRunner, SeqInput, parse_dtype
from specdec.testing import make_tiny_checkpoint

ATOL = 1e-4
RTOL = 1e-4


def reference_logits(model, prefix: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prefix])).logits[0, -1].float()


def random_tree(rng: random.Random, n: int) -> list[int]:
    return [-1] + [rng.randrange(-1, j) if rng.random() < 0.2 else rng.randrange(0, j) for j in range(1, n)]


def path_to(parents: list[int], j: int) -> list[int]:
    path = []
    while j >= 0:
        path.append(j)
        j = parents[j]
    return path[::-1]


def run_scenario(folder, vocab: int, context_lengths=(3, 9, 17, 26, 34, 41), cycles: int = 4, seed: int = 0):
    rng = random.Random(seed)
    runner = ModelRunner(folder, device="cpu", dtype="float32", max_slots=8, max_seq_len=160)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    reference.eval()
    slots = [runner.allocate() for _ in context_lengths]
    contexts = {s: [rng.randrange(vocab) for _ in range(n)] for s, n in zip(slots, context_lengths)}
    committed = {s: [] for s in slots}  # what each slot's cache holds

    def check(batch, outputs):
        for seq, out in zip(batch, outputs):
            parents = seq.parents if seq.parents is not None else list(range(-1, len(seq.tokens) - 1))
            rows = [len(seq.tokens) - 1] if seq.last_logits_only else range(len(seq.tokens))
            for r, j in enumerate(rows):
                prefix = committed[seq.slot] + [seq.tokens[i] for i in path_to(parents, j)]
                torch.testing.assert_close(out.logits[r], reference_logits(reference, prefix), atol=ATOL, rtol=RTOL)

    def run_prefill(batch):
        check(batch, runner.forward(batch))
        for seq in batch:
            committed[seq.slot] += list(seq.tokens)

    # Prefill: half of the requests whole, the others in two chunks (both batches ragged).
    run_prefill([SeqInput(s, contexts[s], last_logits_only=True) for s in slots[1::2]]
                + [SeqInput(s, contexts[s][: len(contexts[s]) // 2]) for s in slots[::2]])
    run_prefill([SeqInput(s, contexts[s][len(committed[s]) :]) for s in slots[::2]])
    for s in slots:
        assert committed[s] == contexts[s] and runner.length(s) == len(contexts[s])

    for _ in range(cycles):
        batch = []
        for s in slots:
            kind = rng.choice(["decode", "chain", "tree"])
            n = 1 if kind == "decode" else rng.randint(2, 7)
            tokens = [rng.randrange(vocab) for _ in range(n)]
            batch.append(SeqInput(s, tokens, random_tree(rng, n) if kind == "tree" else None))
        rng.shuffle(batch)
        outputs = runner.forward(batch, return_hidden=True)
        check(batch, outputs)
        for seq, out in zip(batch, outputs):
            assert out.hidden is not None and out.hidden.shape[0] == len(seq.tokens)
            parents = seq.parents if seq.parents is not None else list(range(-1, len(seq.tokens) - 1))
            path = path_to(parents, rng.randrange(len(seq.tokens)))[: rng.randint(0, len(seq.tokens))]
            runner.accept(seq.slot, path)
            committed[seq.slot] = committed[seq.slot] + [seq.tokens[i] for i in path]
            assert runner.length(seq.slot) == len(committed[seq.slot])
    # After all the rollbacks the caches still agree: one more decode step for everyone.
    batch = [SeqInput(s, [rng.randrange(vocab)]) for s in slots]
    check(batch, runner.forward(batch))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_runner_matches_transformers_tiny(tmp_path, arch):
    folder = make_tiny_checkpoint(tmp_path / arch, arch)
    run_scenario(folder, vocab=97, seed=hash(arch) % 1000)


@pytest.mark.parametrize("folder", [CODE_TARGET, CODE_DRAFT], ids=["target", "draft"])
def test_runner_matches_transformers_embedded(folder):
    run_scenario(folder, vocab=4096, context_lengths=(5, 12, 20, 31, 44, 60), cycles=3)


def test_bad_batches_are_rejected_without_side_effects(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "llama", "llama")
    runner = ModelRunner(folder, device="cpu", dtype="float32", max_slots=2, max_seq_len=32)
    slot = runner.allocate()
    runner.forward([SeqInput(slot, [1, 2, 3])])
    cases = {
        "outside the vocabulary": [SeqInput(slot, [97])],
        "parent index 2 of node 1 out of range": [SeqInput(slot, [1, 2], parents=[-1, 2])],
        "exceed the context": [SeqInput(slot, list(range(30)))],
        "not allocated": [SeqInput(1, [1])],
        "appears twice": [SeqInput(slot, [1]), SeqInput(slot, [2])],
        "no new tokens": [SeqInput(slot, [])],
    }
    for message, batch in cases.items():
        with pytest.raises(BatchError, match=message):
            runner.forward(batch)
        assert runner.length(slot) == 3
    runner.forward([SeqInput(slot, [4, 5, 6], parents=[-1, 0, 0])])
    with pytest.raises(BatchError, match="not a root path"):
        runner.accept(slot, [0, 1, 2])
    runner.accept(slot, [0, 2])
    assert runner.length(slot) == 5
    assert runner.cached_tokens == 5  # what the verifier's KV-usage gauge reads
    other = runner.allocate()
    runner.forward([SeqInput(other, [7, 8])])
    assert runner.cached_tokens == 7
    runner.release(other)
    assert runner.cached_tokens == 5
    runner.allocate()
    with pytest.raises(BatchError, match="slots are in use"):
        runner.allocate()


def test_warm_up_runs_every_token_count_and_leaves_nothing_behind(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "llama", "llama")
    fresh = ModelRunner(folder, device="cpu", dtype="float32", max_slots=2, max_seq_len=32)
    runner = ModelRunner(folder, device="cpu", dtype="float32", max_slots=2, max_seq_len=32)
    counts = []
    forward = runner.forward
    runner.forward = lambda batch, **kw: counts.append(sum(len(s.tokens) for s in batch)) or forward(batch, **kw)
    assert runner.warm_up(100) == 32  # capped by the context
    assert counts == list(range(1, 33)) and runner.free_slots == 2
    # A request afterwards computes what it computes on a runner that never warmed up.
    for r in (fresh, runner):
        r.slot = r.allocate()
    tokens = [3, 1, 4, 1, 5]
    torch.testing.assert_close(runner.forward([SeqInput(runner.slot, tokens)])[0].logits,
                               fresh.forward([SeqInput(fresh.slot, tokens)])[0].logits, atol=0, rtol=0)
    runner.allocate()
    assert runner.warm_up(8) == 0  # no free slot: nothing to warm on, nothing taken
    assert runner.warm_up(0) == 0


def test_the_default_dtype_is_float32_on_every_device():
    # bf16 changes greedy tokens between chains and single tokens (docs/chain_invariance*.md in git history): opt-in only.
    for device in ("cpu", "cuda", "cuda:1"):
        assert parse_dtype(None, torch.device(device)) == torch.float32
        assert parse_dtype("auto", torch.device(device)) == torch.float32
    assert parse_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'bf8'"):
        parse_dtype("bf8", torch.device("cpu"))


def test_rope_that_rescales_with_length_runs_the_rotary_module_and_matches_transformers(tmp_path):
    # Dynamic NTK scaling changes cos/sin with the sequence's length past max_position_embeddings, so no
    # table is made at load and every forward runs transformers' rotary module (specdec/model/llama.py). The
    # runner holds no more positions than that, so the module's answer is the default one here: what is
    # tested is the path, whose sin the forward signs itself.
    folder = make_tiny_checkpoint(tmp_path / "dynamic", "llama", max_position_embeddings=64,
                                  rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert ModelRunner(folder, device="cpu", dtype="float32").weights.rope_cos is None
    run_scenario(folder, vocab=97, context_lengths=(3, 9, 17, 26), cycles=2, seed=7)

"""specdec.training.distill: training prompts kept apart from the held-out set, the target's replies and soft labels, the
draft's loss, and the offline tokens-per-step measure, on the tiny test models."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from specdec.ops.chat_prompts import load_chat_prompts
from specdec.training.distill import (
    HELD_OUT_OBJECTS,
    IGNORE,
    TOP_K,
    batch_loss,
    chat_ids,
    head_examples_from_records,
    init_draft,
    load_tokenizer,
    teacher_records,
    tokens_per_step,
    tree_tokens_per_step,
)
from specdec.model.runner import ModelRunner, SeqInput
from specdec.testing import make_tiny_stack_checkpoints

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The tiny target with a chat template, and 6 records of its replies to training prompts."""
    folder, _ = make_tiny_stack_checkpoints(tmp_path_factory.mktemp("distill"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


def built(count: int, seed: int) -> list[dict]:
    """build_prompts in a process of its own (it imports the whole standard library)."""
    code = f"import json; from specdec.training.distill import build_prompts; print(json.dumps(build_prompts({count}, {seed})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_training_prompts_are_unique_deterministic_and_never_the_held_out_ones():
    prompts = built(300, seed=1)
    assert len(prompts) == 300 and prompts == built(300, seed=1)
    texts = [p["messages"][-1]["content"] for p in prompts]
    assert len(set(texts)) == len(texts)
    sources = {p["source"].split()[0] for p in prompts}
    assert {"stdlib", "written", "python"} <= sources
    assert not any(name in p["source"].split() for p in prompts for name in HELD_OUT_OBJECTS)
    training = "\n".join(texts)
    for held in load_chat_prompts():
        for message in held.messages:
            for line in message.content.splitlines():
                if len(line) >= 60:
                    assert line not in training, (held.id, line)


def test_teacher_records_are_greedy_replies_with_their_soft_labels(target):
    tokenizer = load_tokenizer(target)
    runner = ModelRunner(target, device="cpu", dtype=torch.float32, max_slots=4, max_seq_len=256)
    prompts = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"question number {i} about bees"}]}
               for i in range(5)]
    records = teacher_records(runner, tokenizer, prompts, eos_ids={0}, batch=3, prefill_chunk=2)
    assert [r["id"] for r in records] == [p["id"] for p in prompts]
    for prompt, record in zip(prompts, records):
        tokens = record["tokens"].tolist()
        p = record["prompt_len"]
        assert tokens[:p] == chat_ids(tokenizer, prompt["messages"])
        assert record["top_ids"].shape == (len(tokens) - 1, TOP_K) == record["top_logp"].shape
        # Every reply token is the target's greedy choice after what precedes it.
        assert all(int(record["top_ids"][i, 0]) == tokens[i + 1] for i in range(p - 1, len(tokens) - 1))
        # And the rows are the target's own distribution: compare with one forward over the whole sequence.
        slot = runner.allocate()
        logits = runner.forward([SeqInput(slot, tokens[:-1])])[0].logits
        runner.release(slot)
        logp = torch.log_softmax(logits.float(), -1)
        torch.testing.assert_close(record["top_logp"].float(), logp.topk(TOP_K, -1).values, atol=2e-3, rtol=0)
    assert runner.free_slots == 4


def test_tokens_per_step_is_k_plus_one_for_a_perfect_draft_and_less_for_a_wrong_one(target, tmp_path):
    runner = ModelRunner(target, device="cpu", dtype=torch.float32, max_slots=2, max_seq_len=256)
    prompt = [5, 9, 200, 31]
    slot = runner.allocate()
    reply, logits = [], runner.forward([SeqInput(slot, prompt, last_logits_only=True)])[0].logits
    for _ in range(23):
        reply.append(int(logits[-1].argmax()))
        logits = runner.forward([SeqInput(slot, [reply[-1]], last_logits_only=True)])[0].logits
    runner.release(slot)
    for k in (1, 3, 4):
        made, steps = tokens_per_step(runner, prompt, reply, k)  # the target as its own draft
        assert made == 22 and steps == -(-22 // (k + 1))  # reply[0] is the prefill's
    assert runner.free_slots == 2
    wrong = list(reply)
    wrong[10] = (wrong[10] + 1) % 4096  # a reply the draft cannot predict at one position
    made, steps = tokens_per_step(runner, prompt, wrong, 4)
    assert made == 22 and steps > -(-22 // 5)


def test_a_few_steps_on_the_soft_labels_lower_the_drafts_loss(target):
    tokenizer = load_tokenizer(target)
    runner = ModelRunner(target, device="cpu", dtype=torch.float32, max_slots=4, max_seq_len=256)
    prompts = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"tell me about topic {i}"}]}
               for i in range(4)]
    records = teacher_records(runner, tokenizer, prompts, eos_ids={0}, batch=4)
    draft = init_draft(target)
    assert draft.config.vocab_size == 4096 and draft.config.tie_word_embeddings
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3)
    first, _ = batch_loss(draft, records)
    for _ in range(15):
        loss, stats = batch_loss(draft, random.Random(0).sample(records, 4))
        loss.backward()
        opt.step()
        opt.zero_grad()
    last, stats = batch_loss(draft, records)
    assert last.item() < 0.8 * first.item()
    assert stats["reply_positions"] == sum(len(r["tokens"]) - r["prompt_len"] for r in records)


class Oracle(torch.nn.Module):
    """Stand-in heads that know the reply: row r's head i puts all its mass on reply[r + 1 + i]."""

    def __init__(self, reply: list[int], num_heads: int, vocab: int = 4096) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.reply, self.num_heads, self.vocab = reply, num_heads, vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(hidden), self.num_heads, self.vocab), -30.0)
        for r in range(len(hidden)):
            for i in range(self.num_heads):
                if r + 1 + i < len(self.reply):
                    logits[r, i, self.reply[r + 1 + i]] = 30.0
        return logits * self.scale


def test_tree_tokens_per_step_accepts_whole_paths_of_right_heads_and_stops_at_a_wrong_one():
    reply = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    hidden = torch.zeros(len(reply), 8)
    made, steps = tree_tokens_per_step(Oracle(reply, 3), hidden, reply, budget=8)
    assert made == 10 and steps == -(-10 // 4)  # three heads right: 3 accepted + the bonus per step
    wrong = Oracle([reply[0], *[t + 1 for t in reply[1:]]], 3)  # every guess off by one
    assert tree_tokens_per_step(wrong, hidden, reply, budget=8) == (10, 10)


def test_head_examples_are_reply_states_labelled_with_the_tokens_two_and_more_ahead(target):
    tokenizer = load_tokenizer(target)
    runner = ModelRunner(target, device="cpu", dtype=torch.float32, max_slots=2, max_seq_len=256)
    prompts = [{"id": "h", "messages": [{"role": "user", "content": "a question about heads"}]}]
    (record,) = teacher_records(runner, tokenizer, prompts, eos_ids={0}, batch=1)
    x, y = head_examples_from_records(runner, [record], num_heads=3)
    tokens, p = record["tokens"].tolist(), record["prompt_len"]
    assert len(x) == len(y) == len(tokens) - 1 - p
    slot = runner.allocate()
    hidden = runner.forward([SeqInput(slot, tokens[:-1])], return_hidden=True)[0].hidden
    runner.release(slot)
    torch.testing.assert_close(x, hidden[p - 1: len(tokens) - 2].float())
    for r, t in enumerate(range(p - 1, len(tokens) - 2)):
        assert y[r, 0] == tokens[t + 2]
        assert y[r, 2] == (tokens[t + 4] if t + 4 < len(tokens) else IGNORE)

"""Train the embedded default models from the Python standard library on this machine.

Stages (run in order by default, or pick with --stage):

  tokenizer  byte-level BPE on the training files         -> <out>/tokenizer
  target     Llama target, next-token loss                -> <out>/code-target
  draft      Llama draft distilled from the target logits -> <out>/code-draft
  report     the figures docs/code_models.md records (needs the two checkpoints)

The corpus is every .py file of the interpreter's standard library except tests, idlelib and
site-packages; HELD_OUT_FILES are never trained on and serve the held-out loss and the
acceptance figures. The corpus itself is not committed: it is read from the machine.

Example (the command docs/code_models.md was made with):

    .venv/bin/python scripts/train_models.py --out models --seed 0 --docs docs

Defaults take about 50 minutes (target) + 20 minutes (draft) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.training.corpus import HELD_OUT_FILES, corpus_files, encode_corpus, read_text, stdlib_root  # noqa: F401

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int


TARGET_SHAPE = ModelShape(hidden_size=256, num_layers=12, intermediate_size=768, num_heads=4, num_kv_heads=4)
DRAFT_SHAPE = ModelShape(hidden_size=128, num_layers=2, intermediate_size=384, num_heads=2, num_kv_heads=2)
MAX_POSITIONS = 2048


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(out)
    print(f"tokenizer: {len(fast)} tokens -> {out}", flush=True)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def make_config(shape: ModelShape, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-5,
    )


def random_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(model, loss_fn, stream, args, steps: int, peak_lr: float, label: str) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=min(200, steps // 10 + 1))
        x = random_batch(stream, args.batch_size, args.seq_len, gen)
        loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"{label} step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def save_checkpoint(model, tokenizer_dir: Path, out: Path) -> None:
    model = model.to(torch.bfloat16)
    # Shards under 20 MB keep every tracked file small.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="16MB")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    print(f"saved {out}", flush=True)


def train_target(args, tokenizer, stream) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(make_config(TARGET_SHAPE, tokenizer))

    def loss_fn(x):
        return model(input_ids=x, labels=x).loss

    train_loop(model, loss_fn, stream, args, args.target_steps, args.target_lr, "target")
    save_checkpoint(model, args.out / "tokenizer", args.out / "code-target")


def train_draft(args, tokenizer, stream) -> None:
    """Distil the draft from the target's full next-token distributions (forward KL)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.out / "code-target", dtype=torch.float32).eval()
    torch.manual_seed(args.seed + 1)
    model = LlamaForCausalLM(make_config(DRAFT_SHAPE, tokenizer))

    def loss_fn(x):
        with torch.no_grad():
            target_logp = F.log_softmax(teacher(input_ids=x).logits, dim=-1)
        draft_logp = F.log_softmax(model(input_ids=x).logits, dim=-1)
        return F.kl_div(draft_logp, target_logp, log_target=True, reduction="batchmean") / x.shape[1]

    train_loop(model, loss_fn, stream, args, args.draft_steps, args.draft_lr, "draft")
    save_checkpoint(model, args.out / "tokenizer", args.out / "code-draft")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--stage", choices=["all", "tokenizer", "target", "draft", "report"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target-steps", type=int, default=1000)
    p.add_argument("--target-lr", type=float, default=2e-3)
    p.add_argument("--draft-steps", type=int, default=900)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-prompts", type=int, default=24, help="held-out prompts for acceptance figures")
    p.add_argument("--docs", type=Path, help="write the report to DOCS/code_models.md (and code_models.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    root = stdlib_root()
    train_files, held_files = corpus_files(root)
    print(f"corpus: {len(train_files)} training files, {len(held_files)} held out, from {root}", flush=True)
    stages = ["tokenizer", "target", "draft", "report"] if args.stage == "all" else [args.stage]

    if "tokenizer" in stages:
        train_tokenizer(read_text(train_files), args.out / "tokenizer")
    tokenizer = load_tokenizer(args.out / "tokenizer")
    if "target" in stages or "draft" in stages:
        stream = encode_corpus(tokenizer, read_text(train_files))
        print(f"training stream: {len(stream)} tokens", flush=True)
        if "target" in stages:
            train_target(args, tokenizer, stream)
        if "draft" in stages:
            train_draft(args, tokenizer, stream)
    if "report" in stages:
        from model_report import render_markdown, report

        figures = report(args, tokenizer, read_text(held_files))
        print(json.dumps(figures, indent=2), flush=True)
        if args.docs is not None:
            command = ".venv/bin/python scripts/train_models.py --out models --seed 0 --docs docs"
            (args.docs / "code_models.md").write_text(render_markdown(figures, HELD_OUT_FILES, command))
            (args.docs / "code_models.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

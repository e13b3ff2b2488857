"""Train Medusa-1 tree heads on the embedded target by self-distillation -> models/code-medusa.

1. Prompts: `--sequences` random windows of `--prompt-tokens` tokens from the TRAINING files of the
   standard-library corpus of scripts/train_models.py (held-out files are never trained on).
2. The target continues each prompt greedily for `--new-tokens` tokens through the model runner
   (batched; measured faster on this CPU than transformers' generate: ~740 vs ~650 tokens/s at batch 32),
   keeping its final-normed hidden state at every position from the last prompt token on.
3. Heads (`--heads`, `--layers` residual blocks each) start from the target's lm_head and are trained
   with cross-entropy of head i at position t on the target's own continuation token t + 2 + i: hard
   labels on its greedy choices, only where that token lies inside the continuation (see
   specdec/training/medusa_train.py for why not the prompt).
4. Per-head top-1 and top-k accuracy on rollouts of held-out prompts (the corpus's held-out files),
   before (lm_head init) and after training; the heads are saved as bf16 safetensors + config.json.

The command docs/medusa.md was made with (13 minutes on 2 shared CPU cores; the rollouts dominate):

    .venv/bin/python scripts/train_medusa.py --out models/code-medusa --seed 0 --docs docs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Run as a file: its folder is on sys.path (train_models), specdec is installed (`make install`).
from specdec.model.checkpoint import CODE_MEDUSA, CODE_TARGET
from specdec.model.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
from specdec.training.medusa_train import fit_heads, greedy_rollouts, head_accuracy, head_examples
from specdec.model.runner import ModelRunner
from specdec.training.corpus import HELD_OUT_FILES, corpus_files, encode_corpus, read_text, stdlib_root
from train_models import load_tokenizer

COMMAND = ".venv/bin/python scripts/train_medusa.py --out models/code-medusa --seed 0 --docs docs"


def sample_prompts(stream: torch.Tensor, count: int, length: int, gen: torch.Generator) -> list[list[int]]:
    """`count` random windows of `length` tokens of the stream."""
    starts = torch.randint(0, len(stream) - length, (count,), generator=gen)
    return [stream[s : s + length].tolist() for s in starts.tolist()]


def log(message: str) -> None:
    print(message, flush=True)


def format_accuracy(label: str, rows: list[dict], top_k: int) -> str:
    cells = "  ".join(f"head {r['head']}: top-1 {r['top1']:.1%} top-{top_k} {r['topk']:.1%}" for r in rows)
    return f"{label}: {cells}"


def render_markdown(figures: dict) -> str:
    a = figures["args"]
    k = a["top_k"]
    lines = [
        "# Medusa tree heads",
        "",
        "Medusa-1 heads on the embedded target `models/code-target`, trained by self-distillation. Head i reads the",
        "target's final-normed hidden state at position t (the one its lm_head maps to token t+1, the verifier's",
        "pending token) and guesses token t+2+i, so the heads propose a tree that follows the pending token.",
        "",
        "## Setup",
        "",
        f"- Heads: {a['heads']}, each {a['layers']} residual block(s) (h + SiLU(Linear(h))) and a [V, d] projection "
        f"initialised from the target's lm_head; d = {figures['hidden_size']}, V = {figures['vocab_size']}.",
        f"- Data: {a['sequences']} prompts of {a['prompt_tokens']} tokens, random windows of the training files of the "
        f"standard-library corpus ({figures['train_stream_tokens']} tokens); the target continues each greedily for "
        f"{a['new_tokens']} tokens; {figures['train_rows']} training positions.",
        "- Labels: the target's own continuation token t+2+i (hard labels on its greedy choices, only inside the "
        "continuation), cross-entropy summed over heads.",
        f"- Fit: {a['steps']} AdamW steps of {a['batch_size']} positions, peak lr {a['lr']}, warmup + cosine; "
        f"seed {a['seed']}; {a['threads']} torch threads.",
        f"- Held out: {a['eval_sequences']} prompts from the corpus's held-out files "
        f"({', '.join(HELD_OUT_FILES)}), continued the same way; {figures['eval_rows']} positions.",
        "",
        "Made with:",
        "",
        f"    {COMMAND}",
        "",
        "## Held-out accuracy per head",
        "",
        f"Top-1: the head's argmax is the target's token; top-{k}: the token is among the head's {k} best "
        f"(a tree with top_k={k} branches can hold it).",
        "",
        f"| head | predicts | top-1 | top-{k} | top-1 at init (lm_head copy) | top-1 on training positions |",
        "|---|---|---|---|---|---|",
    ]
    for r, r0, rt in zip(figures["held_out"], figures["held_out_init"], figures["train"]):
        lines.append(f"| {r['head']} | t+{r['head'] + 2} | {r['top1']:.1%} | {r['topk']:.1%} | {r0['top1']:.1%} | "
                     f"{rt['top1']:.1%} |")
    t = figures["seconds"]
    lines += [
        "",
        "## Sizes and time",
        "",
        f"- Parameters: {figures['parameters'] / 1e6:.2f}M; `models/code-medusa/model.safetensors` "
        f"{figures['weights_bytes'] / 1e6:.1f} MB (bf16).",
        f"- Wall time {t['total']:.0f} s: corpus {t['corpus']:.0f} s, target rollouts {t['rollouts']:.0f} s, "
        f"fit {t['fit']:.0f} s, evaluation {t['eval']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, default=CODE_TARGET)
    p.add_argument("--out", type=Path, default=CODE_MEDUSA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--sequences", type=int, default=2048, help="training prompts")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="greedy continuation per prompt")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=512, help="positions per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-sequences", type=int, default=128, help="held-out prompts")
    p.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy")
    p.add_argument("--rollout-batch", type=int, default=32, help="requests per runner batch while generating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", type=Path, help="write DOCS/medusa.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seconds = {}

    tokenizer = load_tokenizer(args.target)
    train_files, held_files = corpus_files(stdlib_root())
    train_stream = encode_corpus(tokenizer, read_text(train_files))
    held_stream = encode_corpus(tokenizer, read_text(held_files))
    seconds["corpus"] = time.perf_counter() - started
    log(f"corpus: {len(train_stream)} training tokens, {len(held_stream)} held-out tokens "
        f"({seconds['corpus']:.0f}s)")

    gen = torch.Generator().manual_seed(args.seed)
    train_prompts = sample_prompts(train_stream, args.sequences, args.prompt_tokens, gen)
    held_prompts = sample_prompts(held_stream, args.eval_sequences, args.prompt_tokens, gen)
    t0 = time.perf_counter()
    runner = ModelRunner(args.target, device="cpu", dtype=torch.float32, max_slots=args.rollout_batch,
                         max_seq_len=args.prompt_tokens + args.new_tokens)
    train_x, train_y = head_examples(
        greedy_rollouts(runner, train_prompts, args.new_tokens, args.rollout_batch), args.heads)
    held_x, held_y = head_examples(
        greedy_rollouts(runner, held_prompts, args.new_tokens, args.rollout_batch), args.heads)
    seconds["rollouts"] = time.perf_counter() - t0
    log(f"rollouts: {len(train_x)} training positions, {len(held_x)} held-out positions "
        f"({seconds['rollouts']:.0f}s)")

    torch.manual_seed(args.seed)
    config = MedusaConfig(hidden_size=runner.weights.hidden_size, vocab_size=runner.vocab_size,
                          num_heads=args.heads, num_layers=args.layers, target=args.target.name)
    heads = MedusaHeads(config)
    heads.init_from_lm_head(runner.weights.lm_head.weight.float().cpu())
    del runner
    t0 = time.perf_counter()
    init = head_accuracy(heads, held_x, held_y, args.top_k)
    log(format_accuracy("held-out at init", init, args.top_k))
    eval_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit_heads(heads, train_x, train_y, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
              log_every=100, log=log)
    seconds["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    held = head_accuracy(heads, held_x, held_y, args.top_k)
    sub = torch.randperm(len(train_x), generator=gen)[: len(held_x)]
    train = head_accuracy(heads, train_x[sub], train_y[sub], args.top_k)
    seconds["eval"] = eval_s + time.perf_counter() - t0
    log(format_accuracy("held-out", held, args.top_k))
    log(format_accuracy("training (sample)", train, args.top_k))

    save_medusa_heads(heads, args.out)
    weights_bytes = (args.out / "model.safetensors").stat().st_size
    seconds["total"] = time.perf_counter() - started
    log(f"saved {args.out} ({weights_bytes / 1e6:.1f} MB) in {seconds['total']:.0f}s")

    figures = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "train_stream_tokens": len(train_stream),
        "train_rows": len(train_x),
        "eval_rows": len(held_x),
        "parameters": sum(t.numel() for t in heads.parameters()),
        "weights_bytes": weights_bytes,
        "held_out_init": init,
        "held_out": held,
        "train": train,
        "seconds": seconds,
    }
    print(json.dumps(figures, indent=1), flush=True)
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        (args.docs / "medusa.md").write_text(render_markdown(figures))
        log(f"wrote {args.docs / 'medusa.md'}")


if __name__ == "__main__":
    main()

"""Distil a draft model for the default chat model (SmolLM2-135M-Instruct) from its own replies.

Stages (each writes into --work and is skipped when its output is there, so an interrupted run resumes):

  prompts   chat prompts built from text on this machine          -> <work>/prompts.jsonl
  replies   the target's greedy replies, with its top-k next-token log-probabilities at every position of
            prompt and reply (the soft labels)                     -> <work>/teacher-*.pt (shards)
  train     a small Llama draft trained on those soft labels      -> <out> (bf16 safetensors + tokenizer)
  heads     Medusa heads reading through the target's own lm_head, trained on its hidden states at the
            reply positions and the reply tokens 2, 3, 4 ahead   -> <heads-out>
  report    mean tokens per verify step (accepted + bonus) on the held-out chat prompts: the draft's chains at
            each --report-k, the heads' trees at each --report-budget; the forwards' cost at batch 1, and the
            learning curve                                         -> <work>/report.json

Prompt material is what the machine has and may be used: the Python standard library's docstrings (PSF
licence), the language reference topics that ship with it (pydoc_data), Debian's package READMEs under
/usr/share/doc, and instruction templates written here. The held-out set (bench/prompts/chat_heldout.jsonl)
is never used: the four stdlib docstrings it quotes are excluded by name, and tests check that no training
prompt contains a held-out passage.

    .venv/bin/python scripts/train_chat_draft.py --work runs/chat-draft --out models/smollm2-draft
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from specdec.ops.chat_prompts import load_chat_prompts
from specdec.training.distill import (
    MAX_PROMPT_TOKENS,
    MAX_REPLY_TOKENS,
    batch_loss,
    batches,
    build_prompts,
    head_examples_from_records,
    evaluate,
    forward_ms,
    init_draft,
    load_records,
    load_tokenizer,
    lr_at,
    teacher_records,
    tokens_per_step,
    tree_tokens_per_step,
)
from specdec.model.medusa import MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa_heads, target_lm_head
from specdec.training.medusa_train import fit_heads
from specdec.model.runner import ModelRunner, SeqInput

REPO = Path(__file__).resolve().parent.parent
HEADS = 3  # Medusa heads: tokens 2, 3 and 4 after the pending one
TARGET = REPO / "models" / "smollm2-135m-instruct"

def stage_replies(args) -> None:
    prompts = [json.loads(line) for line in (args.work / "prompts.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(args.target)
    eos_ids = stop_ids(args.target, tokenizer)
    runner = ModelRunner(args.target, device="cpu", dtype=torch.float32, max_slots=args.batch,
                         max_seq_len=MAX_PROMPT_TOKENS + MAX_REPLY_TOKENS + 8)
    shard_size = args.shard_size
    started = time.perf_counter()
    for shard, start in enumerate(range(0, len(prompts), shard_size)):
        path = args.work / f"teacher-{shard:04d}.pt"
        if path.exists():
            continue
        records = teacher_records(runner, tokenizer, prompts[start: start + shard_size], eos_ids, args.batch)
        torch.save(records, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        done = min(start + shard_size, len(prompts))
        reply = sum(len(r["tokens"]) - r["prompt_len"] for r in records)
        log(f"replies: {done}/{len(prompts)} prompts, shard {shard} has {reply} reply tokens "
            f"({time.perf_counter() - started:.0f} s)")


def stop_ids(target: Path, tokenizer) -> set[int]:
    gen = json.loads((target / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", tokenizer.eos_token_id)
    return set(eos if isinstance(eos, list) else [eos])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "chat-draft")
    p.add_argument("--out", type=Path, default=REPO / "models" / "smollm2-draft")
    p.add_argument("--target", type=Path, default=TARGET)
    p.add_argument("--heads-out", type=Path, default=REPO / "models" / "smollm2-medusa")
    p.add_argument("--stage", choices=("prompts", "replies", "train", "heads", "report", "all"), default="all")
    p.add_argument("--prompts", type=int, default=4000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--shard-size", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--resume", action="store_true",
                   help="train on from the draft in --out, extending its learning curve, instead of a new one")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tokens-per-batch", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--report-k", type=int, nargs="+", default=[4])
    p.add_argument("--report-budget", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--head-sequences", type=int, default=600, help="teacher sequences the heads train on")
    p.add_argument("--head-steps", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ("prompts", "replies", "train", "heads", "report") if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "prompts":
            path = args.work / "prompts.jsonl"
            if not path.exists():
                prompts = build_prompts(args.prompts, args.seed)
                path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
                log(f"prompts: {len(prompts)} written to {path}")
        elif stage == "replies":
            stage_replies(args)
        elif stage == "train":
            stage_train(args)
        elif stage == "heads":
            stage_heads(args)
        elif stage == "report":
            stage_report(args)


def stage_train(args) -> None:
    records = load_records(args.work)
    if not records:
        raise SystemExit(f"train: no teacher shards in {args.work}; run the replies stage first")
    rng = random.Random(args.seed)
    rng.shuffle(records)
    n_val = max(1, min(64, len(records) // 32))
    val, train = records[:n_val], records[n_val:]
    curve_path = args.work / "curve.json"
    if args.resume:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
        curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    else:
        model = init_draft(args.target)
        curve = []
    first, spent = (curve[-1]["step"], curve[-1]["seconds"]) if curve else (0, 0)
    params = sum(p.numel() for p in model.parameters())
    train_batches = batches(train, args.tokens_per_batch, rng)
    steps = len(train_batches) * args.epochs
    log(f"train: {len(train)} sequences ({sum(len(r['tokens']) for r in train)} tokens), {len(val)} held for "
        f"validation; draft of {params / 1e6:.1f}M parameters; {steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    started = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        if epoch:
            train_batches = batches(train, args.tokens_per_batch, rng)
        for group in train_batches:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, args.lr)
            model.train()
            loss, _ = batch_loss(model, group)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % args.eval_every == 0 or step == steps:
                val_loss, agree = evaluate(model, val, args.tokens_per_batch)
                curve.append({"step": first + step, "epoch": epoch, "train_loss": round(loss.item(), 4),
                              "val_loss": round(val_loss, 4), "val_top1_agreement": round(agree, 4),
                              "seconds": spent + round(time.perf_counter() - started)})
                log(f"train: step {step}/{steps} loss {loss.item():.3f} val {val_loss:.3f} "
                    f"top-1 agreement {agree:.3f} ({time.perf_counter() - started:.0f} s)")
                save_draft(model, args.target, args.out)
                (args.work / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")


def save_draft(model, target: Path, out: Path) -> None:
    """bf16 safetensors, config and the target's tokenizer and generation config (the draft shares them)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(target / name, out / name)


def stage_heads(args) -> None:
    examples = args.work / "head-examples.pt"
    if not examples.exists():
        records = load_records(args.work)[: args.head_sequences]
        runner = ModelRunner(args.target, device="cpu", dtype=torch.float32, max_slots=1,
                             max_seq_len=MAX_PROMPT_TOKENS + MAX_REPLY_TOKENS + 8)
        x, y = head_examples_from_records(runner, records, num_heads=HEADS)
        torch.save((x.to(torch.float16), y), examples)
        log(f"heads: {len(x)} examples from {len(records)} sequences")
    x, y = torch.load(examples)
    config = MedusaConfig(hidden_size=x.shape[1], vocab_size=json.loads((args.target / "config.json").read_text())
                          ["vocab_size"], num_heads=HEADS, num_layers=1, target=args.target.name, lm_head="target")
    heads = MedusaHeads(config)
    heads.init_from_lm_head(target_lm_head(args.target))
    losses = fit_heads(heads, x.float(), y, steps=args.head_steps, lr=1e-3, batch_size=128, seed=args.seed,
                       log_every=25, log=log)
    save_medusa_heads(heads, args.heads_out)
    (args.work / "head-losses.json").write_text(json.dumps([round(v, 4) for v in losses]) + "\n")
    log(f"heads: saved to {args.heads_out}")


def stage_report(args) -> None:
    held_out = load_chat_prompts()
    tokenizer = load_tokenizer(args.target)
    eos_ids = stop_ids(args.target, tokenizer)
    replies_path = args.work / "heldout-replies.pt"
    target = ModelRunner(args.target, device="cpu", dtype=torch.float32, max_slots=args.batch,
                         max_seq_len=MAX_PROMPT_TOKENS + MAX_REPLY_TOKENS + 8)
    if not replies_path.exists():
        records = teacher_records(target, tokenizer, [{"id": p.id, "messages": p.as_dicts()} for p in held_out],
                                 eos_ids, args.batch)
        torch.save([(r["tokens"][: r["prompt_len"]].tolist(), r["tokens"][r["prompt_len"]:].tolist())
                    for r in records], replies_path)
    pairs = torch.load(replies_path)
    report: dict = {"held_out_prompts": len(pairs), "reply_tokens": sum(len(r) for _, r in pairs)}
    draft = ModelRunner(args.out, device="cpu", dtype=torch.float32, max_slots=2,
                        max_seq_len=MAX_PROMPT_TOKENS + MAX_REPLY_TOKENS + 16)
    for k in args.report_k:
        made = steps = 0
        for prompt, reply in pairs:
            m, n = tokens_per_step(draft, prompt, reply, k)
            made, steps = made + m, steps + n
        report[f"draft_tokens_per_step_k{k}"] = round(made / steps, 3)
        log(f"report: draft k={k}: {made / steps:.3f} tokens per step over {len(pairs)} held-out prompts")
    if (args.heads_out / "config.json").exists():
        heads = load_medusa_heads(args.heads_out, target=args.target)
        states = []
        for prompt, reply in pairs:  # row j: the target's state that produced reply[j]
            slot = target.allocate()
            hidden = target.forward([SeqInput(slot, [*prompt, *reply[:-1]])], return_hidden=True)[0].hidden
            target.release(slot)
            states.append(hidden[len(prompt) - 1:].float())
        for budget in args.report_budget:
            made = steps = 0
            for (_, reply), hidden in zip(pairs, states):
                m, n = tree_tokens_per_step(heads, hidden, reply, budget)
                made, steps = made + m, steps + n
            report[f"medusa_tokens_per_step_budget{budget}"] = round(made / steps, 3)
            log(f"report: medusa budget {budget}: {made / steps:.3f} tokens per step")
    target_ms = [forward_ms(target) for _ in range(3)]
    draft_ms = [forward_ms(draft) for _ in range(3)]
    report["target_forward_ms_batch1"] = round(sorted(target_ms)[1], 3)
    report["draft_forward_ms_batch1"] = round(sorted(draft_ms)[1], 3)
    report["forward_cost_ratio"] = round(sorted(target_ms)[1] / sorted(draft_ms)[1], 2)
    curve = args.work / "curve.json"
    report["curve"] = json.loads(curve.read_text()) if curve.exists() else []
    (args.work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"report: {json.dumps({k: v for k, v in report.items() if k != 'curve'})}")


if __name__ == "__main__":
    main()

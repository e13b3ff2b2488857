"""Batch-1 latency on the held-out chat prompts: the stack per proposer against the target alone and against
Hugging Face transformers (plain `generate` and assisted generation with the same draft), every greedy reply
checked token for token against transformers `generate`.

The stack (verifier, the ngram, draft and medusa proposers, the scheduler with the `smartspec` policy) runs
on the default chat model unless --model/--draft-model/--medusa-model say otherwise; this process loads the
same target and draft with transformers beside it. For each of --prompts held-out chat prompts
(bench/prompts/chat_heldout.jsonl, taken in turn from each category, never trained on), one request at a time
(batch 1), greedy, up to --max-tokens new tokens, stopping at every end-of-sequence id the checkpoint
declares:

- the stack with proposer `none` (the target alone), `ngram`, `draft`, `medusa` and `auto` (the policy
  chooses per step): the chat messages go to the scheduler, which applies the checkpoint's chat template;
- `hf-generate` and `hf-assisted` (`assistant_model` = the draft): transformers' `apply_chat_template` then
  `generate`, in this process.

Every configuration serves a prompt before the next prompt starts, in an order that rotates from prompt to
prompt, so that what else the machine does weighs on all of them alike. One warm-up request per
configuration is not counted. Latency is the client's wall time of the whole reply. Reported per
configuration: mean latency, mean reply length, tokens per target step, the speed-up over the stack's `none`
and over `hf-assisted` (ratio of mean latencies, with a 90% bootstrap interval over prompts), and how many
replies differ from `hf-generate`'s (any difference makes the exit status 1).

    python -m bench.chat_latency --out docs/bench          # 20 prompts, 128 tokens: ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.hf_peers import load_peer_models, serve_one
from bench.http_overhead import bootstrap
from specdec.ops.chat_prompts import CATEGORIES, ChatPrompt, load_chat_prompts

STACK_PROPOSERS = ("ngram", "draft", "medusa")
STACK_CONFIGS = ("none", *STACK_PROPOSERS, "auto")
PEER_CONFIGS = ("hf-generate", "hf-assisted")


def pick_prompts(count: int) -> list[ChatPrompt]:
    """`count` held-out prompts, one from each category in turn, in file order within a category."""
    by_category = defaultdict(list)
    for prompt in load_chat_prompts():
        by_category[prompt.category].append(prompt)
    picked: list[ChatPrompt] = []
    depth = 0
    while len(picked) < count and any(depth < len(v) for v in by_category.values()):
        picked += [by_category[c][depth] for c in CATEGORIES if depth < len(by_category[c])]
        depth += 1
    return picked[:count]


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per configuration: the means, and speed-ups (with 90% intervals over prompts) over none and hf-assisted."""
    out = {}
    for config, rows in runs.items():
        ms = [r["latency_ms"] for r in rows]
        tokens = sum(r["tokens"] for r in rows)
        steps = sum(r["steps"] for r in rows if r["steps"] is not None)
        entry = {"mean_latency_ms": round(sum(ms) / len(ms), 1), "mean_tokens": round(tokens / len(rows), 1),
                 "tokens_per_step": round(tokens / steps, 3) if steps else None,
                 "differ_from_hf_generate": sum(not r["same_as_hf_generate"] for r in rows)}
        for base in ("none", "hf-assisted"):
            if base in runs and base != config:
                pairs = list(zip((r["latency_ms"] for r in runs[base]), ms))
                ratio = sum(b for b, _ in pairs) / sum(x for _, x in pairs)
                low, high = bootstrap(pairs, lambda p: sum(b for b, _ in p) / sum(x for _, x in p))
                entry[f"speedup_over_{base.replace('-', '_')}"] = [round(ratio, 3), round(low, 3), round(high, 3)]
        out[config] = entry
    return out


def table(summary: dict[str, dict]) -> str:
    def speed(entry, key):
        v = entry.get(key)
        return f"{v[0]:.2f}x ({v[1]:.2f}..{v[2]:.2f})" if v else "-"

    lines = ["| configuration | mean latency (ms) | mean tokens | tokens per step | vs none (90% CI) "
             "| vs hf-assisted (90% CI) | differ from hf-generate |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for config, e in summary.items():
        tps = f"{e['tokens_per_step']:.2f}" if e["tokens_per_step"] else "-"
        lines.append(f"| {config} | {e['mean_latency_ms']:.0f} | {e['mean_tokens']:.1f} | {tps} | "
                     f"{speed(e, 'speedup_over_none')} | {speed(e, 'speedup_over_hf_assisted')} | "
                     f"{e['differ_from_hf_generate']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from specdec.model.checkpoint import DEFAULT_DRAFT, DEFAULT_MEDUSA, DEFAULT_TARGET
    from specdec.ops.launcher import Stack, free_ports, local_specs
    from specdec_client import Client

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=20, help="held-out chat prompts (default 20)")
    p.add_argument("--max-tokens", type=int, default=128, help="most new tokens per reply (default 128)")
    p.add_argument("--model", type=Path, default=DEFAULT_TARGET)
    p.add_argument("--draft-model", type=Path, default=DEFAULT_DRAFT)
    p.add_argument("--medusa-model", type=Path, default=DEFAULT_MEDUSA)
    p.add_argument("--threads", type=int, default=2, help="torch threads of transformers in this process")
    p.add_argument("--service-threads", type=int, default=0,
                   help="torch threads of every service (SPECDEC_TORCH_THREADS); 0 = each service's default")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = pick_prompts(args.prompts)
    peers = load_peer_models(args.model, args.draft_model, device="cpu", dtype="float32")

    (port,) = free_ports(1)
    specs = local_specs(port, STACK_PROPOSERS, policy="smartspec", model=args.model, draft_model=args.draft_model,
                        medusa_model=args.medusa_model,
                        env={"SPECDEC_TORCH_THREADS": str(args.service_threads)} if args.service_threads else None)
    runs: dict[str, list[dict]] = {c: [] for c in (*STACK_CONFIGS, *PEER_CONFIGS)}
    configs = list(runs)
    started = time.perf_counter()
    with Stack(specs, startup_timeout_s=600, echo=None) as _, Client(f"127.0.0.1:{port}") as client:
        client.wait_ready(timeout=600)
        # Every end-of-sequence id the stack stops at (the checkpoint's, as the verifier reads them): transformers
        # stops at the same ones (load_peer_models turned its EOS off).
        eos = client.model_info().eos_token_ids
        for model in (peers.target, peers.draft):
            model.generation_config.eos_token_id = eos

        def serve(config: str, prompt: ChatPrompt) -> dict:
            if config in PEER_CONFIGS:
                ids = peers.tokenizer.apply_chat_template(prompt.as_dicts(), add_generation_prompt=True,
                                                          tokenize=True, return_dict=False)
                served = serve_one(peers, config, list(ids), args.max_tokens)
                return {"token_ids": served.token_ids, "latency_ms": served.service_s * 1e3,
                        "tokens": len(served.token_ids), "steps": served.steps}
            t0 = time.perf_counter()
            result = client.chat(prompt.as_dicts(), max_tokens=args.max_tokens, temperature=0.0,
                                 proposer="" if config == "auto" else config, timeout=600)
            elapsed = time.perf_counter() - t0
            return {"token_ids": list(result.token_ids), "latency_ms": elapsed * 1e3,
                    "tokens": result.stats.completion_tokens, "steps": result.stats.steps,
                    "proposers": {name: [p.steps, p.proposed, p.accepted]  # steps served, proposed, accepted
                                  for name, p in result.stats.proposers.items()}}

        for config in configs:  # warm-up: first calls pay for lazy initialisation
            serve(config, prompts[0])
        for i, prompt in enumerate(prompts):
            order = configs[i % len(configs):] + configs[: i % len(configs)]
            served = {config: serve(config, prompt) for config in order}
            reference = served["hf-generate"]["token_ids"]
            # A reply that ends at EOS: transformers keeps the EOS token in its output, the stack does not.
            if reference and reference[-1] in eos:
                reference = reference[:-1]
            for config, row in served.items():
                ids = row.pop("token_ids")
                if ids and ids[-1] in eos:
                    ids = ids[:-1]
                row["same_as_hf_generate"] = ids == reference
                row["prompt"] = prompt.id
                runs[config].append(row)
            print(f"[{time.perf_counter() - started:6.0f} s] {i + 1}/{len(prompts)} {prompt.id}: "
                  + ", ".join(f"{c} {served[c]['latency_ms']:.0f} ms" for c in configs), file=sys.stderr, flush=True)

    summary = summarise(runs)
    settings = {"prompts": [p.id for p in prompts], "max_tokens": args.max_tokens, "threads": args.threads,
                "service_threads": args.service_threads,
                "model": args.model.name, "draft_model": args.draft_model.name,
                "medusa_model": args.medusa_model.name, "eos_token_ids": eos}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat_latency.json").write_text(json.dumps({"settings": settings, "summary": summary,
                                                             "requests": runs}, indent=1) + "\n")
    text = (f"Batch-1 latency on {len(prompts)} held-out chat prompts, up to {args.max_tokens} tokens each "
            f"(`python -m bench.chat_latency`):\n\n" + table(summary))
    (args.out / "chat_latency.md").write_text(text)
    print(text)
    differ = sum(e["differ_from_hf_generate"] for c, e in summary.items() if c in STACK_CONFIGS)
    if differ:
        print(f"{differ} stack replies differ from transformers generate", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

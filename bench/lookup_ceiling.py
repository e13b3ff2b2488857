"""How far prompt lookup could go on the serving benchmark's workloads: its best case, offline.

The embedded target greedily continues each prompt of `bench.serving`'s workloads (`--requests`, seed 0,
`--max-tokens`, EOS ignored as in the benchmark), through transformers. Then prompt lookup
(`proposer_svc.ngram.NgramProposer`) replays that output with `--k` candidates per step against a
verifier that costs nothing: a step commits the accepted candidates and one more token. Steps per
request against `--max-tokens` (plain decoding's steps) bound the latency gain of prompt lookup alone;
fewer steps cannot help more than that however cheap speculation gets. Then whether the target copies
from its context at all: its accuracy on a snippet's second copy against its first.

    .venv/bin/python bench/lookup_ceiling.py --out docs/bench/lookup_ceiling.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import made_with, write_lines
from bench.serving import WORKLOADS, _tokenizer, code_completion_prompts
from proposer_svc.ngram import NgramProposer, NgramState


def lookup_steps(proposer: NgramProposer, prompt: list[int], output: list[int], k: int) -> tuple[int, int]:
    """(steps, accepted candidates) of prompt lookup with k candidates per step on a known output."""
    state = NgramState()
    proposer.extend(state, prompt)
    steps = accepted_total = pos = 0
    while pos < len(output):
        accepted = 0
        for token in proposer.lookup(state, k):
            if pos + accepted < len(output) and token == output[pos + accepted]:
                accepted += 1
            else:
                break
        n = min(accepted + 1, len(output) - pos)
        proposer.extend(state, output[pos:pos + n])
        pos, steps, accepted_total = pos + n, steps + 1, accepted_total + n - 1
    return steps, accepted_total


def copy_accuracy(model, snippets: list[list[int]], blank: list[int]) -> tuple[float, float]:
    """In-context copying: each snippet, `blank` (a blank line's tokens), the snippet again; the model's
    next-token top-1 accuracy (teacher-forced, from the 5th token on) over the second copy and the first."""
    import torch

    right = [0, 0]
    total = 0
    for ids in snippets:
        x = torch.tensor([ids + blank + ids])
        with torch.no_grad():
            pred = model(input_ids=x).logits[0].argmax(-1)
        second = len(ids) + len(blank)
        for j in range(4, len(ids) - 1):
            right[0] += int(pred[second + j] == x[0, second + j + 1])
            right[1] += int(pred[j] == x[0, j + 1])
            total += 1
    return right[0] / total, right[1] / total


def greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def main() -> int:
    from transformers import AutoModelForCausalLM

    from specdec.model.checkpoint import CODE_TARGET

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CODE_TARGET))
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="candidates per step (smartspec's largest k)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tokenizer = _tokenizer()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32").eval()
    proposer = NgramProposer(max_budget=args.k)
    lines = [
        "# Prompt lookup's ceiling on the benchmark workloads",
        "",
        (f"Greedy outputs of `{Path(args.model).name}` ({args.requests} prompts per workload, seed 0, "
         f"{args.max_tokens} tokens), replayed by prompt lookup with {args.k} candidates per step against a "
         "verifier that costs nothing. Made with:"),
        "",
        made_with("bench/lookup_ceiling.py"),
        "",
        (f"| workload | steps per request (plain: {args.max_tokens}) | accepted per step "
         "| best speed-up from prompt lookup |"),
        "| --- | --- | --- | --- |",
    ]
    for workload, make in WORKLOADS.items():
        steps, accepted = [], []
        for text in make(args.requests, 0):
            prompt = tokenizer.encode(text).ids
            s, a = lookup_steps(proposer, prompt, greedy(model, prompt, args.max_tokens), args.k)
            steps.append(s)
            accepted.append(a)
        mean_steps = statistics.mean(steps)
        lines.append(f"| {workload} | {mean_steps:.1f} | {sum(accepted) / sum(steps):.2f} | "
                     f"{args.max_tokens / mean_steps:.2f}x |")
    snippets = [tokenizer.encode(t).ids[:80] for t in code_completion_prompts(16, 3)]
    second, first = copy_accuracy(model, snippets, tokenizer.encode("\n\n").ids)
    lines += [
        "",
        ("Does the target copy from its context? Each of 16 held-out code snippets (80 tokens, seed 3) is fed "
        "twice, a blank line between; next-token top-1 accuracy, teacher-forced:"),
        "",
        "| on the first copy | on the second copy (the answer is in the context) |",
        "| --- | --- |",
        f"| {first:.1%} | {second:.1%} |",
    ]
    return write_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

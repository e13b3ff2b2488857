"""Does a verified chain score its tokens as decoding them one at a time does, per dtype?

For each prompt of the serving benchmark's workloads (`--requests` per workload, seed 0), the target
decodes `--max-tokens` tokens greedily, one per forward, through the model runner; then the same
tokens are re-run from the same context in chains of `--chain` (a verifier step's shape). Reported
per dtype: the largest logit difference between the two, and how often the argmax differs (a flip:
speculative greedy output would part from the target's own there).

    .venv/bin/python bench/chain_invariance.py --out docs/chain_invariance.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import made_with, write_lines
from bench.serving import WORKLOADS, _tokenizer
from specdec.model.checkpoint import CODE_TARGET
from specdec.model.runner import ModelRunner, default_device
from specdec.testing import logits_alone_and_in_chains


def compare(runner: ModelRunner, prompt: list[int], max_tokens: int, chain: int) -> tuple[float, int]:
    """(max |logit difference|, argmax flips) between one-at-a-time decoding and chains of `chain`."""
    _, alone, chained = logits_alone_and_in_chains(runner, prompt, max_tokens, (chain,))
    pairs = [(a.float(), b.float()) for a, b in zip(alone, chained[chain], strict=True)]
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    return diff, sum(int(a.argmax()) != int(b.argmax()) for a, b in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CODE_TARGET))
    parser.add_argument("--dtypes", default="float32,float32:plain,bfloat16",
                        help="runner dtypes; ':plain' = F.linear projections instead of prepacked ones")
    parser.add_argument("--requests", type=int, default=20, help="prompts per workload")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chain", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="runner device: cpu, cuda, auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = _tokenizer()
    prompts = [tokenizer.encode(text).ids for make in WORKLOADS.values() for text in make(args.requests, 0)]
    device = default_device() if args.device == "auto" else torch.device(args.device)
    where = (f"on {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"on CPU ({args.threads} threads)")
    lines = [
        "# Chains against one token at a time",
        "",
        (f"`{Path(args.model).name}` through the model runner {where}: {len(prompts)} prompts "
         f"of the serving benchmark ({', '.join(WORKLOADS)}), {args.max_tokens} greedy tokens each decoded one "
         f"per forward, then re-run in chains of {args.chain}. Made with:"),
        "",
        made_with("bench/chain_invariance.py"),
        "",
        "| dtype | projections | max logit difference | argmax flips | requests with a flip |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in args.dtypes.split(","):
        dtype, _, variant = entry.partition(":")
        runner = ModelRunner(args.model, device=device, dtype=dtype, max_slots=1, prepack=False if variant else None,
                             max_seq_len=max(map(len, prompts)) + args.max_tokens)
        results = [compare(runner, p, args.max_tokens, args.chain) for p in prompts]
        flips = sum(f for _, f in results)
        projections = "oneDNN, prepacked" if runner.weights.prepacked else "F.linear"
        lines.append(f"| {dtype} | {projections} | {max(d for d, _ in results):.2e} | "
                     f"{flips} of {len(prompts) * args.max_tokens} | {sum(f > 0 for _, f in results)} of {len(prompts)} |")
    return write_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

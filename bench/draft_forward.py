"""The draft's forward in torch against NumPy (specdec/model/numpy_forward.py), measured side by side.

Two runners of the same checkpoint, one whose `next_tokens` runs the torch forward and one the NumPy
path, take turns in blocks of `BLOCK` forwards (which goes first alternates; in blocks, so that each path
runs on caches it has warmed, as in its own service, while the machine's drift still spreads over both)
on the same shapes: `batch` requests, each holding
`--context` cached tokens, bring `new` tokens each, and the greedy next token of each is read, as the
draft proposer does; the slots are rolled back after every forward. Medians of `--repeats` forwards per
point, with one torch thread and one BLAS thread, as the draft service runs.

    .venv/bin/python bench/draft_forward.py --out docs/draft_forward.md
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import made_with, write_lines
from bench.runner_cost import prefilled_slots
from specdec.model.checkpoint import CODE_DRAFT
from specdec.model.runner import ModelRunner, SeqInput

PATHS = ("torch", "numpy")
BLOCK = 10  # forwards of one path in a row


def next_tokens_ms(runner: ModelRunner, slots: list[int], new: int, rng: random.Random) -> float:
    """One `next_tokens` over `new` random tokens on each slot, rolled back after; its ms."""
    seqs = [SeqInput(s, [rng.randrange(runner.vocab_size) for _ in range(new)]) for s in slots]
    t0 = time.perf_counter()
    runner.next_tokens(seqs)
    elapsed = time.perf_counter() - t0
    for s in seqs:
        runner.accept(s.slot, [])
    return elapsed * 1e3


def measure(model: str, shapes: list[tuple[int, int]], context: int, repeats: int, seed: int) -> dict:
    """{(batch, new): {path: median ms}} of the two paths, interleaved block by block."""
    rng = random.Random(seed)
    batch_max = max(b for b, _ in shapes)
    runners = {path: ModelRunner(model, device="cpu", dtype="float32", max_slots=batch_max,
                                 max_seq_len=context + 64, numpy_chains=path == "numpy") for path in PATHS}
    if not runners["numpy"].runs_numpy:
        raise SystemExit(f"{model}: the NumPy forward cannot run this model (specdec/numpy_forward.supports)")
    slots = {path: prefilled_slots(r, batch_max, context, rng) for path, r in runners.items()}
    results = {}
    for batch, new in shapes:
        times: dict[str, list[float]] = {path: [] for path in PATHS}
        for i in range(-(-repeats // BLOCK)):
            for path in (PATHS if i % 2 else PATHS[::-1]):
                times[path] += [next_tokens_ms(runners[path], slots[path][:batch], new, rng) for _ in range(BLOCK)]
        results[(batch, new)] = {path: statistics.median(ts) for path, ts in times.items()}
    return results


def report(results: dict, model: str, context: int, repeats: int) -> list[str]:
    lines = [
        "# The draft's forward: torch against NumPy",
        "",
        (f"Median ms of one forward of `{Path(model).name}` on {platform.machine()} CPU (one torch thread, one "
         f"BLAS thread, as the draft service runs), each request holding {context} cached tokens and bringing "
         f"`new` tokens, its greedy next token read; the two paths interleaved in blocks of {BLOCK} forwards, "
         f"{repeats} forwards per point. The draft proposer decodes one token per request per forward after its "
         "first, which catches up on the accepted tokens."),
        "",
        "Made with:",
        "",
        made_with("bench/draft_forward.py"),
        "",
        "| batch | new tokens | torch ms | NumPy ms | NumPy / torch |",
        "|---|---|---|---|---|",
    ]
    for (batch, new), ms in results.items():
        lines.append(f"| {batch} | {new} | {ms['torch']:.3f} | {ms['numpy']:.3f} | {ms['numpy'] / ms['torch']:.2f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(CODE_DRAFT))
    p.add_argument("--batches", default="1,4,8,16", help="requests per forward")
    p.add_argument("--new", default="1,4", help="new tokens per request")
    p.add_argument("--context", type=int, default=160, help="cached tokens per request")
    p.add_argument("--repeats", type=int, default=300, help="forwards per point and path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    shapes = [(int(b), int(n)) for b in args.batches.split(",") for n in args.new.split(",")]
    results = measure(args.model, shapes, args.context, args.repeats, args.seed)
    return write_lines(report(results, args.model, args.context, args.repeats), args.out)


if __name__ == "__main__":
    sys.exit(main())

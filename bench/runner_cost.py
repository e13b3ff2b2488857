"""Cost surface of the model runner: step time vs batch size and new tokens per request.

Every request holds `--context` cached tokens; one step runs `new` tokens (a chain) for each of the
`batch` requests, then rolls them back so the context stays fixed. Points are measured in an
interleaved order, repeated `--repeats` times, and the median is reported, so that the machine's
drift spreads over the whole table instead of biasing one corner of it.

Where the runner prepacks its projection weights for oneDNN (CPU, fp32: specdec/model/linear.py), a second
runner with plain `F.linear` projections is measured in the same loop, point by point, and the report
adds its table and the ratio of the two.

    python -m bench.runner_cost                  # prints the tables (the one in docs/benchmarks.md)
    python -m bench.runner_cost --out cost.md    # and writes them as markdown, every sample in cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from specdec.model.checkpoint import CODE_TARGET
from specdec.model.runner import ModelRunner, SeqInput


def prefilled_slots(runner: ModelRunner, count: int, context: int, rng: random.Random) -> list[int]:
    """`count` slots of the runner, each holding `context` random tokens."""
    slots = [runner.allocate() for _ in range(count)]
    for s in slots:
        runner.forward([SeqInput(s, [rng.randrange(runner.vocab_size) for _ in range(context)])])
    return slots


def measure(runner: ModelRunner, slots: list[int], batch: int, new: int, rng: random.Random) -> float:
    """One forward of `new` random tokens on each of the first `batch` slots, rolled back after; its ms."""
    seqs = [SeqInput(s, [rng.randrange(runner.vocab_size) for _ in range(new)]) for s in slots[:batch]]
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner.forward(seqs)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    for s in seqs:
        runner.accept(s.slot, [])
    return elapsed * 1e3


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.runner_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(CODE_TARGET))
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--new-tokens", default="1,2,3,4,5,6,7,8,9")
    p.add_argument("--context", type=int, default=128, help="cached tokens per request")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, help="markdown table to write (JSON beside it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    news = [int(x) for x in args.new_tokens.split(",")]
    rng = random.Random(0)

    def make(prepack: bool | None) -> tuple[ModelRunner, list[int]]:
        runner = ModelRunner(args.model, dtype=args.dtype, max_slots=max(batch_sizes),
                             max_seq_len=args.context + 16, prepack=prepack)
        return runner, prefilled_slots(runner, max(batch_sizes), args.context, rng)

    runner, slots = make(None)
    runners = {"served": (runner, slots)}
    if runner.weights.prepacked:
        runners["plain"] = make(False)
    points = [(b, n) for b in batch_sizes for n in news]
    for b, n in points[:4]:  # warm-up
        for r, s in runners.values():
            measure(r, s, b, n, rng)
    samples = {name: {pt: [] for pt in points} for name in runners}
    for _ in range(args.repeats):
        rng.shuffle(points)
        for b, n in points:
            for name, (r, s) in runners.items():
                samples[name][(b, n)].append(measure(r, s, b, n, rng))
    median = {name: {pt: statistics.median(v) for pt, v in per.items()} for name, per in samples.items()}

    def render(cell) -> str:
        header = "| batch \\ new tokens | " + " | ".join(str(n) for n in news) + " |"
        lines = [header, "|" + "---|" * (len(news) + 1)]
        lines += [f"| {b} | " + " | ".join(cell(b, n) for n in news) + " |" for b in batch_sizes]
        return "\n".join(lines)

    table = render(lambda b, n: f"{median['served'][(b, n)]:.2f}")
    print(table)
    extra: list[str] = []
    if "plain" in runners:
        plain = render(lambda b, n: f"{median['plain'][(b, n)]:.2f}")
        ratio = render(lambda b, n: f"{median['plain'][(b, n)] / median['served'][(b, n)]:.2f}")
        print(plain, ratio, sep="\n\n")
        extra = [
            "The same points with plain `F.linear` projections (MKL sgemm), measured in the same loop:",
            "",
            plain,
            "",
            "Plain over prepacked (above 1: the prepacked runner is faster):",
            "",
            ratio,
            "",
        ]
    if args.out:
        device = (torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda"
                  else f"{runner.device.type} ({platform.processor() or platform.machine()}, {args.threads} threads)")
        doc = [
            "# Runner cost surface",
            "",
            f"Median step time in ms of `{Path(args.model).name}` ({runner.weights.num_params / 1e6:.1f}M parameters, "
            f"{runner.dtype}) on {device}: one forward of `batch` requests, each bringing `new tokens` (a chain) on "
            f"top of {args.context} cached tokens; {args.repeats} repeats in shuffled order. Projections "
            + ("prepacked for oneDNN, as the services run them." if "plain" in runners else "through `F.linear`."),
            "",
            "Made with:",
            "",
            "    " + " ".join(["python -m bench.runner_cost", *sys.argv[1:]]),
            "",
            table,
            "",
            *extra,
        ]
        args.out.write_text("\n".join(doc))
        raw = {name: {f"{b}x{n}": per[(b, n)] for b, n in sorted(per)} for name, per in samples.items()}
        args.out.with_suffix(".json").write_text(json.dumps({"context": args.context, "ms": raw}, indent=1))


if __name__ == "__main__":
    main()

"""Where a forward of the model runner spends its time on a GPU: the step against the kernels' own time.

For each (batch, new tokens) point, every request holding `--context` cached tokens: the median step time
of `--steps` forwards (bench/runner_cost.py's measure(): synchronised before and after), then
`--profiled` more forwards under torch.profiler, which counts the kernels launched, the host-to-device
copies and the kernels' summed time a forward. A step far above its kernel time is spent on the host:
launching kernels one by one and building the batch. Also listed: the operators taking the most kernel
time at the last point.

    .venv/bin/python bench/runner_profile.py --out docs/runner_profile_h200.md

On CPU there are no kernels to count: the table gives the step times only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import made_with, write_lines
from bench.runner_cost import measure, prefilled_slots
from specdec.model.checkpoint import CODE_TARGET
from specdec.model.runner import ModelRunner

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def parse_points(text: str) -> list[tuple[int, int]]:
    """'1x1,8x4' -> [(1, 1), (8, 4)]: batch x new tokens per request."""
    points = []
    for item in text.split(","):
        batch, _, new = item.partition("x")
        points.append((int(batch), int(new)))
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CODE_TARGET))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per request")
    parser.add_argument("--points", default="1x1,1x4,8x1,8x4,16x4", help="batch x new tokens, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="timed forwards per point")
    parser.add_argument("--profiled", type=int, default=5, help="profiled forwards per point")
    parser.add_argument("--out", type=Path, help="markdown report to write")
    args = parser.parse_args()
    points = parse_points(args.points)
    runner = ModelRunner(args.model, device=None if args.device == "auto" else args.device, dtype=args.dtype,
                         max_slots=max(b for b, _ in points), max_seq_len=args.context + max(n for _, n in points) + 1)
    cuda = runner.device.type == "cuda"
    rng = random.Random(0)
    slots = prefilled_slots(runner, max(b for b, _ in points), args.context, rng)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows, events = [], None
    for batch, new in points:
        for _ in range(5):  # warm-up: kernels chosen, caches filled
            measure(runner, slots, batch, new, rng)
        median = statistics.median(measure(runner, slots, batch, new, rng) for _ in range(args.steps))
        with profile(activities=activities) as prof:
            for _ in range(args.profiled):
                measure(runner, slots, batch, new, rng)
        events = prof.key_averages()
        per = args.profiled
        launches = sum(e.count for e in events if e.key in LAUNCHES) / per
        copies = sum(e.count for e in events if e.key.startswith("cudaMemcpy")) / per
        # Kernels only: an operator's row repeats the time of the kernels it launched.
        kernel_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / per / 1e3
        rows.append((batch, new, median, kernel_ms, launches, copies))

    where = torch.cuda.get_device_name(runner.device) if cuda else f"{runner.device.type}"
    lines = [
        "# Runner profile",
        "",
        (f"`{Path(args.model).name}` ({runner.dtype}) through the model runner on {where}, {args.context} cached "
         f"tokens per request: the median of {args.steps} forwards, then {args.profiled} forwards under "
         "torch.profiler (kernel time: the kernels' summed time a forward). Made with:"),
        "",
        made_with("bench/runner_profile.py"),
        "",
        "| batch | new tokens | step (ms) | kernel time (ms) | kernels launched | host-to-device copies |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for batch, new, median, kernel_ms, launches, copies in rows:
        gpu = f"{kernel_ms:.2f} | {launches:.0f} | {copies:.0f}" if cuda else "– | – | –"
        lines.append(f"| {batch} | {new} | {median:.2f} | {gpu} |")
    if cuda and events is not None:
        operators = [e for e in events if e.device_type == DeviceType.CPU]
        top = sorted(operators, key=lambda e: e.self_device_time_total, reverse=True)[:8]
        batch, new = points[-1]
        lines += [
            "",
            f"Operators by kernel time at batch {batch} x {new} tokens, per forward:",
            "",
            "| operator | calls | kernel time (ms) |",
            "| --- | --- | --- |",
            *(f"| `{e.key}` | {e.count / args.profiled:.0f} | {e.self_device_time_total / args.profiled / 1e3:.2f} |"
              for e in top),
        ]
    return write_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

"""How much the machine's own speed moves while a benchmark runs: one fixed forward, timed for minutes.

The serving benchmark compares policies whose runs are seconds to minutes apart; if the machine itself
runs the same work faster or slower from one minute to the next, that drift enters every comparison.
This times one unchanging piece of work, the target's verify forward as the verifier runs it (batch 1,
`--new` tokens on `--context` cached tokens, rolled back after each call, torch's default threads), back
to back for `--seconds`, and takes the median of each `--block-s` window. Nothing else should run.

Reported: every window's median, and for windows `lag` seconds apart (how far apart two policies' runs
of one benchmark cell come), the ratio of the slower window's median to the faster one's: what two runs
of identical work would show as a difference between them.

    .venv/bin/python bench/machine_drift.py --out docs/machine_drift.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import made_with, write_lines
from bench.serving import percentile
from specdec.model.checkpoint import CODE_TARGET

LAGS_S = (2, 10, 30, 60, 120)


def window_medians(forward, seconds: float, block_s: float) -> list[float]:
    """The median ms of `forward()` over each consecutive `block_s` window, for `seconds` in all."""
    medians = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        block_end = time.perf_counter() + block_s
        times = []
        while time.perf_counter() < block_end:
            start = time.perf_counter()
            forward()
            times.append((time.perf_counter() - start) * 1e3)
        medians.append(statistics.median(times))
    return medians


def lag_ratios(medians: list[float], block_s: float, lags_s=LAGS_S) -> dict[float, list[float]]:
    """For each lag (s), slower / faster median of every pair of windows that far apart."""
    ratios = {}
    for lag in lags_s:
        step = max(1, round(lag / block_s))
        pairs = zip(medians, medians[step:])
        ratios[lag] = [max(a, b) / min(a, b) for a, b in pairs]
    return {lag: r for lag, r in ratios.items() if r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(CODE_TARGET))
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--block-s", type=float, default=2.0)
    p.add_argument("--context", type=int, default=170, help="cached tokens (the benchmark's prompts: 100-200)")
    p.add_argument("--new", type=int, default=5, help="tokens per forward (a chain of 4 and the pending token)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from specdec.model.runner import ModelRunner, SeqInput

    runner = ModelRunner(args.model, max_slots=1)
    slot = runner.allocate()
    runner.forward([SeqInput(slot, [5 + i % 1000 for i in range(args.context)], last_logits_only=True)])
    chain = [10 + i for i in range(args.new)]

    def forward() -> None:
        runner.forward([SeqInput(slot, chain)])
        runner.truncate(slot, args.context)

    window_medians(forward, min(10.0, args.seconds), args.block_s)  # warm-up, not reported
    medians = window_medians(forward, args.seconds, args.block_s)
    ratios = lag_ratios(medians, args.block_s)

    lines = [
        "# The machine's drift: one fixed forward timed for minutes",
        "",
        (f"The target's forward at batch 1, {args.new} new tokens on {args.context} cached (as the verifier runs it, "
         f"torch's default threads), back to back for {args.seconds:g} s on an otherwise idle machine; the median "
         f"of each {args.block_s:g} s window. Made with:"),
        "",
        made_with("bench/machine_drift.py"),
        "",
        (f"Windows: {len(medians)}; their medians {min(medians):.2f}-{max(medians):.2f} ms (median "
         f"{statistics.median(medians):.2f}): the slowest window took {max(medians) / min(medians):.2f}x the "
         "fastest for the same work."),
        "",
        "Two windows `lag` apart, the slower one's median over the faster one's (what two runs of identical "
        "work that far apart would differ by):",
        "",
        "| lag (s) | pairs | median ratio | p90 ratio | largest ratio | pairs more than 1.05x apart |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for lag, r in ratios.items():
        over = sum(x > 1.05 for x in r) / len(r)
        lines.append(f"| {lag:g} | {len(r)} | {statistics.median(r):.3f} | {percentile(r, 90):.3f} | "
                     f"{max(r):.3f} | {over:.0%} |")
    lines += ["", "Window medians in order (ms):", "",
              "    " + " ".join(f"{m:.2f}" for m in medians)]
    return write_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

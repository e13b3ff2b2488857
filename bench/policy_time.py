"""The goodput policy's own time per step: its plan and its learning by batch size, on the benchmark's traces.

On the serving stack the policy's work sits on the step's critical path whenever no service call is
in flight to hide it (with the draft alone: learning from the last step's outcomes, then planning the
next one), and the fixed policies do next to none. Its learning from the step's timings (the cost
model, refits included) may lag a step, so the engine always gives it while a call of the next step is
out. This replays `bench/batch_replay.py`'s batches (the serving benchmark's seeded Poisson traces, the
draft's real misses on the target's greedy text, 32 tokens a request) through smartspec, with its cost
model learning from the replayed steps as it does when serving, and times each plan(),
observe_outcomes() and observe_timings() call on this machine's CPU. What it measures is the policy's
code alone, not a service or the stack around it.

    .venv/bin/python bench/policy_time.py --out docs/policy_time.md
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench import batch_replay
from bench.chain_phase import COSTS, make_policy
from bench.report import made_with, write_lines
from bench.serving import percentile, poisson_trace

BUCKETS = ((1, 1), (2, 5), (6, 10), (11, 20))


CALLS = ("plan", "observe_outcomes", "observe_timings")


def timed_replay(texts, rates, seeds: int, max_tokens: int) -> dict[str, dict[int, list[float]]]:
    """ms of every call of CALLS, by the batch size it served: {call: {B: [ms]}}.

    One smartspec policy per workload serves every trace in turn (its estimates carry over, as over the
    benchmark's repeats), its cost model seeded with chain_phase's fitted costs and learning from there.
    """
    times: dict[str, dict[int, list[float]]] = {call: defaultdict(list) for call in CALLS}
    for workload, misses in texts.items():
        policy = make_policy(COSTS["fitted here"], by_age=True, learn_costs=True)
        for call in CALLS:  # the replay's observe() calls the other two through the instance
            setattr(policy, call, _timed(getattr(policy, call), times[call]))
        for rate in rates:
            for seed in range(seeds):
                batch_replay.replay(misses, poisson_trace(rate, len(misses), seed), COSTS["fitted here"],
                                    max_tokens, policy, tag=f"{workload}{rate}s{seed}")
    return times


def _timed(method, times: dict[int, list[float]]):
    """`method` (its first argument a batch), adding each call's ms to times[batch size]."""
    def timed(batch, *args):
        start = time.perf_counter()
        result = method(batch, *args)
        times[len(batch)].append((time.perf_counter() - start) * 1e3)
        return result
    return timed


def table(times: dict[str, dict[int, list[float]]]) -> list[str]:
    """Markdown rows: per batch-size bucket, steps and the median and p90 ms of each call of CALLS."""
    lines = ["| batch | steps | plan ms (median) | plan ms (p90) | outcomes ms (median) | outcomes ms (p90) "
             "| timings ms (median) | timings ms (p90) |",
             "| --- " * 8 + "|"]
    for low, high in BUCKETS:
        cells = [[t for b, ts in times[call].items() if low <= b <= high for t in ts] for call in CALLS]
        if not cells[0]:
            continue
        label = str(low) if low == high else f"{low}-{high}"
        stats = " | ".join(f"{statistics.median(ms):.3f} | {percentile(ms, 90):.3f}" if ms else "- | -"
                           for ms in cells)
        lines.append(f"| {label} | {len(cells[0])} | {stats} |")
    return lines


def main() -> int:
    args = batch_replay.replay_parser(__doc__.splitlines()[0], "1,16,32").parse_args()
    texts = batch_replay.workload_misses(args.requests, args.max_tokens)
    times = timed_replay(texts, [float(r) for r in args.rates.split(",")], args.seeds, args.max_tokens)
    lines = [
        "# The goodput policy's own time per step",
        "",
        (f"smartspec's plan(), observe_outcomes() and observe_timings() timed on this machine's CPU, by "
         f"batch size, over the serving benchmark's traces ({args.rates} req/s, {args.seeds} seeds, "
         f"{args.requests} requests of {args.max_tokens} tokens per workload) replayed with the draft's "
         "real misses (bench/batch_replay.py), the cost model learning as when serving. With the draft "
         "alone the plan and the outcomes lie on the step's critical path (no service call hides them); "
         "the engine gives the timings while a call of the next step is out (scheduler_svc/engine.py, 6.)."
         " Made with:"),
        "",
        made_with("bench/policy_time.py"),
        "",
        *table(times),
    ]
    return write_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

"""The goodput policy's own time per step: plan() and observe() by batch size, on the benchmark's traces.

On the serving stack the policy's work sits on the step's critical path whenever no service call is
in flight to hide it (with the draft alone: learning from the last step, then planning the next one),
and the fixed policies do next to none. This replays `bench/batch_replay.py`'s batches (the serving
benchmark's seeded Poisson traces, the draft's real misses on the target's greedy text, 32 tokens a
request) through smartspec, with its cost model learning from the replayed steps as it does when
serving (its refits included), and times each plan() and observe() call on this machine's CPU. What
it measures is the policy's code alone, not a service or the stack around it.

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


def timed_replay(texts, rates, seeds: int, max_tokens: int) -> dict[str, dict[int, list[float]]]:
    """ms of every plan() and observe() call, by the batch size it served: {"plan"|"observe": {B: [ms]}}.

    One smartspec policy per workload serves every trace in turn (its estimates carry over, as over the
    benchmark's repeats), its cost model seeded with chain_phase's fitted costs and learning from there.
    """
    times: dict[str, dict[int, list[float]]] = {"plan": defaultdict(list), "observe": defaultdict(list)}
    for workload, misses in texts.items():
        policy = make_policy(COSTS["fitted here"], by_age=True, learn_costs=True)
        plan, observe = policy.plan, policy.observe

        def timed_plan(requests, plan=plan):
            start = time.perf_counter()
            plans = plan(requests)
            times["plan"][len(requests)].append((time.perf_counter() - start) * 1e3)
            return plans

        def timed_observe(outcomes, record, observe=observe):
            start = time.perf_counter()
            observe(outcomes, record)
            times["observe"][len(outcomes)].append((time.perf_counter() - start) * 1e3)

        policy.plan, policy.observe = timed_plan, timed_observe
        for rate in rates:
            for seed in range(seeds):
                batch_replay.replay(misses, poisson_trace(rate, len(misses), seed), COSTS["fitted here"],
                                    max_tokens, policy, tag=f"{workload}{rate}s{seed}")
    return times


def table(times: dict[str, dict[int, list[float]]]) -> list[str]:
    """Markdown rows: per batch-size bucket, calls and the median and p90 ms of plan and of observe."""
    lines = ["| batch | steps | plan ms (median) | plan ms (p90) | observe ms (median) | observe ms (p90) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for low, high in BUCKETS:
        cells = [[t for b, ts in times[kind].items() if low <= b <= high for t in ts] for kind in ("plan", "observe")]
        if not cells[0]:
            continue
        label = str(low) if low == high else f"{low}-{high}"
        stats = " | ".join(f"{statistics.median(ms):.3f} | {percentile(ms, 90):.3f}" for ms in cells)
        lines.append(f"| {label} | {len(cells[0])} | {stats} |")
    return lines


def main() -> int:
    args = batch_replay.replay_parser(__doc__.splitlines()[0], "1,16,32").parse_args()
    texts = batch_replay.workload_misses(args.requests, args.max_tokens)
    times = timed_replay(texts, [float(r) for r in args.rates.split(",")], args.seeds, args.max_tokens)
    lines = [
        "# The goodput policy's own time per step",
        "",
        (f"smartspec's plan() and observe() timed on this machine's CPU, by batch size, over the serving "
         f"benchmark's traces ({args.rates} req/s, {args.seeds} seeds, {args.requests} requests of "
         f"{args.max_tokens} tokens per workload) replayed with the draft's real misses "
         "(bench/batch_replay.py), the cost model learning as when serving. Made with:"),
        "",
        made_with("bench/policy_time.py"),
        "",
        *table(times),
    ]
    return write_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

"""An A/A control for the serving benchmark's check (a): a policy judged against itself.

Check (a) asks smartspec's mean latency to be at most 1.05x the best of the baselines in every cell. How
often does a policy that is the baseline miss that? Run the benchmark with one policy twice, the second
time carrying a scheduler flag that policy ignores (`fixed:5~max-k=7`: fixed reads --k, not --max-k), so
that the two are the same code on separate scheduler processes, replayed back to back like any two
policies of a cell:

    .venv/bin/specdec bench --rates 1,4,16 --policies fixed:3,fixed:5,fixed:5~max-k=7 --proposers ngram,draft \\
        --workloads code,copy --requests 20 --max-tokens 32 --repeats 3,4,12 --peers '' --out docs/bench/aa-control
    .venv/bin/python bench/noise_control.py docs/bench/aa-control/serving.json --out docs/bench/aa-control/control.md

Per cell the twin against its original, and against the best of the baselines present (the original among
them) by check (a)'s rule and with its 90% interval (bench/summary.py's paired bootstrap). Any miss is the
machine's and the rule's: the twin's decisions are its original's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import write_lines
from bench.summary import BASELINES, INTERVAL_LEVEL, SMARTSPEC_SLACK, Table, paired_ratio_interval


def control_rows(table: Table, twin: str, original: str) -> list[dict]:
    """Per (workload, proposer, rate) with both rows: the twin over its original and over the best baseline."""
    out = []
    for row in table.rows:
        if row["policy"] != twin:
            continue
        workload, proposer, rate = row["workload"], row["proposer"], float(row["rate"])
        same = table.get(workload, proposer, original, rate)
        baselines = {p: table.get(workload, proposer, p, rate) for p in BASELINES}
        baselines = {p: r for p, r in baselines.items() if r is not None and not r.get("errors")}
        if same is None or not baselines or row.get("errors"):
            continue
        best = min(baselines, key=lambda p: baselines[p]["mean_latency_ms"])
        interval = paired_ratio_interval(row.get("request_latency_ms") or [],
                                         baselines[best].get("request_latency_ms") or [])
        out.append({
            "where": f"{workload} / {proposer} / {rate:g} req/s",
            "vs_original": row["mean_latency_ms"] / same["mean_latency_ms"],
            "best": best,
            "vs_best": row["mean_latency_ms"] / baselines[best]["mean_latency_ms"],
            "interval": interval,
            "repeat_ratios": [a / b for a, b in zip(row.get("repeat_mean_latency_ms") or [],
                                                    same.get("repeat_mean_latency_ms") or [])],
        })
    return out


def report(rows: list[dict], twin: str, original: str, source: str) -> list[str]:
    misses = [r for r in rows if r["vs_best"] > SMARTSPEC_SLACK]
    beyond = [r for r in misses if r["interval"] is not None and r["interval"][0] > SMARTSPEC_SLACK]
    spread = [abs(r["vs_original"] - 1.0) for r in rows]
    lines = [
        f"# An A/A control for check (a): `{twin}` against `{original}`",
        "",
        f"From `{source}` (bench/noise_control.py). `{twin}` is `{original}` on a scheduler of its own: any "
        "difference is the machine's.",
        "",
        f"- Check (a)'s rule (at most {SMARTSPEC_SLACK}x the best of the baselines present) missed in "
        f"**{len(misses)} of {len(rows)} cells**, {len(beyond)} of them beyond the noise (the whole "
        f"{INTERVAL_LEVEL:.0%} interval above {SMARTSPEC_SLACK}x).",
        f"- Against its original alone: {min(r['vs_original'] for r in rows):.3f}x to "
        f"{max(r['vs_original'] for r in rows):.3f}x, {sum(s > SMARTSPEC_SLACK - 1 for s in spread)} of "
        f"{len(rows)} cells more than {SMARTSPEC_SLACK - 1:.0%} apart (median distance from 1: "
        f"{statistics.median(spread):.1%}).",
        "",
        f"| cell | {twin} / {original} | by repeat | best baseline | / best | {INTERVAL_LEVEL:.0%} interval | rule (a) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        interval = f"{r['interval'][0]:.2f}x-{r['interval'][1]:.2f}x" if r["interval"] else "-"
        by_repeat = (f"{min(r['repeat_ratios']):.2f}x-{max(r['repeat_ratios']):.2f}x" if r["repeat_ratios"] else "-")
        verdict = "PASS" if r["vs_best"] <= SMARTSPEC_SLACK else "FAIL"
        lines.append(f"| {r['where']} | {r['vs_original']:.3f} | {by_repeat} | {r['best']} | {r['vs_best']:.3f} | "
                     f"{interval} | {verdict} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("serving_json", type=Path)
    p.add_argument("--twin", default="fixed:5~max-k=7", help="the copy's label (a flag its policy ignores)")
    p.add_argument("--of", dest="original", default="fixed:5", help="the policy it copies")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    data = json.loads(args.serving_json.read_text())
    rows = control_rows(Table(data["rows"] if isinstance(data, dict) else data), args.twin, args.original)
    if not rows:
        print(f"no cell has both {args.twin} and {args.original}", file=sys.stderr)
        return 1
    return write_lines(report(rows, args.twin, args.original, str(args.serving_json)), args.out)


if __name__ == "__main__":
    sys.exit(main())

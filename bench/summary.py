"""The must-show checks of issue 4 (and issue 6's benchmark rows), computed from a serving benchmark's rows.

Reads serving.json (written by `python -m bench.serving`), writes summary.md beside it and prints it:

    python -m bench.summary docs/bench/serving.json        # -> docs/bench/summary.md

bench.serving writes summary.md itself at the end of a sweep. Every check says PASS or FAIL with the numbers
it used, or "not measured" where a row it needs is missing: a missing row is never a pass. A row with failed
requests makes its check FAIL (its mean is over fewer requests than the others). Latency is each run's mean
request latency.

- (a) per (workload, proposer, rate), proposers ngram, draft, both: smartspec <= 1.05 x min(none, fixed:1,
  fixed:3, fixed:5). Where the rows kept every request's latency, each cell also gives a 90% bootstrap
  interval of that ratio (paired_ratio_interval), and a miss is called beyond the noise when the whole
  interval lies above 1.05, within it otherwise.
- (b) at the lightest rate: none / smartspec >= 2.0 on copy and >= 1.3 on code, for proposer both (the
  verdict); the other proposers are listed too.
- (c) smartspec against batch-uniform: the verdict per (proposer, rate) on the workload mix (the mean of the
  workloads' mean latencies, equal request counts), and every (workload, proposer, rate) cell listed with
  its ratio and, where smartspec does not beat batch-uniform, by how much.
- (d) against the Hugging Face peers: at the lightest rate smartspec <= 1.1 x hf-assisted, at the heaviest
  hf-generate / smartspec >= 3, per workload, for proposer both (the verdict) and listed for the others.
- (e) the medusa rows: per (workload, rate) smartspec <= 1.05 x the best fixed tree size measured, with the
  mean accepted tokens per step of each tree size against chains (ngram, draft) of the same size.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "not measured"
WORKLOADS = ("code", "copy")
STACK_PROPOSERS = ("ngram", "draft", "both")
ALL_PROPOSERS = ("ngram", "draft", "both", "medusa")
HEADLINE_PROPOSER = "both"  # the product's configuration: the scheduler chooses between ngram and draft
PEER_PROPOSER = "hf"  # the proposer label of the Hugging Face peers' rows (bench.serving)
BASELINES = ("none", "fixed:1", "fixed:3", "fixed:5")
SMARTSPEC_SLACK = 1.05  # (a), (e): smartspec at most this times the best baseline
LIGHT_SPEEDUP = {"copy": 2.0, "code": 1.3}  # (b): none / smartspec at the lightest rate
HF_ASSISTED_SLACK = 1.1  # (d): smartspec at most this times hf-assisted at the lightest rate
HF_GENERATE_SPEEDUP = 3.0  # (d): hf-generate / smartspec at the heaviest rate
INTERVAL_LEVEL = 0.90  # (a): the bootstrap interval of smartspec's ratio to the best baseline
RESAMPLES = 4000


@dataclass
class Cell:
    """One verdict of a check: where, PASS/FAIL/not measured, and the numbers."""

    where: str
    status: str
    detail: str


@dataclass
class Check:
    """One must-show claim: its cells decide the verdict; `info` cells are listed beside, not counted."""

    key: str
    title: str
    cells: list[Cell]
    info: list[Cell] = field(default_factory=list)

    @property
    def status(self) -> str:
        """FAIL if any cell fails; else not measured if any cell (or every cell) is missing; else PASS."""
        statuses = {cell.status for cell in self.cells}
        if FAIL in statuses:
            return FAIL
        if not self.cells or NOT_MEASURED in statuses:
            return NOT_MEASURED
        return PASS


class Table:
    """The rows of one benchmark, by (workload, proposer, policy, rate)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.by_key = {(r["workload"], r["proposer"], r["policy"], float(r["rate"])): r for r in rows}
        self.rates = sorted({float(r["rate"]) for r in rows})

    def get(self, workload: str, proposer: str, policy: str, rate: float) -> dict | None:
        return self.by_key.get((workload, proposer, policy, float(rate)))

    def proposers(self) -> set[str]:
        return {r["proposer"] for r in self.rows}

    def latencies(self, wanted: dict[str, tuple[str, str, str, float]]) -> tuple[dict[str, float], list[str]]:
        """Mean latency of each named row, and the problems found: rows missing (NOT_MEASURED) or with
        failed requests (FAIL). Problems are tagged "missing: " or "failed: "."""
        values, problems = {}, []
        for name, key in wanted.items():
            row = self.get(*key)
            if row is None:
                problems.append(f"missing: {name}")
                continue
            latency = row.get("mean_latency_ms")
            if row.get("errors"):
                problems.append(f"failed: {name} had {row['errors']} of {row.get('requests', '?')} requests fail")
            elif latency is None or (isinstance(latency, float) and math.isnan(latency)):
                problems.append(f"failed: {name} has no latency")
            else:
                values[name] = float(latency)
        return values, problems


def _problem_cell(where: str, problems: list[str]) -> Cell:
    failed = [p.removeprefix("failed: ") for p in problems if p.startswith("failed: ")]
    if failed:
        return Cell(where, FAIL, "; ".join(failed))
    return Cell(where, NOT_MEASURED, "no row for " + ", ".join(p.removeprefix("missing: ") for p in problems))


def _ms(value: float) -> str:
    return f"{value:.0f} ms"


def _rate(rate: float) -> str:
    return "no rate measured" if math.isnan(rate) else f"{rate:g} req/s"


def _per_repeat(row: dict, best: dict) -> str:
    """'; by repeat 0.91x-1.12x, within 1.05x in 5 of 8': the ratio repeat by repeat, where both rows kept
    their repeats' means (the verdict stays on the pooled means; this says how much of it the noise could
    move). Repeat i of the two rows ran in the same round of the sweep, back to back within a cell; `none`,
    run once for every proposer label, ran beside the first label's cell of that round."""
    ours, theirs = row.get("repeat_mean_latency_ms"), best.get("repeat_mean_latency_ms")
    if not ours or not theirs or len(ours) != len(theirs):
        return ""
    ratios = [a / b for a, b in zip(ours, theirs) if b]
    if not ratios:
        return ""
    within = sum(r <= SMARTSPEC_SLACK for r in ratios)
    return (f"; by repeat {min(ratios):.2f}x-{max(ratios):.2f}x, within {SMARTSPEC_SLACK}x in {within} of "
            f"{len(ratios)}")


def paired_ratio_interval(ours: list[list[float | None]], theirs: list[list[float | None]],
                          level: float = INTERVAL_LEVEL, resamples: int = RESAMPLES,
                          seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap interval of mean(ours) / mean(theirs) over paired requests, or None where they do not pair.

    ours[r][i], theirs[r][i]: request i's latency in repeat r of two rows (None: failed). Request i of a repeat
    had the same prompt and arrival time under both, and the two ran back to back in that repeat, so the
    pairs are resampled together: first the repeats (with replacement; what the machine did during each
    replay moves all its requests together, and at a heavy rate a replay's requests queue behind each other),
    then the requests within each picked repeat. Seeded: the same rows give the same interval.
    """
    if not ours or len(ours) != len(theirs) or any(len(a) != len(b) for a, b in zip(ours, theirs)):
        return None
    groups = [np.array([(a, b) for a, b in zip(mine, other) if a is not None and b is not None], dtype=float)
              for mine, other in zip(ours, theirs)]
    groups = [g for g in groups if len(g)]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, len(groups), size=(resamples, len(groups)))  # the repeats of each resample
    totals = np.zeros((resamples, 2))
    for slot in range(len(groups)):
        for r, group in enumerate(groups):
            rows = np.flatnonzero(picked[:, slot] == r)
            if len(rows):
                draws = rng.integers(0, len(group), size=(len(rows), len(group)))
                totals[rows] += group[draws].sum(axis=1)
    ratios = totals[:, 0] / totals[:, 1]
    tail = (1.0 - level) / 2
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def _interval(row: dict, best: dict, missed: bool) -> tuple[str, bool | None]:
    """'; 90% interval 0.98x-1.12x (the miss is within the noise)' and whether a miss is beyond the noise
    (None: no interval, or not a miss). `best` is the baseline the pooled means chose; the interval does not
    redo that choice, which favours the baseline (the smallest of four noisy means), so it errs towards
    calling a miss real."""
    interval = paired_ratio_interval(row.get("request_latency_ms") or [], best.get("request_latency_ms") or [])
    if interval is None:
        return "", None
    low, high = interval
    text = f"; {INTERVAL_LEVEL:.0%} interval {low:.2f}x-{high:.2f}x"
    if not missed:
        return text, None
    beyond = low > SMARTSPEC_SLACK
    return text + (" (the miss is beyond the noise)" if beyond else " (the miss is within the noise)"), beyond


def check_smartspec_vs_baselines(table: Table) -> Check:
    """(a) smartspec mean latency at most 1.05x the best of none and fixed:1/3/5, every cell."""
    cells = []
    beyond_noise, within_noise = [], []
    for workload in WORKLOADS:
        for proposer in STACK_PROPOSERS:
            for rate in table.rates or [math.nan]:
                where = f"{workload} / {proposer} / {_rate(rate)}"
                wanted = {p: (workload, proposer, p, rate) for p in ("smartspec", *BASELINES)}
                values, problems = table.latencies(wanted)
                if problems:
                    cells.append(_problem_cell(where, problems))
                    continue
                best = min(BASELINES, key=lambda p: values[p])
                ratio = values["smartspec"] / values[best]
                ok = ratio <= SMARTSPEC_SLACK
                ours = table.get(workload, proposer, "smartspec", rate)
                theirs = table.get(workload, proposer, best, rate)
                interval, beyond = _interval(ours, theirs, not ok)
                if beyond is not None:
                    (beyond_noise if beyond else within_noise).append(where)
                cells.append(Cell(where, PASS if ok else FAIL,
                                  f"smartspec {_ms(values['smartspec'])} / best {_ms(values[best])} ({best}) = "
                                  f"{ratio:.3f} {'<=' if ok else '>'} {SMARTSPEC_SLACK}"
                                  + _per_repeat(ours, theirs) + interval))
    info = []
    if beyond_noise or within_noise:
        info.append(Cell("misses against the noise", f"{len(beyond_noise)} beyond, {len(within_noise)} within",
                         f"beyond the noise (the whole {INTERVAL_LEVEL:.0%} interval above {SMARTSPEC_SLACK}x): "
                         f"{', '.join(beyond_noise) or 'none'}; within it: {', '.join(within_noise) or 'none'}"))
    return Check("a", f"smartspec <= {SMARTSPEC_SLACK}x the best of {', '.join(BASELINES)} at every rate, "
                      f"both workloads, proposers {', '.join(STACK_PROPOSERS)}", cells, info)


def check_light_load_speedup(table: Table) -> Check:
    """(b) at the lightest rate, none / smartspec >= 2.0 on copy, >= 1.3 on code."""
    cells, info = [], []
    rate = table.rates[0] if table.rates else math.nan
    for proposer in (HEADLINE_PROPOSER, *[p for p in ALL_PROPOSERS if p != HEADLINE_PROPOSER]):
        if proposer != HEADLINE_PROPOSER and proposer not in table.proposers():
            continue
        for workload in WORKLOADS:
            where = f"{workload} / {proposer} / {_rate(rate)}"
            values, problems = table.latencies({p: (workload, proposer, p, rate) for p in ("none", "smartspec")})
            if problems:
                cell = _problem_cell(where, problems)
            else:
                speedup = values["none"] / values["smartspec"]
                ok = speedup >= LIGHT_SPEEDUP[workload]
                cell = Cell(where, PASS if ok else FAIL,
                            f"none {_ms(values['none'])} / smartspec {_ms(values['smartspec'])} = {speedup:.3f}x "
                            f"{'>=' if ok else '<'} {LIGHT_SPEEDUP[workload]}x")
            (cells if proposer == HEADLINE_PROPOSER else info).append(cell)
    return Check("b", f"at the lightest rate, smartspec >= {LIGHT_SPEEDUP['copy']}x faster than none on copy and "
                      f">= {LIGHT_SPEEDUP['code']}x on code (proposer {HEADLINE_PROPOSER})", cells, info)


def _versus(ratio: float) -> str:
    if ratio <= 1.0:
        return f"{ratio:.3f} ({(1 - ratio) * 100:.0f}% faster)"
    return f"{ratio:.3f} (does not beat it: {(ratio - 1) * 100:.0f}% slower)"


def check_smartspec_vs_batch_uniform(table: Table) -> Check:
    """(c) per-request choice (smartspec) against one k per batch (batch-uniform)."""
    cells, info = [], []
    # medusa joins where it was run under both policies (the issue asks this of ngram, draft and both).
    medusa = any(r["proposer"] == "medusa" and r["policy"] == "batch-uniform" for r in table.rows)
    proposers = [*STACK_PROPOSERS, *(["medusa"] if medusa else [])]
    for proposer in proposers:
        for rate in table.rates or [math.nan]:
            mix_ok = True
            mix = {"smartspec": 0.0, "batch-uniform": 0.0}
            mix_problems: list[str] = []
            for workload in WORKLOADS:
                where = f"{workload} / {proposer} / {_rate(rate)}"
                values, problems = table.latencies(
                    {p: (workload, proposer, p, rate) for p in ("smartspec", "batch-uniform")})
                if problems:
                    info.append(_problem_cell(where, problems))
                    mix_problems += [f"{p.split(': ', 1)[0]}: {workload} {p.split(': ', 1)[1]}" for p in problems]
                    mix_ok = False
                    continue
                ratio = values["smartspec"] / values["batch-uniform"]
                info.append(Cell(where, PASS if ratio <= 1.0 else FAIL,
                                 f"smartspec {_ms(values['smartspec'])} / batch-uniform "
                                 f"{_ms(values['batch-uniform'])} = {_versus(ratio)}"))
                for p in mix:
                    mix[p] += values[p] / len(WORKLOADS)
            where = f"{' + '.join(WORKLOADS)} / {proposer} / {_rate(rate)}"
            if not mix_ok:
                cells.append(_problem_cell(where, mix_problems))
                continue
            ratio = mix["smartspec"] / mix["batch-uniform"]
            cells.append(Cell(where, PASS if ratio <= 1.0 else FAIL,
                              f"smartspec {_ms(mix['smartspec'])} / batch-uniform {_ms(mix['batch-uniform'])} "
                              f"= {_versus(ratio)}"))
    return Check("c", "smartspec (k per request) beats batch-uniform (one k per batch) on the workload mix",
                 cells, info)


def check_hugging_face(table: Table) -> Check:
    """(d) lightest rate: smartspec <= 1.1x hf-assisted; heaviest rate: hf-generate / smartspec >= 3."""
    cells, info = [], []
    light = table.rates[0] if table.rates else math.nan
    heavy = table.rates[-1] if table.rates else math.nan
    for proposer in (HEADLINE_PROPOSER, *[p for p in ALL_PROPOSERS if p != HEADLINE_PROPOSER]):
        if proposer != HEADLINE_PROPOSER and proposer not in table.proposers():
            continue
        target = cells if proposer == HEADLINE_PROPOSER else info
        for workload in WORKLOADS:
            where = f"{workload} / {proposer} / {_rate(light)} (lightest)"
            values, problems = table.latencies({"smartspec": (workload, proposer, "smartspec", light),
                                                "hf-assisted": (workload, PEER_PROPOSER, "hf-assisted", light)})
            if problems:
                target.append(_problem_cell(where, problems))
            else:
                ratio = values["smartspec"] / values["hf-assisted"]
                ok = ratio <= HF_ASSISTED_SLACK
                target.append(Cell(where, PASS if ok else FAIL,
                                   f"smartspec {_ms(values['smartspec'])} / hf-assisted "
                                   f"{_ms(values['hf-assisted'])} = {ratio:.3f} {'<=' if ok else '>'} "
                                   f"{HF_ASSISTED_SLACK}"))
            where = f"{workload} / {proposer} / {_rate(heavy)} (heaviest)"
            values, problems = table.latencies({"smartspec": (workload, proposer, "smartspec", heavy),
                                                "hf-generate": (workload, PEER_PROPOSER, "hf-generate", heavy)})
            if problems:
                target.append(_problem_cell(where, problems))
            else:
                speedup = values["hf-generate"] / values["smartspec"]
                ok = speedup >= HF_GENERATE_SPEEDUP
                target.append(Cell(where, PASS if ok else FAIL,
                                   f"hf-generate {_ms(values['hf-generate'])} / smartspec "
                                   f"{_ms(values['smartspec'])} = {speedup:.3f}x {'>=' if ok else '<'} "
                                   f"{HF_GENERATE_SPEEDUP}x"))
    return Check("d", f"against Hugging Face: smartspec <= {HF_ASSISTED_SLACK}x hf-assisted at the lightest rate, "
                      f">= {HF_GENERATE_SPEEDUP}x faster than hf-generate at the heaviest (proposer "
                      f"{HEADLINE_PROPOSER})", cells, info)


def _fixed_size(policy: str) -> int | None:
    match = re.fullmatch(r"fixed:(\d+)", policy)
    return int(match.group(1)) if match else None


def check_medusa(table: Table) -> Check:
    """(e) medusa: smartspec against the fixed tree sizes measured; accepted tokens per step of trees
    against chains of the same size."""
    medusa_rows = [r for r in table.rows if r["proposer"] == "medusa"]
    sizes = sorted({n for r in medusa_rows if (n := _fixed_size(r["policy"])) is not None})
    if not medusa_rows:
        return Check("e", "medusa: smartspec against fixed tree sizes",
                     [Cell("medusa", NOT_MEASURED, "no medusa rows (run with --proposers ...,medusa)")])
    cells, info = [], []
    for workload in WORKLOADS:
        for rate in table.rates:
            where = f"{workload} / medusa / {_rate(rate)}"
            wanted = {"smartspec": (workload, "medusa", "smartspec", rate),
                      **{f"fixed:{n}": (workload, "medusa", f"fixed:{n}", rate) for n in sizes}}
            values, problems = table.latencies(wanted)
            if problems or not sizes:
                cells.append(_problem_cell(where, problems or ["missing: any fixed:N tree size"]))
            else:
                fixed = {p: v for p, v in values.items() if p != "smartspec"}
                best = min(fixed, key=fixed.get)
                ratio = values["smartspec"] / fixed[best]
                ok = ratio <= SMARTSPEC_SLACK
                listed = ", ".join(f"{p} {_ms(v)}" for p, v in fixed.items())
                cells.append(Cell(where, PASS if ok else FAIL,
                                  f"smartspec {_ms(values['smartspec'])} / best {_ms(fixed[best])} ({best}) = "
                                  f"{ratio:.3f} {'<=' if ok else '>'} {SMARTSPEC_SLACK}; {listed}"))
            for n in sizes:
                parts = []
                for proposer in ("medusa", "draft", "ngram"):
                    row = table.get(workload, proposer, f"fixed:{n}", rate)
                    value = row.get("mean_accepted_per_step") if row else None
                    parts.append(f"{proposer} {'–' if value is None else f'{value:.2f}'}")
                info.append(Cell(f"{workload} / fixed:{n} / {_rate(rate)}", "accepted/step", ", ".join(parts)))
    return Check("e", f"medusa: smartspec <= {SMARTSPEC_SLACK}x the best fixed tree size "
                      f"({', '.join(f'fixed:{n}' for n in sizes) or 'none measured'}); accepted tokens per step "
                      f"of trees against chains of the same size", cells, info)


CHECKS = (check_smartspec_vs_baselines, check_light_load_speedup, check_smartspec_vs_batch_uniform,
          check_hugging_face, check_medusa)


def run_checks(rows: list[dict]) -> list[Check]:
    """Every check on one benchmark's rows."""
    table = Table(rows)
    return [check(table) for check in CHECKS]


def _cells_table(cells: list[Cell]) -> list[str]:
    lines = ["| where | verdict | numbers |", "| --- | --- | --- |"]
    lines += [f"| {c.where} | {c.status} | {c.detail} |" for c in cells]
    return lines


def render(checks: list[Check], source: str = "serving.json", settings: dict | None = None,
           rows: list[dict] | None = None) -> str:
    """summary.md: an overview of the verdicts, then each check's cells."""
    lines = ["# Serving benchmark: the must-show checks", ""]
    made = f"Computed by bench.summary from `{source}`"
    if rows is not None:
        rates = sorted({float(r["rate"]) for r in rows})
        made += f" ({len(rows)} rows"
        made += f"; rates {', '.join(f'{r:g}' for r in rates)} req/s)" if rates else ")"
    lines.append(made + f"; regenerate with `python -m bench.summary {source}`.")
    if settings:
        keys = ("rates", "policies", "proposers", "workloads", "peers", "requests", "max_tokens", "seed",
                "service_threads", "peer_threads", "peer_lookup_tokens")
        shown = ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)
        if shown:
            lines.append(f"Benchmark settings: {shown}.")
    lines += ["", "A missing row is \"not measured\", never a pass; a row with failed requests fails its check.", "",
              "| check | verdict |", "| --- | --- |"]
    lines += [f"| ({c.key}) {c.title} | {c.status} |" for c in checks]
    for check in checks:
        lines += ["", f"## ({check.key}) {check.title}: {check.status}", ""]
        lines += _cells_table(check.cells)
        if check.info:
            lines += ["", "Also listed (not part of the verdict):", ""]
            lines += _cells_table(check.info)
    return "\n".join(lines) + "\n"


def write_summary(json_path: str | Path, out: str | Path | None = None) -> Path:
    """Read a serving.json, write its summary.md (default: beside it) and return the path."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    settings = data.get("settings") if isinstance(data, dict) else None
    out = Path(out) if out else json_path.with_name("summary.md")
    out.write_text(render(run_checks(rows), str(json_path), settings, rows))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary",
                                     description="The must-show checks of a serving benchmark (summary.md).")
    parser.add_argument("serving_json", help="serving.json written by `python -m bench.serving`")
    parser.add_argument("-o", "--out", help="summary file to write (default: summary.md beside the JSON)")
    args = parser.parse_args(argv)
    path = write_summary(args.serving_json, args.out)
    print(path.read_text(), end="")
    print(f"python -m bench.summary: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The serving benchmark (`python -m bench.serving`): traces, summaries, workloads, the sweep plan, the Hugging
Face peers (bench.hf_peers), the must-show checks (bench.summary), one tiny sweep."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import hf_peers, summary
from bench.serving import (
    PEER_PROPOSER,
    PROMPT_TOKENS,
    Progress,
    RequestResult,
    RunConfig,
    _count,
    _tokenizer,
    add_arguments,
    main,
    code_completion_prompts,
    interleave,
    copy_heavy_prompts,
    markdown_table,
    peer_row,
    plan,
    pool,
    poisson_trace,
    repeats_per_rate,
    stack_rows,
    summarize,
)


def test_poisson_trace_is_seeded_and_has_the_rate():
    trace = poisson_trace(4.0, 20000, seed=3)
    assert trace == poisson_trace(4.0, 20000, seed=3)
    assert trace != poisson_trace(4.0, 20000, seed=4)
    assert trace[0] == 0.0 and all(b >= a for a, b in zip(trace, trace[1:]))
    mean_gap = trace[-1] / (len(trace) - 1)
    assert mean_gap == pytest.approx(1 / 4.0, rel=0.03)
    with pytest.raises(ValueError):
        poisson_trace(0, 3)


def test_summarize_exact_numbers():
    results = [
        RequestResult(0, 0.0, 0.0, 1.0, latency_ms=100.0, ttft_ms=10.0, completion_tokens=10, proposed=12,
                      accepted=6, steps=4, proposer_steps={"ngram": 1, "draft": 3}),
        RequestResult(1, 0.5, 0.5, 1.5, latency_ms=200.0, ttft_ms=20.0, completion_tokens=20, proposed=8,
                      accepted=4, steps=4, proposer_steps={"ngram": 2}),
        RequestResult(2, 1.0, 1.0, 2.0, latency_ms=400.0, ttft_ms=30.0, completion_tokens=10, proposed=0,
                      accepted=0, steps=2),
        RequestResult(3, 1.2, 1.2, 1.3, latency_ms=5.0, error="Unavailable: down"),
    ]
    s = summarize(results, wall_s=2.0)
    assert s["requests"] == 4 and s["errors"] == 1
    assert s["mean_latency_ms"] == pytest.approx(700 / 3)
    assert s["p50_latency_ms"] == 200.0
    assert s["p99_latency_ms"] == pytest.approx(200 + 200 * 0.98)
    assert s["mean_ttft_ms"] == 20.0
    assert s["ms_per_output_token"] == pytest.approx((10 + 10 + 40) / 3)
    assert s["generated_tokens"] == 40 and s["goodput_tok_s"] == 20.0
    assert s["acceptance_rate"] == 0.5
    assert s["mean_k"] == 2.0
    assert s["proposer_share"] == {"draft": 0.3, "ngram": 0.3}  # of 10 request-steps, 4 served by none


def test_workloads_are_deterministic_and_sized():
    tokenizer = _tokenizer()
    for make in (code_completion_prompts, copy_heavy_prompts):
        prompts = make(6, seed=1)
        assert prompts == make(6, seed=1)
        assert prompts != make(6, seed=2)
        assert len(prompts) == 6
        for prompt in prompts:
            assert PROMPT_TOKENS[0] <= _count(tokenizer, prompt) <= PROMPT_TOKENS[1]


def test_copy_heavy_prompts_repeat_spans():
    for prompt in copy_heavy_prompts(6, seed=0):
        lines = [line for line in prompt.splitlines() if line.strip()]
        # A span of at least two consecutive non-blank lines occurs twice.
        pairs = [tuple(lines[i:i + 2]) for i in range(len(lines) - 1)]
        assert len(pairs) > len(set(pairs)) or "@property" in prompt, prompt
        if "@property" in prompt:
            assert prompt.count("    @property\n    def ") >= 4
            assert prompt.rstrip().endswith("def")


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_plan_runs_none_once_and_the_peers_last():
    runs = plan(_args(["--rates", "1,4", "--policies", "none,fixed:4,smartspec", "--proposers",
                       "ngram,draft,both,medusa", "--workloads", "code,copy"]))
    stack = [r for r in runs if not r.is_peer]
    peers = [r for r in runs if r.is_peer]
    assert runs == stack + peers  # peers run after the stack
    none = [r for r in stack if r.policy == "none"]
    # One none run per (workload, rate), reported for every proposer label.
    assert [(r.workload, r.rate) for r in none] == [("code", 1.0), ("code", 4.0), ("copy", 1.0), ("copy", 4.0)]
    assert all(r.labels == ("ngram", "draft", "both", "medusa") for r in none)
    others = [r for r in stack if r.policy != "none"]
    assert len(others) == 2 * 2 * 4 * 2 and not any(r.shared_with for r in others)
    medusa = [r for r in others if r.proposer == "medusa"]
    assert {r.request_proposer for r in medusa} == {"medusa"}
    assert {(r.policy_label, r.k) for r in medusa} == {("fixed:4", 4), ("smartspec", 3)}
    assert {r.policy for r in peers} == {"hf-generate", "hf-assisted", "hf-prompt-lookup"}
    assert len(peers) == 3 * 2 * 2 and {r.proposer for r in peers} == {PEER_PROPOSER}
    assert plan(_args(["--peers", "", "--policies", "none"])) == [
        RunConfig("none", "ngram", w, rate, shared_with=("draft", "both")) for w in ("code", "copy")
        for rate in (0.5, 2.0, 8.0)]
    only_peers = plan(_args(["--policies", "", "--peers", "hf-assisted", "--rates", "2", "--workloads", "copy"]))
    assert only_peers == [RunConfig("hf-assisted", PEER_PROPOSER, "copy", 2.0)]
    # A policy with scheduler flags runs beside the plain one, under its own label.
    variants = plan(_args(["--peers", "", "--policies", "smartspec,smartspec~max-k=4~ema-alpha=0.5",
                           "--rates", "2", "--proposers", "draft", "--workloads", "copy"]))
    assert [(r.policy_label, r.policy, r.flags) for r in variants] == [
        ("smartspec", "smartspec", ()),
        ("smartspec~max-k=4~ema-alpha=0.5", "smartspec", ("max-k=4", "ema-alpha=0.5"))]
    for bad, message in ((["--peers", "hf-magic"], "unknown peer"), (["--policies", "fast"], "unknown policy"),
                         (["--policies", "fixed:x"], "must be an integer"), (["--proposers", "eagle"],
                                                                             "unknown proposer"),
                         (["--policies", "smartspec~--max-k=4"], "without its dashes"),
                         (["--policies", "smartspec~"], "without its dashes")):
        with pytest.raises(ValueError, match=message):
            plan(_args(bad))


def test_interleave_compares_policies_back_to_back_and_rotates_them():
    runs = plan(_args(["--rates", "1,4", "--policies", "none,fixed:3,smartspec", "--proposers", "ngram,draft",
                       "--workloads", "code", "--peers", ""]))
    order = interleave(runs, repeats=2)
    assert sorted(order, key=lambda o: (o[0], runs.index(o[1]))) == [(rep, run) for rep in (0, 1) for run in runs]
    first = [run.policy_label for rep, run in order if rep == 0 and (run.rate, run.proposer) == (1.0, "ngram")]
    second = [run.policy_label for rep, run in order if rep == 1 and (run.rate, run.proposer) == (1.0, "ngram")]
    assert first == ["none", "fixed:3", "smartspec"] and second == ["fixed:3", "smartspec", "none"]
    # Every policy of a (workload, rate, proposer) runs before the next one starts.
    keys = [(rep, run.workload, run.rate, run.proposer) for rep, run in order]
    assert len(list(itertools.groupby(keys))) == len(set(keys))
    # none (run once, under the first proposer label) is not compared with the draft-pinned runs.
    assert [run.policy_label for rep, run in order if rep == 0 and (run.rate, run.proposer) == (4.0, "draft")] == [
        "fixed:3", "smartspec"]


def test_repeats_per_rate_give_the_heavy_rate_more_runs():
    args = _args(["--rates", "1,16", "--repeats", "2,3", "--policies", "fixed:3,smartspec", "--proposers", "ngram",
                  "--workloads", "code", "--peers", ""])
    assert repeats_per_rate(args) == {1.0: 2, 16.0: 3}
    runs = plan(args)
    order = interleave(runs, repeats_per_rate(args))
    count = {run: sum(1 for _, r in order if r == run) for run in runs}
    assert count == {run: 2 if run.rate == 1.0 else 3 for run in runs}
    # The second round rotates the policies, the third (the heavy rate's only) rotates them again.
    assert [(run.rate, run.policy_label) for rep, run in order if rep == 1] == [
        (1.0, "smartspec"), (1.0, "fixed:3"), (16.0, "smartspec"), (16.0, "fixed:3")]
    assert [(run.rate, run.policy_label) for rep, run in order if rep == 2] == [(16.0, "fixed:3"), (16.0, "smartspec")]
    assert repeats_per_rate(_args(["--rates", "1,4,16", "--repeats", "3"])) == {1.0: 3, 4.0: 3, 16.0: 3}
    for bad in ("0", "2,3", "3,3,0", "x"):
        with pytest.raises(ValueError, match="--repeats"):
            repeats_per_rate(_args(["--rates", "1,4,16", "--repeats", bad]))


def test_pool_repeats_exact_numbers():
    one = [RequestResult(0, 0.0, 0.0, 1.0, latency_ms=100.0, completion_tokens=10, proposed=4, accepted=2, steps=5)]
    two = [RequestResult(0, 0.0, 0.0, 1.0, latency_ms=300.0, completion_tokens=10, proposed=0, accepted=0, steps=5),
           RequestResult(1, 0.5, 0.5, 3.0, latency_ms=200.0, completion_tokens=10, proposed=4, accepted=4, steps=5)]
    figures = pool([(one, 1.0), (two, 3.0)])
    assert figures["requests"] == 3 and figures["repeats"] == 2
    assert figures["mean_latency_ms"] == 200.0 and figures["repeat_mean_latency_ms"] == [100.0, 250.0]
    assert figures["goodput_tok_s"] == 30 / 4.0 and figures["acceptance_rate"] == 0.75
    assert "repeat_mean_latency_ms" not in pool([(one, 1.0)])
    assert figures["request_latency_ms"] == [[100.0], [300.0, 200.0]]
    failed = [RequestResult(1, 0.5, 0.5, 3.0, latency_ms=50.0, error="UNAVAILABLE"),
              RequestResult(0, 0.0, 0.0, 1.0, latency_ms=120.0, completion_tokens=10, steps=5)]
    assert pool([(failed, 3.0)])["request_latency_ms"] == [[120.0, None]]  # trace order; failed: None


def test_shared_none_rows_are_marked_and_starred():
    run = RunConfig("none", "ngram", "copy", 2.0, shared_with=("draft", "both"))
    figures = summarize([RequestResult(0, 0.0, 0.0, 0.1, latency_ms=100.0, completion_tokens=8, steps=8)], 0.1)
    rows = stack_rows(run, figures, 8)
    assert [r["proposer"] for r in rows] == ["ngram", "draft", "both"]
    assert all(r["shared"] and r["measured_with"] == "ngram" and r["mean_latency_ms"] == 100.0 for r in rows)
    alone = stack_rows(RunConfig("smartspec", "draft", "copy", 2.0), figures, 8)
    assert len(alone) == 1 and alone[0]["shared"] is False and "measured_with" not in alone[0]
    peer = {**rows[0], "policy": "hf-generate", "proposer": PEER_PROPOSER, "shared": False, "peer": True,
            "acceptance_rate": None, "mean_k": None}
    alone[0]["proposer_share"] = {"draft": 0.75, "ngram": 0.25}
    table = markdown_table(rows + alone + [peer])
    assert table.count("| none* |") == 3 and "| smartspec |" in table and "| hf | hf-generate |" in table
    assert "ran once per workload and rate (with proposer ngram)" in table
    assert "| draft 75%, ngram 25% |" in table
    peer_line = next(line for line in table.splitlines() if "hf-generate" in line)
    assert [cell.strip() for cell in peer_line.split("|")].count("–") == 3  # acceptance, mean k, served by


def test_progress_lines_count_time_and_eta():
    now = [0.0]
    plain = io.StringIO()
    progress = Progress(4, stream=plain, clock=lambda: now[0])
    progress.start("run a")
    now[0] = 30.0
    progress.advance()
    progress.start("run b")
    now[0] = 3700.0
    progress.advance()
    progress.close()
    assert plain.getvalue().splitlines() == [
        "[0/4] elapsed 0:00, ETA ? | run a",
        "[1/4] elapsed 0:30, ETA 1:30 | run b",
        "[2/4] elapsed 1:01:40, ETA 1:01:40 | done",
    ]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    progress = Progress(1, stream=tty, clock=lambda: 0.0)
    progress.start("run a")
    progress.advance()
    progress.close()
    assert tty.getvalue() == "\r\x1b[K[0/1] elapsed 0:00, ETA ? | run a\r\x1b[K[1/1] elapsed 0:00, ETA 0:00 | done\n"


# ---------------------------------------------------------------------------------------------------------
# bench.summary


def _row(workload, proposer, policy, rate, latency, **extra):
    return {"workload": workload, "proposer": proposer, "policy": policy, "rate": rate, "requests": 8,
            "errors": 0, "mean_latency_ms": latency, **extra}


def _passing_rows() -> list[dict]:
    """A full benchmark in which every check passes: rate 1 is light, rate 16 heavy."""
    rows = []
    for workload in ("code", "copy"):
        for proposer in ("ngram", "draft", "both"):
            for policy, light, heavy in (("none", 1000, 2000), ("fixed:1", 800, 2500), ("fixed:3", 700, 2500),
                                         ("fixed:5", 600, 2500), ("smartspec", 300, 2000),
                                         ("batch-uniform", 360, 2400)):
                rows += [_row(workload, proposer, policy, 1.0, light), _row(workload, proposer, policy, 16.0, heavy)]
        for rate, assisted, generate in ((1.0, 300, 400), (16.0, 5000, 10000)):
            rows += [_row(workload, "hf", "hf-assisted", rate, assisted), _row(workload, "hf", "hf-generate", rate,
                                                                               generate)]
        for rate in (1.0, 16.0):
            rows += [_row(workload, "medusa", "smartspec", rate, 500, mean_accepted_per_step=1.5),
                     _row(workload, "medusa", "fixed:4", rate, 520, mean_accepted_per_step=1.2),
                     _row(workload, "medusa", "fixed:8", rate, 600, mean_accepted_per_step=1.6),
                     _row(workload, "medusa", "none", rate, 1000)]
    return rows


def _set(rows, workload, proposer, policy, rate, **values):
    row = next(r for r in rows if (r["workload"], r["proposer"], r["policy"], r["rate"]) ==
               (workload, proposer, policy, rate))
    row.update(values)


def _by_key(checks):
    return {check.key: check for check in checks}


def test_summary_passes_a_full_good_benchmark():
    checks = _by_key(summary.run_checks(_passing_rows()))
    assert {key: check.status for key, check in checks.items()} == dict.fromkeys("abcde", summary.PASS)
    a = checks["a"].cells
    assert len(a) == 2 * 3 * 2
    assert a[0].where == "code / ngram / 1 req/s"
    assert a[0].detail == "smartspec 300 ms / best 600 ms (fixed:5) = 0.500 <= 1.05"
    assert [c.detail for c in checks["b"].cells] == ["none 1000 ms / smartspec 300 ms = 3.333x >= 1.3x",
                                                    "none 1000 ms / smartspec 300 ms = 3.333x >= 2.0x"]
    assert {c.where.split(" / ")[1] for c in checks["b"].info} == {"ngram", "draft", "medusa"}
    c = checks["c"].cells[0]
    assert (c.where, c.detail) == ("code + copy / ngram / 1 req/s",
                                   "smartspec 300 ms / batch-uniform 360 ms = 0.833 (17% faster)")
    d = {cell.where: cell.detail for cell in checks["d"].cells}
    assert d["code / both / 1 req/s (lightest)"] == "smartspec 300 ms / hf-assisted 300 ms = 1.000 <= 1.1"
    assert d["copy / both / 16 req/s (heaviest)"] == "hf-generate 10000 ms / smartspec 2000 ms = 5.000x >= 3.0x"
    e = checks["e"]
    assert "fixed:4, fixed:8" in e.title
    assert e.cells[0].detail.startswith("smartspec 500 ms / best 520 ms (fixed:4) = 0.962 <= 1.05")
    assert "medusa 1.60, draft –, ngram –" in {cell.detail for cell in e.info}


def test_summary_fails_with_the_numbers():
    rows = _passing_rows()
    _set(rows, "code", "draft", "smartspec", 16.0, mean_latency_ms=2200)  # (a): 1.1x none
    _set(rows, "copy", "both", "smartspec", 1.0, mean_latency_ms=600)  # (b): none only 1.67x; (d): 2x assisted
    _set(rows, "code", "ngram", "smartspec", 16.0, mean_latency_ms=2000, errors=1)  # failed requests
    _set(rows, "copy", "draft", "batch-uniform", 1.0, mean_latency_ms=150)  # (c): smartspec 2x slower
    checks = _by_key(summary.run_checks(rows))
    assert {key: check.status for key, check in checks.items()} == {
        "a": summary.FAIL, "b": summary.FAIL, "c": summary.FAIL, "d": summary.FAIL, "e": summary.PASS}
    a = {cell.where: cell for cell in checks["a"].cells}
    assert a["code / draft / 16 req/s"].status == summary.FAIL
    assert a["code / draft / 16 req/s"].detail == "smartspec 2200 ms / best 2000 ms (none) = 1.100 > 1.05"
    assert a["code / ngram / 16 req/s"].status == summary.FAIL
    assert a["code / ngram / 16 req/s"].detail == "smartspec had 1 of 8 requests fail"
    assert a["copy / both / 1 req/s"].status == summary.PASS  # 600 = fixed:5: within 1.05x
    b = {cell.where: cell for cell in checks["b"].cells}
    assert b["copy / both / 1 req/s"].detail == "none 1000 ms / smartspec 600 ms = 1.667x < 2.0x"
    assert b["code / both / 1 req/s"].status == summary.PASS
    c = {cell.where: cell for cell in checks["c"].cells}
    assert c["code + copy / draft / 1 req/s"].detail == (
        "smartspec 300 ms / batch-uniform 255 ms = 1.176 (does not beat it: 18% slower)")
    info = {cell.where: cell for cell in checks["c"].info}
    assert info["copy / draft / 1 req/s"].detail == (
        "smartspec 300 ms / batch-uniform 150 ms = 2.000 (does not beat it: 100% slower)")
    d = {cell.where: cell for cell in checks["d"].cells}
    assert d["copy / both / 1 req/s (lightest)"].detail == "smartspec 600 ms / hf-assisted 300 ms = 2.000 > 1.1"


def test_summary_shows_smartspec_repeat_by_repeat():
    rows = _passing_rows()
    _set(rows, "code", "draft", "smartspec", 16.0, mean_latency_ms=2100, repeat_mean_latency_ms=[2300, 1900, 2100])
    _set(rows, "code", "draft", "none", 16.0, repeat_mean_latency_ms=[2000, 2000, 2000])
    _set(rows, "code", "ngram", "smartspec", 16.0, repeat_mean_latency_ms=[2000, 2000])  # unpaired: not shown
    _set(rows, "code", "ngram", "none", 16.0, repeat_mean_latency_ms=[2000, 2000, 2000])
    a = {cell.where: cell for cell in summary.run_checks(rows)[0].cells}
    assert a["code / draft / 16 req/s"].status == summary.PASS  # the verdict is the pooled mean's
    assert a["code / draft / 16 req/s"].detail == (
        "smartspec 2100 ms / best 2000 ms (none) = 1.050 <= 1.05; by repeat 0.95x-1.15x, within 1.05x in 2 of 3")
    assert a["code / ngram / 16 req/s"].detail == "smartspec 2000 ms / best 2000 ms (none) = 1.000 <= 1.05"


def test_paired_ratio_interval_resamples_repeats_and_requests():
    theirs = [[100.0, 250.0, 180.0, 90.0], [300.0, 120.0, 160.0, 210.0], [140.0, 200.0, 110.0, 260.0]]
    scaled = [[1.2 * x for x in repeat] for repeat in theirs]
    assert summary.paired_ratio_interval(scaled, theirs) == pytest.approx((1.2, 1.2))  # every pair 1.2x
    # One repeat 10% faster, one level, one 30% slower: the interval lies within those and spans 1.05.
    mixed = [[f * x for x in repeat] for f, repeat in zip((0.9, 1.0, 1.3), theirs)]
    low, high = summary.paired_ratio_interval(mixed, theirs)
    assert 0.9 <= low < 1.05 < high <= 1.3
    assert summary.paired_ratio_interval(mixed, theirs) == (low, high)  # seeded
    assert summary.paired_ratio_interval(mixed, theirs, level=0.5) != (low, high)
    # Failed requests drop out of their pair; rows that do not pair give no interval.
    with_failure = [[None if j == 0 else x for j, x in enumerate(repeat)] for repeat in scaled]
    assert summary.paired_ratio_interval(with_failure, theirs) == pytest.approx((1.2, 1.2))
    assert summary.paired_ratio_interval(scaled[:2], theirs) is None
    assert summary.paired_ratio_interval([r[:3] for r in scaled], theirs) is None
    assert summary.paired_ratio_interval([], []) is None
    assert summary.paired_ratio_interval([[None]], [[100.0]]) is None


def test_summary_tells_misses_beyond_the_noise_from_misses_within_it():
    rows = _passing_rows()
    base = [[2000.0, 1800.0, 2300.0], [2100.0, 1900.0, 2000.0], [1700.0, 2200.0, 2050.0]]
    _set(rows, "code", "draft", "none", 16.0, request_latency_ms=base)
    _set(rows, "code", "draft", "smartspec", 16.0, mean_latency_ms=2400,
         request_latency_ms=[[1.2 * x for x in repeat] for repeat in base])  # every request 1.2x: real
    _set(rows, "copy", "draft", "none", 16.0, request_latency_ms=base)
    _set(rows, "copy", "draft", "smartspec", 16.0, mean_latency_ms=2200,
         request_latency_ms=[[f * x for x in repeat] for f, repeat in zip((0.9, 1.0, 1.4), base)])
    _set(rows, "code", "ngram", "none", 16.0, request_latency_ms=base)
    _set(rows, "code", "ngram", "smartspec", 16.0, request_latency_ms=base)  # a pass: no verdict on noise
    check = summary.run_checks(rows)[0]
    a = {cell.where: cell for cell in check.cells}
    assert a["code / draft / 16 req/s"].status == summary.FAIL
    assert a["code / draft / 16 req/s"].detail.endswith(
        "= 1.200 > 1.05; 90% interval 1.20x-1.20x (the miss is beyond the noise)")
    assert a["copy / draft / 16 req/s"].detail.endswith("(the miss is within the noise)")
    assert a["code / ngram / 16 req/s"].detail.endswith("<= 1.05; 90% interval 1.00x-1.00x")
    (noise,) = check.info
    assert noise.status == "1 beyond, 1 within"
    assert noise.detail == ("beyond the noise (the whole 90% interval above 1.05x): code / draft / 16 req/s; "
                            "within it: copy / draft / 16 req/s")
    assert "misses against the noise" in summary.render(summary.run_checks(rows))


def test_summary_missing_rows_are_never_a_pass(tmp_path):
    rows = [r for r in _passing_rows() if r["proposer"] not in ("hf", "medusa")
            and not (r["proposer"] == "ngram" and r["policy"] == "none" and r["rate"] == 16.0)]
    checks = _by_key(summary.run_checks(rows))
    assert checks["a"].status == summary.NOT_MEASURED
    missing = {cell.where: cell for cell in checks["a"].cells}["code / ngram / 16 req/s"]
    assert (missing.status, missing.detail) == (summary.NOT_MEASURED, "no row for none")
    assert checks["b"].status == summary.PASS
    assert checks["d"].status == summary.NOT_MEASURED
    assert all(cell.detail == "no row for hf-assisted" for cell in checks["d"].cells if "lightest" in cell.where)
    assert checks["e"].status == summary.NOT_MEASURED
    assert all(check.status == summary.NOT_MEASURED for check in summary.run_checks([]))

    # The file round trip: summary.md beside serving.json, a verdict per check.
    path = tmp_path / "serving.json"
    path.write_text(json.dumps({"settings": {"rates": "1,16", "requests": 8}, "rows": rows}))
    assert summary.main([str(path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "Benchmark settings: rates=1,16, requests=8." in text
    assert "## (a) " in text and ": not measured" in text and "| code / ngram / 16 req/s | not measured |" in text
    assert "## (b) " in text and "(proposer both): PASS" in text


# ---------------------------------------------------------------------------------------------------------
# bench.hf_peers


def test_fifo_schedule_queues_behind_the_previous_request():
    assert hf_peers.fifo_schedule([0.0, 0.5, 3.0], [1.0, 1.0, 0.5]) == [(0.0, 1.0), (1.0, 2.0), (3.0, 3.5)]
    # A queue of three: each waits for the one before, arrivals inside the earlier services.
    assert hf_peers.fifo_schedule([0.0, 0.5, 0.6], [1.0, 1.0, 1.0]) == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    with pytest.raises(ValueError):
        hf_peers.fifo_schedule([1.0, 0.5], [1.0, 1.0])


@pytest.fixture(scope="module")
def tiny_peers(tmp_path_factory):
    """A tiny random target with the real tokenizer whose EOS is the first token it generates for the
    first prompt (so the peers must run through EOS), and a draft made the same way with another seed."""
    import torch

    from specdec.model.checkpoint import EMBEDDED_MODELS
    from specdec.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("peer-models")
    folders = []
    for name, seed in (("target", 0), ("draft", 1)):
        folder = make_tiny_checkpoint(root / name, "llama", seed=seed, vocab_size=4096)
        for f in (EMBEDDED_MODELS / "tokenizer").iterdir():
            shutil.copy(f, folder / f.name)
        folders.append(folder)
    prompts = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "x = [1, 2, 3]\ny = [1, 2, 3]\n"]
    models = hf_peers.load_peer_models(folders[0], device="cpu")
    ids = torch.tensor([models.encode(prompts[0])])
    first = int(models.target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                       do_sample=False)[0, -1])
    for folder in folders:
        for name in ("config.json", "generation_config.json"):
            config = json.loads((folder / name).read_text())
            config["eos_token_id"] = first
            (folder / name).write_text(json.dumps(config))
    return hf_peers.load_peer_models(folders[0], folders[1], device="cpu"), prompts, first


def test_hf_peers_give_the_same_greedy_tokens_through_eos(tiny_peers):
    models, prompts, eos = tiny_peers
    assert models.target.config.eos_token_id == eos and models.target.generation_config.eos_token_id is None
    prompt_ids = [models.encode(p) for p in prompts]
    trace = [0.0, 0.001]  # the second request arrives while the first is served: it queues
    outputs = {}
    for peer in hf_peers.PEERS:
        results = hf_peers.run_peer(models, peer, trace, prompt_ids, max_new_tokens=6, lookup_tokens=3)
        outputs[peer] = [r.token_ids for r in results]
        first, second = results
        assert [len(r.token_ids) for r in results] == [6, 6]
        assert first.start_s == 0.0 and second.start_s == pytest.approx(first.done_s)
        assert second.latency_ms == pytest.approx((second.done_s - 0.001) * 1000)
        for r in results:
            assert r.prompt_tokens == len(prompt_ids[r.index])
            assert 0 < r.ttft_ms <= r.latency_ms
            assert r.steps >= 1 and 0 <= r.accepted <= r.proposed
        if peer == "hf-generate":
            assert first.proposed == 0 and first.steps == 6
        else:
            assert first.proposed > 0  # the draft always drafts; the prompt repeats a line for lookup
        row = peer_row(RunConfig(peer, PEER_PROPOSER, "code", 2.0), [results], 6)
        assert row["peer"] and row["proposer"] == PEER_PROPOSER and row["policy"] == peer
        assert row["requests"] == 2 and row["errors"] == 0 and row["generated_tokens"] == 12
        assert row["mean_latency_ms"] > 0 and row["mean_ttft_ms"] > 0 and row["goodput_tok_s"] > 0
        assert row["p99_latency_ms"] >= row["p50_latency_ms"] > 0 and row["ms_per_output_token"] > 0
        if peer == "hf-generate":
            assert row["acceptance_rate"] is None and row["mean_k"] is None and row["mean_accepted_per_step"] is None
        else:
            assert 0 <= row["acceptance_rate"] <= 1 and row["mean_k"] > 0
    assert outputs["hf-generate"][0][0] == eos  # EOS came first and generation went on
    assert outputs["hf-assisted"] == outputs["hf-generate"] == outputs["hf-prompt-lookup"]


def test_bench_command_writes_json_markdown_and_plots(tmp_path):
    from specdec.testing import make_tiny_stack_checkpoints

    target, draft = make_tiny_stack_checkpoints(tmp_path / "models")
    out = tmp_path / "bench"
    code = main(["--rates", "4", "--policies", "none,fixed:2,fixed:2~max-k=4", "--proposers", "draft",
                 "--workloads", "copy", "--requests", "4", "--max-tokens", "8", "--out", str(out),
                 "--model", str(target), "--draft-model", str(draft), "--service-threads", "1",
                 "--peers", "hf-generate", "--startup-timeout", "120", "--timeout", "60", "--repeats", "2"])
    assert code == 0
    rows = json.loads((out / "serving.json").read_text())["rows"]
    assert [(r["policy"], r["proposer"], r["workload"], r["rate"]) for r in rows] == [
        ("none", "draft", "copy", 4.0), ("fixed:2", "draft", "copy", 4.0),
        ("fixed:2~max-k=4", "draft", "copy", 4.0), ("hf-generate", "hf", "copy", 4.0)]
    for row in rows:  # two repeats of 4 requests, pooled
        assert row["requests"] == 2 * 4 and row["errors"] == 0 and row["repeats"] == 2
        assert row["generated_tokens"] == 2 * 4 * 8
        assert row["mean_latency_ms"] > 0 and row["goodput_tok_s"] > 0
        assert row["mean_latency_ms"] == pytest.approx(sum(row["repeat_mean_latency_ms"]) / 2)
    assert rows[0]["proposed"] == 0 and rows[0]["mean_k"] == 0.0
    assert all(row["proposed"] > 0 and 0 < row["mean_k"] <= 2.0 for row in rows[1:3])
    assert rows[3]["peer"] and rows[3]["acceptance_rate"] is None
    table = (out / "serving.md").read_text()
    assert table.count("| copy | draft |") == 3 and table.count("| copy | hf | hf-generate |") == 1
    png = out / "serving_latency_copy_draft.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "serving_latency_copy_hf.png").exists()  # peers are drawn in the workload's plots
    text = (out / "summary.md").read_text()
    assert "## (a) " in text and "| copy / draft / 4 req/s | not measured | no row for smartspec" in text


def test_bench_rejects_bad_flags(capsys):
    assert main(["--proposers", "magic"]) == 2
    assert "unknown proposer" in capsys.readouterr().err
    assert main(["--peers", "hf-magic"]) == 2
    assert "unknown peer" in capsys.readouterr().err
    assert main(["--peer-lookup-tokens", "0"]) == 2
    assert main(["--repeats", "0"]) == 2


@pytest.mark.parametrize("module", ["serving", "summary", "runner_cost", "step_overhead", "http_overhead"])
def test_each_benchmark_runs_as_a_module_from_the_repository_root(module):
    """`python -m bench.X` from a checkout: the package imports itself and the services without sys.path edits."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", "--help"], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"python -m bench.{module}" in result.stdout

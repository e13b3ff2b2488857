"""The serving benchmark (bench/serving.py, `specdec bench`): traces, summaries, workloads, one tiny sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import (  # noqa: E402
    PROMPT_TOKENS,
    RequestResult,
    _count,
    _tokenizer,
    code_completion_prompts,
    copy_heavy_prompts,
    poisson_trace,
    summarize,
)
from specdec.cli import main  # noqa: E402


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
                      accepted=6, steps=4),
        RequestResult(1, 0.5, 0.5, 1.5, latency_ms=200.0, ttft_ms=20.0, completion_tokens=20, proposed=8,
                      accepted=4, steps=4),
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


def test_bench_command_writes_json_markdown_and_plots(tmp_path):
    from specdec.testing import make_tiny_stack_checkpoints

    target, draft = make_tiny_stack_checkpoints(tmp_path / "models")
    out = tmp_path / "bench"
    code = main(["bench", "--rates", "4", "--policies", "none,fixed:2", "--proposers", "draft",
                 "--workloads", "copy", "--requests", "4", "--max-tokens", "8", "--out", str(out),
                 "--model", str(target), "--draft-model", str(draft), "--service-threads", "1",
                 "--startup-timeout", "120", "--timeout", "60"])
    assert code == 0
    rows = json.loads((out / "serving.json").read_text())["rows"]
    assert [(r["policy"], r["proposer"], r["workload"], r["rate"]) for r in rows] == [
        ("none", "draft", "copy", 4.0), ("fixed:2", "draft", "copy", 4.0)]
    for row in rows:
        assert row["requests"] == 4 and row["errors"] == 0
        assert row["generated_tokens"] == 4 * 8
        assert row["mean_latency_ms"] > 0 and row["goodput_tok_s"] > 0
    assert rows[0]["proposed"] == 0 and rows[0]["mean_k"] == 0.0
    assert rows[1]["proposed"] > 0 and 0 < rows[1]["mean_k"] <= 2.0
    table = (out / "serving.md").read_text()
    assert table.count("| copy | draft |") == 2
    png = out / "serving_latency_copy_draft.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_flags(capsys):
    assert main(["bench", "--proposers", "magic"]) == 2
    assert "unknown proposer" in capsys.readouterr().err

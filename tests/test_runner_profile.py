"""bench/runner_profile.py: its points parse, and on CPU it times every point and leaves the kernel columns empty."""

import sys

from bench import runner_profile


def test_points_parse_as_batch_by_new_tokens():
    assert runner_profile.parse_points("1x1,16x4") == [(1, 1), (16, 4)]


def test_cpu_report_has_a_timed_row_per_point(tmp_path, monkeypatch):
    out = tmp_path / "profile.md"
    monkeypatch.setattr(sys, "argv", ["runner_profile.py", "--device", "cpu", "--points", "1x1,2x3", "--steps", "2",
                                      "--profiled", "1", "--context", "8", "--out", str(out)])
    assert runner_profile.main() == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "1"], ["| 2", "3"]]
    for row in rows:
        step_ms = float(row.split(" | ")[2])
        assert step_ms > 0
        assert row.endswith("| – | – | – |")  # no kernels on CPU

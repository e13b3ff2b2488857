"""bench/draft_forward.py: a timed row per (batch, new tokens), both paths measured, on a tiny checkpoint."""

import sys

from bench import draft_forward
from specdec.testing import make_tiny_checkpoint


def test_report_has_a_row_per_shape_with_both_paths_timed(tmp_path, monkeypatch):
    folder = make_tiny_checkpoint(tmp_path / "model", "llama")
    out = tmp_path / "draft_forward.md"
    monkeypatch.setattr(sys, "argv", ["draft_forward.py", "--model", str(folder), "--batches", "1,3", "--new", "1,2",
                                      "--context", "8", "--repeats", "4", "--out", str(out)])
    assert draft_forward.main() == 0
    rows = [line.strip("| ").split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [row[:2] for row in rows] == [["1", "1"], ["1", "2"], ["3", "1"], ["3", "2"]]
    for _, _, torch_ms, numpy_ms, ratio in rows:
        assert float(torch_ms) > 0 and float(numpy_ms) > 0
        assert abs(float(ratio) - float(numpy_ms) / float(torch_ms)) < 0.03  # from rounded figures

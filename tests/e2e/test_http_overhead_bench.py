"""bench.http_overhead: its statistics, its table, and one short run through both doors of a real stack."""

from __future__ import annotations

import pytest

from bench import http_overhead
from bench.http_overhead import bootstrap, percentile


def test_percentile_and_bootstrap():
    assert percentile([3, 1, 2], 50) == 2 and percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    low, high = bootstrap([1.0] * 10 + [2.0] * 10, lambda v: percentile(v, 50))
    assert 1.0 <= low <= 1.5 <= high <= 2.0
    assert bootstrap([4.0] * 5, lambda v: percentile(v, 50)) == (4.0, 4.0)


@pytest.mark.timeout(600)
def test_a_short_run_prints_the_table(capsys):
    assert http_overhead.main(["--requests", "4", "--heavy-s", "0.5", "--rounds", "1", "--concurrency", "4",
                               "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "python -m bench.http_overhead --requests 4" in out
    assert "| light: 4 requests one at a time, latency p50 |" in out
    assert "HTTP/gRPC" in out and "CPU per request, scheduler process" in out

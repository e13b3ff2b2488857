"""Baselines that pick k from the number of running requests alone (what vLLM and TensorRT-LLM offer).

- `disable-by-batch-size`: vLLM's switch: a fixed k until more than `threshold` requests run, then none.
- `batch-size-table`: k from a table of batch-size ranges, e.g. "1-8:4,9-:0" (config.parse_batch_size_table).

Both serve each request with its own proposer or the first configured one, like `fixed`.
"""

from __future__ import annotations

from typing import Sequence

from scheduler_svc.policy.base import FixedPolicy, Policy
from scheduler_svc.types import DEFAULT_BATCH_SIZE_TABLE, BatchSizeRange, Plan, RequestView, parse_batch_size_table


def k_for_batch_size(table: Sequence[BatchSizeRange], batch_size: int) -> int:
    return next((r.k for r in table if batch_size in r), 0)


class DisableByBatchSizePolicy(Policy):
    """Fixed k while at most `threshold` requests run; no speculation above it."""

    name = "disable-by-batch-size"

    def __init__(self, proposers: Sequence[str], k: int, threshold: int = 8) -> None:
        if threshold < 0:
            raise ValueError(f"--disable-batch-size must be >= 0, got {threshold}")
        self.threshold = threshold
        self._fixed = FixedPolicy(proposers, k)

    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        k = self._fixed.k if len(requests) <= self.threshold else 0
        return FixedPolicy(self._fixed.proposers, k).plan(requests)


class BatchSizeTablePolicy(Policy):
    """k from the range of the batch-size table the number of running requests falls in."""

    name = "batch-size-table"

    def __init__(self, proposers: Sequence[str], table: str | Sequence[BatchSizeRange] = DEFAULT_BATCH_SIZE_TABLE):
        self.proposers = list(proposers)
        self.table = parse_batch_size_table(table) if isinstance(table, str) else tuple(table)

    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        return FixedPolicy(self.proposers, k_for_batch_size(self.table, len(requests))).plan(requests)

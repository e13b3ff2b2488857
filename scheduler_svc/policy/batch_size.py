"""Baselines that pick k from the number of running requests alone (what vLLM and TensorRT-LLM offer).

- `disable-by-batch-size`: vLLM's switch: a fixed k until more than `threshold` requests run, then none.
- `batch-size-table`: k from a table of batch-size ranges, e.g. "1-4:5,5-16:3,17-:0".

Both serve each request with its own proposer or the first configured one, like `fixed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from scheduler_svc.policy.base import FixedPolicy, Policy
from scheduler_svc.types import Plan, RequestView

DEFAULT_BATCH_SIZE_TABLE = "1-4:5,5-16:3,17-:0"


@dataclass(frozen=True)
class BatchSizeRange:
    """Batch sizes lo..hi (hi None: no upper end) speculate k tokens per request."""

    lo: int
    hi: int | None
    k: int

    def __contains__(self, batch_size: int) -> bool:
        return self.lo <= batch_size and (self.hi is None or batch_size <= self.hi)


def parse_batch_size_table(spec: str) -> tuple[BatchSizeRange, ...]:
    """'1-4:5,5-16:3,17-:0' -> ranges; a single size 'N:k' is allowed. Raises ValueError naming the bad part.

    Sizes not covered by any range get k = 0; ranges may not overlap.
    """
    ranges = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            sizes, k_text = part.split(":")
            lo_text, dash, hi_text = sizes.partition("-")
            lo = int(lo_text)
            hi = (int(hi_text) if hi_text.strip() else None) if dash else lo
            k = int(k_text)
        except ValueError:
            raise ValueError(f"--batch-size-table part {part!r}: expected LO-HI:K, LO-:K or N:K, "
                             f"e.g. {DEFAULT_BATCH_SIZE_TABLE!r}") from None
        if lo < 1 or (hi is not None and hi < lo) or k < 0:
            raise ValueError(f"--batch-size-table part {part!r}: need 1 <= LO <= HI and K >= 0")
        ranges.append(BatchSizeRange(lo, hi, k))
    if not ranges:
        raise ValueError(f"--batch-size-table is empty; e.g. {DEFAULT_BATCH_SIZE_TABLE!r}")
    ranges.sort(key=lambda r: r.lo)
    for a, b in zip(ranges, ranges[1:]):
        if a.hi is None or a.hi >= b.lo:
            raise ValueError(f"--batch-size-table ranges overlap: {a.lo}-{a.hi or ''} and {b.lo}-{b.hi or ''}")
    return tuple(ranges)


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

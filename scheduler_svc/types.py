"""The scheduler's contracts: what crosses between the engine, the policy and telemetry, as plain dataclasses.

The engine builds RequestViews and asks the policy for a Plan per request; after the step it reports
RequestOutcomes and the step's StepRecord. ProposerSpec is what the scheduler learned from a proposer's
Info; Candidates (specdec/contracts.py) what a proposer proposed for a request, chains and trees alike.
Nothing here imports grpc, the engine or the policy: every side depends on this module, not on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from specdec.contracts import Candidates

# A request's `proposer` field uses this name to turn speculation off, so no proposer may be called so.
NO_PROPOSER = "none"
# The batch-size-table policy's default: k per range of running requests (--batch-size-table).
DEFAULT_BATCH_SIZE_TABLE = "1-4:5,5-16:3,17-:0"


@dataclass(frozen=True)
class ProposerSpec:
    """What a policy may know about a configured proposer (from its Info)."""

    kind: str  # ngram, draft, medusa, ...: for logs and metrics; behaviour follows the capabilities below
    max_budget: int  # most candidates per request and step
    free: bool = False  # proposing costs next to nothing: it may propose for everyone before the plan
    tree: bool = False  # it answers trees: its budget counts nodes


@dataclass(frozen=True)
class Plan:
    """What to do for one request in one step: ask `proposer` for up to k candidate nodes."""

    proposer: str | None  # None: no speculation (plain decode)
    k: int  # candidate nodes (k for a chain); 0 with proposer None


NO_SPECULATION = Plan(None, 0)


@dataclass(frozen=True)
class RequestView:
    """What a policy may know about a running request."""

    request_id: str
    proposer: str  # the request's choice: "" = the server's, "none" = no speculation, else a name
    context_len: int  # committed tokens (prompt + output)
    max_k: int  # most candidates the engine could verify for it this step (context and max_tokens)
    proposed: int = 0  # candidate tokens verified so far, all proposers
    accepted: int = 0  # of those, accepted
    # Free proposer -> the parent indices of what it already proposed this step (a chain's: -1, 0, 1, ...;
    # empty: no match); only when the policy asked for free proposals. A plan with such a proposer keeps
    # the first k of those nodes.
    offered: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    max_nodes: int = 0  # most tree nodes that fit its context this step (trees may be wider than max_k)
    # Costly proposer -> committed tokens it has not read yet (a whole prompt the first time it serves the
    # request): what it must run through before proposing.
    unsent: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestOutcome:
    """What one step did for one request, fed back to the policy."""

    request_id: str
    proposer: str | None
    k: int  # candidates asked for
    proposed: int  # candidates verified (may be fewer than k, or 0 when the proposer failed)
    accepted: int
    committed: tuple[int, ...] = ()  # the step's accepted tokens + bonus, as the verifier returned them
    # Free proposer -> what it proposed this step before the plan cut it, to score it after the fact.
    free_proposals: Mapping[str, Candidates] = field(default_factory=dict)
    verified_parents: tuple[int, ...] = ()  # parent indices of the candidates verified (a chain: -1, 0, ...)
    accepted_indices: tuple[int, ...] = ()  # the accepted path's node indices in them


@dataclass
class StepRecord:
    """Timings and counts of one engine step, for benchmarks (Engine.step_records)."""

    step_id: int
    start_s: float  # time.perf_counter() at the start of the step
    wall_ms: float = 0.0  # the whole step, admission to commit
    batch_size: int = 0  # requests in the Verify call
    admitted: int = 0  # requests prefilled in this step
    proposed: int = 0  # candidate tokens verified
    accepted: int = 0  # of those, accepted
    committed: int = 0  # tokens added to requests (first tokens + accepted + bonus, before truncation)
    prefill_forward_ms: float = 0.0
    prefill_total_ms: float = 0.0
    verify_forward_ms: float = 0.0
    verify_total_ms: float = 0.0
    verify_batched_tokens: int = 0
    verify_context_tokens: int = 0
    propose_ms: dict[str, float] = field(default_factory=dict)  # per proposer, its own measure
    propose_forward_ms: dict[str, float] = field(default_factory=dict)
    propose_new_tokens: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per proposer, see ProposeResult
    propose_wall_ms: float = 0.0  # the parallel propose phase as the engine saw it
    free_propose_wall_ms: float = 0.0  # free proposers proposing before the plan, when the policy asks
    plan_ms: float = 0.0  # the policy's plan() call (part of the overhead)
    predicted_step_ms: float | None = None  # the policy's prediction of this step, if it makes one

    @property
    def forward_ms(self) -> float:
        """Model forward time on the step's critical path (proposers run in parallel: the slowest counts)."""
        return self.prefill_forward_ms + max(self.propose_forward_ms.values(), default=0.0) + self.verify_forward_ms

    @property
    def overhead_ms(self) -> float:
        """Everything that is not a model forward: RPCs, (de)serialisation, scheduling, proposer CPU work."""
        return self.wall_ms - self.forward_ms


@dataclass(frozen=True)
class BatchSizeRange:
    """Batch sizes lo..hi (hi None: no upper end) speculate k tokens per request."""

    lo: int
    hi: int | None
    k: int

    def __contains__(self, batch_size: int) -> bool:
        return self.lo <= batch_size and (self.hi is None or batch_size <= self.hi)


def parse_batch_size_table(spec: str) -> tuple[BatchSizeRange, ...]:
    """'1-8:4,9-32:2,33-:0' -> ranges; a single size 'N:k' is allowed. Raises ValueError naming the bad part.

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

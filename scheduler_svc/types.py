"""The scheduler's contracts: what crosses between the engine, the policy and telemetry, as plain dataclasses.

The engine builds RequestViews and asks the policy for a Plan per request; after the step it reports
RequestOutcomes and the step's StepRecord. ProposerSpec is what the scheduler learned from a proposer's
Info. Nothing here imports grpc, the engine or the policy: every side depends on this module, not on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# A request's `proposer` field uses this name to turn speculation off, so no proposer may be called so.
NO_PROPOSER = "none"


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
    # Free proposer -> candidates it already proposed this step (0: no match); only when the policy
    # asked for free proposals. A plan with such a proposer gets at most that many.
    offered: Mapping[str, int] = field(default_factory=dict)
    # Free tree proposer -> the parent indices of the tree it proposed (a plan keeps its first k nodes).
    offered_trees: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
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
    # Free proposer -> its full chain this step (before truncation to the plan), to score it after the fact.
    free_candidates: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Free tree proposer -> its full tree this step as (token ids, parent indices), likewise.
    free_trees: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
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

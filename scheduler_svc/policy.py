"""The speculation policy: per running request and step, which proposer and how many candidates.

The engine asks `plan()` once per step with a view of every running request and caps the answer
(context room, max_tokens, the proposer's max budget), then reports what happened through
`observe()`. Policies here: `none` (never speculate) and `fixed` (the same k for everyone); the
goodput policies (`smartspec`, `batch-uniform`) are in smartspec.py and the batch-size switches
(`disable-by-batch-size`, `batch-size-table`) in batch_size_policies.py; make_policy builds any of them.

Proposers that cost nothing to run (FREE_PROPOSER_KINDS: prompt lookup) can propose before the plan:
a policy that sets `free_proposal_budget` gets, in each RequestView.offered, how many candidates they
already have for the request, and the engine truncates those to the planned k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from scheduler_svc.config import NO_PROPOSER

if TYPE_CHECKING:
    from scheduler_svc.config import SchedulerConfig
    from scheduler_svc.engine import StepRecord

# Proposer kinds whose proposals cost (next to) nothing, so they may propose for everyone before the plan
# (prompt lookup; Medusa heads, a few small matrix products on one hidden state per request).
FREE_PROPOSER_KINDS = frozenset({"ngram", "medusa"})
# Proposer kinds that answer trees: their budget counts nodes, and the depth of a tree (not its size) is
# what max_tokens bounds.
TREE_PROPOSER_KINDS = frozenset({"medusa"})


@dataclass(frozen=True)
class ProposerSpec:
    """What a policy may know about a configured proposer (from its Info)."""

    kind: str
    max_budget: int  # most candidates per request and step

    @property
    def free(self) -> bool:
        return self.kind in FREE_PROPOSER_KINDS

    @property
    def tree(self) -> bool:
        return self.kind in TREE_PROPOSER_KINDS


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


class Policy(ABC):
    """Chooses per-request speculation; must be cheap (it runs on every step)."""

    name: str
    # > 0: free proposers propose up to this many candidates per request before plan() (RequestView.offered).
    free_proposal_budget: int = 0
    # The same for free tree proposers, in tree nodes (0: they propose after the plan, like costly ones).
    free_tree_budget: int = 0
    # The policy's prediction of the step it last planned (ms), when it has a cost model.
    predicted_step_ms: float | None = None

    def bind_proposers(self, proposers: Mapping[str, ProposerSpec]) -> None:
        """The configured proposers' kinds and budgets, once known (before the first plan). Default: ignore."""

    @abstractmethod
    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        """One Plan per request id; requests left out get NO_SPECULATION."""

    def observe(self, outcomes: Sequence[RequestOutcome], record: StepRecord) -> None:
        """Feedback after a step: per-request outcomes and the step's timings, all at once."""
        self.observe_outcomes(outcomes, record)
        self.observe_timings(outcomes, record)

    def observe_outcomes(self, outcomes: Sequence[RequestOutcome], record: StepRecord) -> None:
        """What a step did for each request: what the next plan must know. Default: ignore."""

    def observe_timings(self, outcomes: Sequence[RequestOutcome], record: StepRecord) -> None:
        """A step's timings, after its outcomes: learning that may lag a step (a step-time model), which
        the engine gives while a later service call is in flight, so that it lengthens no step even when
        the plan cannot wait for it. Default: ignore."""

    def observe_arrival(self, arrival_s: float) -> None:
        """A request was queued at arrival_s (time.perf_counter seconds). Default: ignore."""


class NoSpeculationPolicy(Policy):
    """Plain decoding for everyone (k = 0)."""

    name = "none"

    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        return {r.request_id: NO_SPECULATION for r in requests}


class FixedPolicy(Policy):
    """The same k for every request, with the request's proposer or else the first configured one."""

    name = "fixed"

    def __init__(self, proposers: Sequence[str], k: int) -> None:
        self.proposers = list(proposers)
        self.k = k
        self.trees: set[str] = set()  # proposers answering trees: k counts nodes, capped by max_nodes

    def bind_proposers(self, proposers: Mapping[str, ProposerSpec]) -> None:
        self.trees = {name for name, spec in proposers.items() if spec.tree}

    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        return {r.request_id: self._plan_one(r) for r in requests}

    def _plan_one(self, request: RequestView) -> Plan:
        if request.proposer == NO_PROPOSER or not self.proposers:
            return NO_SPECULATION
        proposer = request.proposer or self.proposers[0]
        k = min(self.k, request.max_nodes if proposer in self.trees else request.max_k)
        return Plan(proposer, k) if k > 0 else NO_SPECULATION


def make_policy(name: str, proposers: Sequence[str], k: int, **options) -> Policy:
    """The policy called `name` (see config.POLICIES); `options` are the keyword arguments of its class
    (smartspec / batch-uniform: max_k, ema_alpha, cost_window, max_tree_nodes, arrival_window_s,
    rate_calibration (smartspec only);
    disable-by-batch-size: threshold;
    batch-size-table: table)."""
    if name == "none":
        return NoSpeculationPolicy()
    if name == "fixed":
        return FixedPolicy(proposers, k)
    # Imported here: those modules build on this one.
    from scheduler_svc.batch_size_policies import BatchSizeTablePolicy, DisableByBatchSizePolicy
    from scheduler_svc.smartspec import BatchUniformPolicy, SmartSpecPolicy

    if name == "smartspec":
        return SmartSpecPolicy(proposers, **options)
    if name == "batch-uniform":
        return BatchUniformPolicy(proposers, **options)
    if name == "disable-by-batch-size":
        return DisableByBatchSizePolicy(proposers, k, **options)
    if name == "batch-size-table":
        return BatchSizeTablePolicy(proposers, **options)
    raise ValueError(f"unknown policy {name!r}")


def policy_from_config(config: SchedulerConfig, proposers: Sequence[str]) -> Policy:
    """The policy a scheduler configuration asks for, with the flags that policy reads."""
    options: dict = {}
    if config.policy in ("smartspec", "batch-uniform"):
        options = dict(max_k=config.max_k, ema_alpha=config.ema_alpha, cost_window=config.cost_window,
                       max_tree_nodes=config.max_tree_nodes, arrival_window_s=config.arrival_window_s)
        if config.policy == "smartspec":
            options["rate_calibration"] = config.rate_calibration
    elif config.policy == "disable-by-batch-size":
        options = dict(threshold=config.disable_batch_size)
    elif config.policy == "batch-size-table":
        options = dict(table=config.batch_size_table)
    return make_policy(config.policy, proposers, config.k, **options)

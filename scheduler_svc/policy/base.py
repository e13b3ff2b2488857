"""The policy interface, and the two policies that need no model: `none` and `fixed`.

The engine asks `plan()` once per step with a view of every running request and caps the answer
(context room, max_tokens, the proposer's max budget), then reports what happened through
`observe()` (the contracts are in scheduler_svc/types.py).

Proposers that cost next to nothing to run (ProposerSpec.free: prompt lookup, tree heads) can propose
before the plan: a policy that sets `free_proposal_budget` gets, in each RequestView.offered, how many
candidates they already have for the request, and the engine truncates those to the planned k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Mapping, Sequence

from scheduler_svc.types import NO_PROPOSER, NO_SPECULATION, Plan, ProposerSpec, RequestOutcome, RequestView, StepRecord

if TYPE_CHECKING:
    from scheduler_svc.policy.cost_model import CostModel

class Policy(ABC):
    """Chooses per-request speculation; must be cheap (it runs on every step)."""

    name: str
    # > 0: free proposers propose up to this many candidates per request before plan() (RequestView.offered).
    free_proposal_budget: int = 0
    # The same for free tree proposers, in tree nodes (0: they propose after the plan, like costly ones).
    free_tree_budget: int = 0
    # The policy's prediction of the step it last planned (ms), and of its goodput (tokens/s), when it has a
    # cost model (telemetry exports both).
    predicted_step_ms: float | None = None
    predicted_goodput: float | None = None
    # Its step-time model, which the start-up profile seeds (scheduler_svc/profile.py); None: it has none.
    cost_model: CostModel | None = None

    def bind_proposers(self, proposers: Mapping[str, ProposerSpec]) -> None:
        """The configured proposers' kinds and budgets, once known (before the first plan). Default: ignore."""

    @abstractmethod
    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        """One Plan per request id; requests left out get NO_SPECULATION."""

    def observe(self, outcomes: Sequence[RequestOutcome], record: StepRecord) -> None:
        """Feedback after a step: what it did for each request, and its timings. Default: ignore."""


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

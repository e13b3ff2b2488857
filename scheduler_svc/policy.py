"""The speculation policy: per running request and step, which proposer and how many candidates.

The engine asks `plan()` once per step with a view of every running request and caps the answer
(context room, max_tokens, the proposer's max budget), then reports what happened through
`observe()`. Policies here: `none` (never speculate) and `fixed` (the same k for everyone). A
goodput-maximising policy plugs into the same two calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from scheduler_svc.config import NO_PROPOSER

if TYPE_CHECKING:
    from scheduler_svc.engine import StepRecord


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


@dataclass(frozen=True)
class RequestOutcome:
    """What one step did for one request, fed back to the policy."""

    request_id: str
    proposer: str | None
    k: int  # candidates asked for
    proposed: int  # candidates verified (may be fewer than k, or 0 when the proposer failed)
    accepted: int


class Policy(ABC):
    """Chooses per-request speculation; must be cheap (it runs on every step)."""

    name: str

    @abstractmethod
    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        """One Plan per request id; requests left out get NO_SPECULATION."""

    def observe(self, outcomes: Sequence[RequestOutcome], record: StepRecord) -> None:
        """Feedback after a step: per-request outcomes and the step's timings. Default: ignore."""


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

    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        return {r.request_id: self._plan_one(r) for r in requests}

    def _plan_one(self, request: RequestView) -> Plan:
        if request.proposer == NO_PROPOSER or not self.proposers:
            return NO_SPECULATION
        proposer = request.proposer or self.proposers[0]
        k = min(self.k, request.max_k)
        return Plan(proposer, k) if k > 0 else NO_SPECULATION


def make_policy(name: str, proposers: Sequence[str], k: int) -> Policy:
    """The policy called `name` (see config.POLICIES)."""
    if name == "none":
        return NoSpeculationPolicy()
    if name == "fixed":
        return FixedPolicy(proposers, k)
    raise ValueError(f"unknown policy {name!r}")

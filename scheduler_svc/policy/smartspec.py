"""Goodput policies: choose speculation per step to maximise predicted tokens per second (SmartSpec).

- `smartspec` (the default): per request, a proposer and k in 0..max_k, chosen jointly for the batch
  (goodput.choose). Free proposers (prompt lookup, tree heads) have proposed already; a request they
  have no match for falls to a costly proposer (the draft) or to none. For a tree proposer k counts
  nodes (up to max_tree_nodes): the plan keeps the first k nodes of its best-first tree, each worth the
  chance its path is accepted (tree_acceptance.TreeAcceptance); a chain is scored the same way.
  A draft must read a request's prompt before it first proposes for it: where a free proposer also has
  candidates for such a request, that catch-up (measured per prompt token) is charged to the draft,
  spread over the request's expected steps.
- `batch-uniform`: one k for the whole batch, chosen by goodput, each request with its own or the
  first configured proposer: what the SmartSpec paper's implementation did.

Both learn acceptance rates (acceptance.AcceptanceEstimator; per depth and rank for trees) and the
step-time model (cost_model.CostModel) online from every step's outcomes and timings; the start-up profile
(scheduler_svc/profile.py) seeds the cost model.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from scheduler_svc.policy.acceptance import AcceptanceEstimator, Observation
from scheduler_svc.policy.cost_model import DEFAULT_WINDOW, CostModel, StepShape, caught_up_tokens, steady_new_tokens
from scheduler_svc.policy.goodput import Choice, StepCost, best_uniform_k, choose, survival
from scheduler_svc.policy.base import Policy
from scheduler_svc.policy.tree_acceptance import TreeAcceptance
from scheduler_svc.types import NO_PROPOSER, NO_SPECULATION, Plan, ProposerSpec, RequestOutcome, RequestView, StepRecord

DEFAULT_MAX_K = 8
DEFAULT_MAX_TREE_NODES = 16
NO_CAP = 1 << 30
# A proposer's acceptance prior before any evidence: optimistic, where a deployed draft usually is (the
# embedded draft accepts about 0.8 of the target's tokens). A prior that says speculation does not pay is
# never put to the test: at 0.5, a replay with the draft's costs doubled never tried the draft and never
# learned its 0.8. Evidence brings an optimistic prior down within tens of chains.
INITIAL_ACCEPTANCE = 0.8


@dataclass
class _PlannedStep:
    """What plan() decided, kept for observe() to compare with what happened."""

    context: dict[str, int]  # request id -> committed tokens
    predicted_ms: float


class GoodputPolicy(Policy):
    """The shared machinery: acceptance estimates, the cost model, and the feedback from each step."""

    def __init__(self, proposers: Sequence[str], *, max_k: int = DEFAULT_MAX_K, ema_alpha: float = 0.3,
                 cost_window: int = DEFAULT_WINDOW, max_tree_nodes: int = DEFAULT_MAX_TREE_NODES) -> None:
        if max_k < 0:
            raise ValueError(f"--max-k must be >= 0, got {max_k}")
        if max_tree_nodes < 0:
            raise ValueError(f"--max-tree-nodes must be >= 0, got {max_tree_nodes}")
        self.proposers = list(proposers)
        self.max_k = max_k
        self.max_tree_nodes = max_tree_nodes
        # Tree proposers' nodes, per (depth, rank); the tree's depth is bounded by its size.
        self.trees = TreeAcceptance(max_depth=max(max_tree_nodes, 1))
        # The prior averages over many requests, so it moves slower than a request's own estimate.
        self.acceptance = AcceptanceEstimator(max(max_k, 1), alpha=ema_alpha, prior_alpha=ema_alpha / 6,
                                              initial_rate=INITIAL_ACCEPTANCE)
        self.cost_model = CostModel(cost_window)
        self.specs: dict[str, ProposerSpec] = {name: ProposerSpec("", NO_CAP) for name in self.proposers}
        self.last_plan_ms = 0.0  # the chooser's own time, last step
        self._planned: _PlannedStep | None = None

    def bind_proposers(self, proposers: Mapping[str, ProposerSpec]) -> None:
        self.specs.update({name: spec for name, spec in proposers.items() if name in self.specs})

    def _free(self) -> list[bool]:
        return [self.specs[name].free for name in self.proposers]

    def _is_tree(self, name: str) -> bool:
        spec = self.specs.get(name)
        return spec is not None and spec.tree

    # -- plan ----------------------------------------------------------------------------------------

    def plan(self, requests: Sequence[RequestView]) -> dict[str, Plan]:
        t0 = time.perf_counter()
        self.acceptance.advance()  # the drift clock: one tick per plan (see acceptance.py)
        max_k = self._caps(requests)  # [B, P]
        context = sum(r.context_len for r in requests)
        if not max_k.any():
            # Nobody may speculate (no prompt-lookup match, no costly proposer): nothing to choose, and
            # at light load with prompt lookup alone that is about every other step.
            plans = {r.request_id: NO_SPECULATION for r in requests}
            step_ms = self.cost_model.no_speculation_ms(len(requests), context)
            tokens = float(len(requests))
        else:
            surv = self._gains(requests, max_k)
            cost = self.cost_model.step_cost(len(requests), context, self.proposers, self._free(),
                                             catch_up_ms=self._catch_up(requests, surv))
            choice = self._choose(surv, max_k, cost)
            plans = {}
            for r, k, p in zip(requests, choice.ks.tolist(), choice.proposer.tolist()):
                plans[r.request_id] = Plan(self.proposers[p], k) if k > 0 else NO_SPECULATION
            step_ms, tokens = choice.step_ms, choice.expected_tokens
        self.predicted_step_ms = step_ms
        self.predicted_goodput = tokens / step_ms * 1e3 if step_ms > 0 else 0.0
        self._planned = _PlannedStep({r.request_id: r.context_len for r in requests}, step_ms)
        self.last_plan_ms = (time.perf_counter() - t0) * 1e3
        return plans

    def _caps(self, requests: Sequence[RequestView]) -> np.ndarray:
        """Most candidates each proposer may give each request this step [B, P] (0: not an option)."""
        caps = np.zeros((len(requests), len(self.proposers)), dtype=int)
        for i, r in enumerate(requests):
            if r.proposer == NO_PROPOSER:
                continue
            for p, name in enumerate(self.proposers):
                if r.proposer and r.proposer != name:
                    continue
                spec = self.specs[name]
                if spec.tree:
                    own = len(r.offered.get(name, ())) if spec.free and self.free_tree_budget else spec.max_budget
                    caps[i, p] = min(own, r.max_nodes, self.max_tree_nodes)
                else:
                    own = len(r.offered.get(name, ())) if spec.free and self.free_proposal_budget else spec.max_budget
                    caps[i, p] = min(own, r.max_k, self.max_k)
        return caps

    def _gains(self, requests: Sequence[RequestView], caps: np.ndarray) -> np.ndarray:
        """Expected gain of each candidate node, in order, for every (request, proposer) [B, P, K]: the
        chance that the path to it is accepted (for a chain, that its first j candidates are)."""
        trees = any(self.specs[name].tree for name in self.proposers)
        width = max(self.max_k, self.max_tree_nodes if trees else 0, 1)
        surv = np.zeros((len(requests), len(self.proposers), width))
        ids = [r.request_id for r in requests]
        for p, name in enumerate(self.proposers):
            if not caps[:, p].any():
                continue
            if not self.specs[name].tree:
                if self.max_k > 0:
                    surv[:, p, :self.max_k] = survival(self.acceptance.position_rates(ids, name))
                continue
            expected: np.ndarray | None = None
            for i, r in enumerate(requests):
                if caps[i, p] <= 0:
                    continue
                parents = r.offered.get(name)
                if parents is not None:  # proposed already: the gains of its very nodes
                    gains = self.trees.node_gains(name, parents[:width])
                else:  # proposed after the plan: the best tree the rates allow
                    if expected is None:
                        expected = self.trees.best_tree_gains(name, width)
                    gains = expected
                surv[i, p, :len(gains)] = gains
        return surv

    def _catch_up(self, requests: Sequence[RequestView], surv: np.ndarray) -> np.ndarray | None:
        """[B, P] what serving each request costs each costly proposer beyond a steady step, or None.

        A draft that has not read a request's prompt runs through it first (at high load, a new request
        nearly every step: 5-20 ms on a 40-90 ms step on the development machine). That is paid once and
        buys the draft for the rest of the request, so it is charged spread over the request's expected
        steps with that proposer: its remaining tokens over 1 + the expected accepted per step. It is
        charged only where a free proposer has candidates for the request this step: then the choice is
        between proposers, and one that needs no catch-up may well be the better buy. Against no
        speculation the charge would mislead a per-step choice: waiting does not make the catch-up
        cheaper (the request only grows), it only gives up the draft's tokens meanwhile.
        """
        steady = steady_new_tokens(self.max_k)
        free = [name for name, is_free in zip(self.proposers, self._free()) if is_free]
        matched = [any(r.offered.get(f) for f in free) for r in requests]
        charges: np.ndarray | None = None
        for p, name in enumerate(self.proposers):
            if self.specs[name].free:
                continue
            per_token = self.cost_model.catch_up_ms_per_token(name)
            if per_token <= 0:
                continue
            for i, r in enumerate(requests):
                extra = r.unsent.get(name, 0) - steady
                if matched[i] and extra > 0:
                    steps = max(1.0, (r.max_k + 1) / (1.0 + float(surv[i, p].sum())))
                    if charges is None:
                        charges = np.zeros((len(requests), len(self.proposers)))
                    charges[i, p] = per_token * extra / steps
        return charges

    @abc.abstractmethod
    def _choose(self, surv: np.ndarray, max_k: np.ndarray, cost: StepCost) -> Choice:
        """The plan's search: per-request (SmartSpec) or one k for the whole batch (batch-uniform)."""

    # -- feedback ------------------------------------------------------------------------------------

    def observe(self, outcomes: Sequence[RequestOutcome], record: StepRecord) -> None:
        for outcome in outcomes:
            # A free proposer's whole proposal is scored against what the target committed, whatever the
            # plan kept of it; a proposal asked for after the plan by what the verifier accepted of it.
            shadowed = set()
            for name, proposal in outcome.free_proposals.items():
                if not proposal.tokens or not outcome.committed:
                    continue
                if self._is_tree(name):
                    self.trees.observe(name, proposal.tokens, proposal.parents, outcome.committed)
                else:
                    self.acceptance.observe(outcome.request_id,
                                            Observation.from_shadow(name, proposal.tokens, outcome.committed))
                shadowed.add(name)
            if outcome.proposer is not None and outcome.proposed > 0 and outcome.proposer not in shadowed:
                if self._is_tree(outcome.proposer):
                    self.trees.observe_verified(outcome.proposer, outcome.verified_parents,
                                                outcome.accepted_indices)
                else:
                    self.acceptance.observe(outcome.request_id, Observation.from_verified(
                        outcome.proposer, outcome.proposed, outcome.accepted))
        if self.acceptance.tracked_requests > 2 * len(outcomes) + 16:
            self.acceptance.forget(o.request_id for o in outcomes)
        planned, self._planned = self._planned, None
        if planned is not None:
            self._observe_costs(outcomes, record, planned)

    def _observe_costs(self, outcomes: Sequence[RequestOutcome], record: StepRecord, planned: _PlannedStep) -> None:
        free = dict(zip(self.proposers, self._free()))
        requests: dict[str, int] = {}
        tokens: dict[str, int] = {}
        longest: dict[str, int] = {}  # a draft runs as many passes as its longest chain
        for o in outcomes:
            if o.proposer is not None and o.k > 0 and not free.get(o.proposer, False):
                requests[o.proposer] = requests.get(o.proposer, 0) + 1
                tokens[o.proposer] = tokens.get(o.proposer, 0) + o.k
                longest[o.proposer] = max(longest.get(o.proposer, 0), o.k)
        steady = steady_new_tokens(self.max_k)
        shape = StepShape(
            batch_size=len(outcomes),
            batched_tokens=sum(o.proposed + 1 for o in outcomes),
            context_tokens=sum(planned.context.get(o.request_id, 0) for o in outcomes),
            proposer_requests=requests,
            proposer_tokens=tokens,
            proposer_max_k=longest,
            proposer_caught_up={name: caught_up_tokens(record.propose_new_tokens.get(name, ()), steady)
                                for name in requests},
        )
        # The costly proposers run in parallel: each is charged its own time plus the phase's waiting
        # beyond the slowest one's own time (the RPC), which is what the step waited for it.
        own = {name: record.propose_ms.get(name, 0.0) for name in requests}
        rpc = max(record.propose_wall_ms - max(own.values(), default=0.0), 0.0)
        proposer_ms = {name: ms + rpc for name, ms in own.items() if ms > 0}
        # Steps that also admitted requests carry a Prefill call: not what the model predicts.
        clean = record.admitted == 0
        overhead = record.wall_ms - record.verify_total_ms - record.propose_wall_ms if clean else None
        self.cost_model.observe(shape, verify_ms=record.verify_total_ms, proposer_ms=proposer_ms,
                                overhead_ms=overhead, predicted_ms=planned.predicted_ms if clean else None,
                                measured_ms=record.wall_ms if clean else None)


class SmartSpecPolicy(GoodputPolicy):
    """Per-request proposer and k maximising predicted batch goodput (see the module docstring)."""

    name = "smartspec"

    def __init__(self, proposers: Sequence[str], **options) -> None:
        super().__init__(proposers, **options)
        self.free_proposal_budget = self.max_k
        self.free_tree_budget = self.max_tree_nodes

    def _choose(self, surv: np.ndarray, max_k: np.ndarray, cost: StepCost) -> Choice:
        return choose(surv, max_k, cost)


class BatchUniformPolicy(GoodputPolicy):
    """One k for the whole batch, chosen by predicted goodput; each request's own or the first proposer."""

    name = "batch-uniform"

    def _choose(self, surv: np.ndarray, max_k: np.ndarray, cost: StepCost) -> Choice:
        # A request's proposer: the only one it may use, else the first configured (column order).
        usable = max_k > 0
        proposer = np.where(usable.any(axis=1), np.argmax(usable, axis=1), -1)
        return best_uniform_k(surv, max_k, cost, proposer)

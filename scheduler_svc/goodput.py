"""Goodput maths: expected tokens per step, and the per-request speculation chooser.

goodput(plan) = sum_i E_i(k_i) / T_step(plan)                      (DESIGN.md)
E_i(k)        = 1 + sum_{j<=k} s_ij,  s_ij = P(the first j candidates are accepted)
              = (1 - a^(k+1)) / (1 - a) for iid acceptance a

The step time is linear in what a plan controls (see StepCost): every batched token costs the same,
and a proposer costs a fixed amount when anyone uses it, plus per request and per token it serves.
Then the best plan is found exactly by Dinkelbach's method for ratio objectives: for a trial goodput g,
maximise sum_i [E_i(k_i) - g * cost_i(k_i)], which splits into one small scan per request; set g to
the goodput of that plan and repeat until it stops rising (a few rounds). Proposers with a fixed cost
couple the requests, so each subset of them is tried (there are one or two in practice).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_ROUNDS = 32  # Dinkelbach converges in a handful; this only bounds a pathological loop


def expected_tokens(k: int, a: float) -> float:
    """E[generated | k, a] = (1 - a^(k+1)) / (1 - a): accepted candidates + the bonus token; k = 0 gives 1."""
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def survival(rates: np.ndarray) -> np.ndarray:
    """Per-position conditional acceptance rates [..., K] -> P(first j accepted) for j = 1..K [..., K]."""
    return np.cumprod(np.clip(rates, 0.0, 1.0), axis=-1)


@dataclass(frozen=True)
class StepCost:
    """The linear step-time model a plan is scored with, all in milliseconds.

    T(plan) = base_ms + token_ms * sum_i (k_i + 1)
              + sum_p [p used] * fixed_ms[p] + requests_p * request_ms[p] + tokens_p * proposer_token_ms[p]

    Proposers run in parallel, so the true proposer phase is the slowest of them, not the sum; with one
    costly proposer (the usual ngram + draft) the two agree, and the sum is an upper bound otherwise.
    """

    base_ms: float  # what no plan changes: fixed costs, batch size and context terms, overheads
    token_ms: float  # each batched (new) token in the verifier, including its share of overhead
    fixed_ms: np.ndarray  # [P] per proposer, when it serves anyone this step
    request_ms: np.ndarray  # [P] per request it serves
    proposer_token_ms: np.ndarray  # [P] per candidate token it proposes

    def step_ms(self, ks: np.ndarray, choice: np.ndarray) -> float:
        """Time of a plan: ks [B] candidates per request, choice [B] proposer index (-1 = none)."""
        used = choice >= 0
        t = self.base_ms + self.token_ms * float(np.sum(ks + 1))
        if used.any():
            props = choice[used]
            t += float(self.fixed_ms[np.unique(props)].sum())
            t += float(self.request_ms[props].sum() + (self.proposer_token_ms[props] * ks[used]).sum())
        return t


@dataclass(frozen=True)
class Choice:
    """The chosen plan: per request k and proposer index (-1 = none), with its predicted numbers."""

    ks: np.ndarray  # [B] int
    proposer: np.ndarray  # [B] int, -1 where k = 0
    expected_tokens: float  # sum_i E_i(k_i)
    step_ms: float  # predicted T_step

    @property
    def goodput(self) -> float:
        """Predicted tokens per millisecond."""
        return self.expected_tokens / self.step_ms if self.step_ms > 0 else 0.0


def no_speculation(batch_size: int, cost: StepCost) -> Choice:
    """The plan with k = 0 for everyone."""
    zeros = np.zeros(batch_size, dtype=int)
    return Choice(zeros, zeros - 1, float(batch_size), cost.step_ms(zeros, zeros - 1))


def gains_table(surv: np.ndarray, max_k: np.ndarray) -> np.ndarray:
    """Expected accepted candidates for every (request, proposer, k), -inf where k > max_k.

    surv [B, P, K] survival probabilities; max_k [B, P] -> [B, P, K+1] (k = 0 column is 0).
    """
    b, p, k = surv.shape
    table = np.zeros((b, p, k + 1))
    np.cumsum(surv, axis=-1, out=table[..., 1:])
    table[np.arange(k + 1)[None, None, :] > max_k[..., None]] = -np.inf
    return table


def choose(surv: np.ndarray, max_k: np.ndarray, cost: StepCost) -> Choice:
    """The plan of largest goodput sum_i E_i / T(plan) (exact for the linear StepCost).

    surv [B, P, K]: P(first j of proposer p's candidates accepted) for request i; max_k [B, P]: most
    candidates proposer p may give request i (0: not an option).
    """
    b, n_prop, k_max = surv.shape
    if b == 0 or n_prop == 0 or not (max_k > 0).any():
        return no_speculation(b, cost)
    table = gains_table(surv, np.minimum(max_k, k_max))
    ks_axis = np.arange(k_max + 1, dtype=float)
    # Cost of (p, k) for one request, without the proposers' fixed costs: [P, K+1].
    marginal = ks_axis[None, :] * (cost.token_ms + cost.proposer_token_ms[:, None]) + np.where(
        ks_axis[None, :] > 0, cost.request_ms[:, None], 0.0)
    coupled = [p for p in range(n_prop) if cost.fixed_ms[p] > 0 and np.any(max_k[:, p] > 0)]
    best: Choice | None = None
    for r in range(len(coupled) + 1):
        for excluded in itertools.combinations(coupled, r):
            allowed = table
            if excluded:
                allowed = table.copy()
                allowed[:, list(excluded), 1:] = -np.inf
            charged = float(sum(cost.fixed_ms[p] for p in coupled if p not in excluded))
            choice = _dinkelbach(allowed, marginal, cost, charged)
            if best is None or choice.goodput > best.goodput:
                best = choice
    return best


def _dinkelbach(table: np.ndarray, marginal: np.ndarray, cost: StepCost, charged_ms: float) -> Choice:
    """Best plan when the allowed proposers' fixed costs (charged_ms) are paid whether used or not."""
    b, n_prop, width = table.shape
    base = cost.base_ms + cost.token_ms * b + charged_ms
    flat_table = table.reshape(b, n_prop * width)
    flat_marginal = marginal.reshape(n_prop * width)
    g = b / base  # all k = 0 is always possible, so this is a lower bound of the optimum
    picked = np.zeros(b, dtype=int)  # index into the flattened (proposer, k) axis; 0 is k = 0
    for _ in range(MAX_ROUNDS):
        net = flat_table - g * flat_marginal[None, :]
        new_pick = np.argmax(net, axis=1)  # ties go to the first: k = 0 before any speculation
        rows = np.arange(b)
        expected = b + float(flat_table[rows, new_pick].sum())
        step = base + float(flat_marginal[new_pick].sum())
        g_new = expected / step
        if g_new <= g * (1 + 1e-12):
            if g_new >= g:
                picked = new_pick
            break
        g, picked = g_new, new_pick
    ks = picked % width
    proposer = np.where(ks > 0, picked // width, -1)
    return Choice(ks, proposer, b + float(table[np.arange(b), picked // width, ks].sum()),
                  cost.step_ms(ks, proposer))


def best_uniform_k(surv: np.ndarray, max_k: np.ndarray, cost: StepCost, proposer: np.ndarray) -> Choice:
    """One k for the whole batch (capped per request by max_k), chosen by goodput: the published SmartSpec.

    surv [B, P, K]; max_k [B, P]; proposer [B] the proposer index each request would use (-1: none).
    """
    b, n_prop, k_max = surv.shape
    if b == 0 or n_prop == 0 or not (max_k > 0).any():
        return no_speculation(b, cost)
    rows = np.arange(b)
    has = proposer >= 0
    cap = np.where(has, max_k[rows, np.maximum(proposer, 0)], 0)
    cum = np.cumsum(surv[rows, np.maximum(proposer, 0)], axis=-1)  # [B, K] expected accepted for k = 1..K
    best: Choice | None = None
    for k in range(k_max + 1):
        ks = np.minimum(cap, k)
        choice = np.where(ks > 0, proposer, -1)
        gained = np.where(ks > 0, cum[rows, np.maximum(ks - 1, 0)], 0.0)
        candidate = Choice(ks, choice, b + float(gained.sum()), cost.step_ms(ks, choice))
        if best is None or candidate.goodput > best.goodput * (1 + 1e-12):
            best = candidate
    return best


def plan_goodput(surv: np.ndarray, ks: Sequence[int], proposer: Sequence[int], cost: StepCost) -> float:
    """Predicted goodput of a given plan (tokens per ms); for tests and checks."""
    ks_arr, prop_arr = np.asarray(ks, dtype=int), np.asarray(proposer, dtype=int)
    expected = 0.0
    for i, (k, p) in enumerate(zip(ks_arr, prop_arr)):
        expected += 1.0 + (float(surv[i, p, :k].sum()) if k > 0 else 0.0)
    return expected / cost.step_ms(ks_arr, prop_arr)

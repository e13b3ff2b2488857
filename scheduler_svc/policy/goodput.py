"""Goodput maths: expected tokens per step, and the per-request speculation chooser.

goodput(plan) = sum_i E_i(k_i) / T_step(plan)                      (DESIGN.md)
E_i(k)        = 1 + sum_{j<=k} s_ij,  s_ij = P(the first j candidates are accepted)
              = (1 - a^(k+1)) / (1 - a) for iid acceptance a

The step time (see StepCost) is linear in what a plan controls, but for one coupling term: every
batched token costs the same, and a proposer costs a fixed amount when anyone uses it, plus per
request and per token it serves, plus per *sequential* forward pass -- a batched draft model runs
max_i(k_i) passes over its requests, so its time grows with the longest chain asked of it.

The best plan is found exactly. For a fixed choice of which costly proposers may be used and, for
those with a per-pass cost, a cap m on their chains (k_i <= m, charged as if m passes ran), the step
time is linear and Dinkelbach's method for ratio objectives solves it: for a trial goodput g, maximise
sum_i [E_i(k_i) - g * cost_i(k_i)], which splits into one small scan per request; set g to the goodput
of that plan and repeat until it stops rising (a few rounds). Every (subset, caps) combination is
tried, all at once as one array (there are one or two costly proposers and caps 1..K in practice).
Exactness: a charged time is never below the plan's true time, and the optimal plan is charged its
true time in the combination whose caps are its own longest chains, so the best charged goodput is
the optimum. A batch of one (light load, most steps there) needs none of it: its plan pays its
proposer's coupled costs in full, so every (proposer, k) is scored exactly in one array.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
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
    """The step-time model a plan is scored with, all in milliseconds.

    T(plan) = base_ms + token_ms * sum_i (k_i + 1)
              + sum_p [p used] * (fixed_ms[p] + depth_ms[p] * max_{i served by p} k_i)
                               + requests_p * request_ms[p] + tokens_p * proposer_token_ms[p]

    catch_up_ms [B, P] is what serving request i with proposer p costs on top (a draft that has not read
    the request's prompt yet must run through it first), already spread over the request's steps by the
    caller; None: zeros.

    depth_ms is the cost of one sequential pass of a proposer that builds chains one token per batched
    forward (a draft model): its chains take as many passes as the longest one. Proposers run in
    parallel, so the true proposer phase is the slowest of them, not the sum; with one costly proposer
    (the usual ngram + draft) the two agree, and the sum is an upper bound otherwise.
    """

    base_ms: float  # what no plan changes: fixed costs, batch size and context terms, overheads
    token_ms: float  # each batched (new) token in the verifier, including its share of overhead
    fixed_ms: np.ndarray  # [P] per proposer, when it serves anyone this step
    request_ms: np.ndarray  # [P] per request it serves
    proposer_token_ms: np.ndarray  # [P] per candidate token it proposes
    depth_ms: np.ndarray = field(default=None)  # [P] per unit of its longest chain; None: zeros
    catch_up_ms: np.ndarray | None = None  # [B, P] per request served by a proposer; None: zeros

    def __post_init__(self) -> None:
        if self.depth_ms is None:
            object.__setattr__(self, "depth_ms", np.zeros(len(self.fixed_ms)))

    def catch_up(self, batch_size: int) -> np.ndarray:
        """[B, P] the per-request charges (zeros when there are none)."""
        if self.catch_up_ms is None:
            return np.zeros((batch_size, len(self.fixed_ms)))
        return self.catch_up_ms

    def step_ms(self, ks: np.ndarray, choice: np.ndarray) -> float:
        """Time of a plan: ks [B] candidates per request, choice [B] proposer index (-1 = none)."""
        ks, choice = np.asarray(ks), np.asarray(choice)
        used = (choice >= 0) & (ks > 0)
        t = self.base_ms + self.token_ms * float(np.sum(ks + 1))
        if used.any():
            props, served = choice[used], ks[used]
            t += float(self.request_ms[props].sum() + (self.proposer_token_ms[props] * served).sum())
            if self.catch_up_ms is not None:
                t += float(self.catch_up_ms[np.flatnonzero(used), props].sum())
            longest = np.zeros(len(self.fixed_ms))
            for p in range(len(longest)):  # one or two proposers: cheaper than np.maximum.at
                mine = served[props == p]
                if mine.size:
                    longest[p] = mine.max()
            t += float(self.fixed_ms[longest > 0].sum() + (self.depth_ms * longest).sum())
        return t

    def coupled(self) -> np.ndarray:
        """[P] proposers whose cost is not a sum over requests (a fixed or a per-pass cost)."""
        return (self.fixed_ms > 0) | (self.depth_ms > 0)


@dataclass(frozen=True)
class Choice:
    """The chosen plan: per request k and proposer index (-1 = none), with its predicted numbers."""

    ks: np.ndarray  # [B] int
    proposer: np.ndarray  # [B] int, -1 where k = 0
    expected_tokens: float  # sum_i E_i(k_i)
    step_ms: float  # predicted T_step

    @property
    def goodput(self) -> float:
        """Predicted tokens per millisecond: what the chooser maximises."""
        return self.expected_tokens / self.step_ms if self.step_ms > 0 else 0.0


def _choice(ks: np.ndarray, proposer: np.ndarray, expected: float, cost: StepCost) -> Choice:
    return Choice(ks, proposer, expected, cost.step_ms(ks, proposer))


def no_speculation(batch_size: int, cost: StepCost) -> Choice:
    """The plan with k = 0 for everyone."""
    zeros = np.zeros(batch_size, dtype=int)
    return _choice(zeros, zeros - 1, float(batch_size), cost)


def gains_table(surv: np.ndarray, max_k: np.ndarray) -> np.ndarray:
    """Expected accepted candidates for every (request, proposer, k), -inf where k > max_k.

    surv [B, P, K] survival probabilities; max_k [B, P] -> [B, P, K+1] (k = 0 column is 0).
    """
    b, p, k = surv.shape
    table = np.zeros((b, p, k + 1))
    np.cumsum(surv, axis=-1, out=table[..., 1:])
    table[np.arange(k + 1)[None, None, :] > max_k[..., None]] = -np.inf
    return table


def _cap_options(cost: StepCost, longest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every combination of caps to try: caps [C, P] (0: proposer not used) and their charged ms [C].

    longest [P]: the longest chain any request may get from each proposer. A proposer with no coupled
    cost is never capped below it; one with only a fixed cost is used at its full length or not at all;
    one with a per-pass cost is also tried at every shorter cap (a cap above `longest` cannot matter).
    """
    coupled = cost.coupled() & (longest > 0)
    kinds = tuple("free" if not c else "depth" if d > 0 else "fixed" for c, d in zip(coupled, cost.depth_ms))
    caps = _cap_grid(tuple(longest.tolist()), kinds)
    on = (caps > 0) & coupled[None, :]
    charged = (on * (cost.fixed_ms + cost.depth_ms * caps)).sum(axis=1)
    return caps, charged


@functools.lru_cache(maxsize=256)
def _cap_grid(longest: tuple[int, ...], kinds: tuple[str, ...]) -> np.ndarray:
    """_cap_options' caps [C, P] for these longest chains and kinds of proposer ("free": never capped,
    "depth": every cap up to its longest, "fixed": all or nothing). The same few grids come back step
    after step, so they are built once (read-only)."""
    per_proposer = [[top] if kind == "free" else list(range(top + 1)) if kind == "depth" else [0, top]
                    for top, kind in zip(longest, kinds)]
    caps = np.array(list(itertools.product(*per_proposer)), dtype=int).reshape(-1, len(longest))
    caps.flags.writeable = False
    return caps


def choose(surv: np.ndarray, max_k: np.ndarray, cost: StepCost) -> Choice:
    """The plan of largest goodput sum_i E_i / T(plan), exactly (see the module docstring).

    surv [B, P, K]: P(first j of proposer p's candidates accepted) for request i; max_k [B, P]: most
    candidates proposer p may give request i (0: not an option).
    """
    b, n_prop, k_max = surv.shape
    if b == 0 or n_prop == 0 or not (max_k > 0).any():
        return no_speculation(b, cost)
    max_k = np.minimum(max_k, k_max)
    table = gains_table(surv, max_k)  # [B, P, K+1]
    if b == 1:
        return _choose_alone(table[0], cost)
    width = k_max + 1
    ks_axis = np.arange(width)
    # Cost of (p, k) for each request, without the proposers' coupled costs: [B, P * (K+1)].
    marginal = (ks_axis[None, None, :] * (cost.token_ms + cost.proposer_token_ms[None, :, None]) + np.where(
        ks_axis[None, None, :] > 0, cost.request_ms[None, :, None] + cost.catch_up(b)[:, :, None], 0.0)
    ).reshape(b, -1)
    caps, charged = _cap_options(cost, max_k.max(axis=0))
    # Each combination's table: [C, B, P * (K+1)], -inf beyond its caps.
    beyond = (ks_axis[None, None, :] > caps[:, :, None]).reshape(len(caps), 1, -1)
    tables = np.where(beyond, -np.inf, table.reshape(1, b, -1))
    base = cost.base_ms + cost.token_ms * b + charged  # [C]
    picked = _dinkelbach(tables, marginal, base)  # [C, B]
    expected = b + tables.reshape(-1)[_flat_rows(tables) + picked].sum(axis=1)
    charged_score = expected / (base + marginal[np.arange(b), picked].sum(axis=1))
    best = int(np.argmax(charged_score))  # ties: the first, i.e. the fewest proposers and shortest caps
    ks = picked[best] % width
    proposer = np.where(ks > 0, picked[best] // width, -1)
    return _choice(ks, proposer, float(expected[best]), cost)


def _choose_alone(table: np.ndarray, cost: StepCost) -> Choice:
    """choose() for a batch of one (light load, the common case): every (proposer, k) scored directly.

    table [P, K+1] expected accepted candidates (-inf beyond a proposer's cap). Alone, a request's plan
    pays its proposer's coupled costs in full, so its time is exact without caps or Dinkelbach rounds.
    """
    ks = np.arange(table.shape[1])
    ms = (cost.base_ms + cost.token_ms * (ks[None, :] + 1) + np.where(ks[None, :] > 0, (
        cost.fixed_ms + cost.request_ms + cost.catch_up(1)[0])[:, None]
        + ks[None, :] * (cost.proposer_token_ms + cost.depth_ms)[:, None], 0.0))
    score = (1.0 + table) / ms  # -inf where not allowed
    # Ties go to the first option in (proposer, k) order, k = 0 of proposer 0 first: no speculation.
    best = int(np.argmax(score))
    p, k = divmod(best, table.shape[1])
    return Choice(np.array([k]), np.array([p if k > 0 else -1]), 1.0 + float(table[p, k]), float(ms[p, k]))


def _dinkelbach(tables: np.ndarray, marginal: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per combination c, the plan maximising (B + gains) / (base[c] + costs): [C, B] flat (p, k) picks.

    tables [C, B, W] gains per flat (proposer, k) option (-inf: not allowed); marginal [B, W] each option's
    cost for each request; base [C] the time every plan of combination c pays. Dinkelbach's method: each
    round prices a ms at the current plan's goodput g, every request takes its best option at that price,
    and g becomes the new plan's goodput; g only rises, and its fixed point is the optimum. All
    combinations iterate together until their plans stop changing.
    """
    n_comb, b, _ = tables.shape
    g = b / base  # all k = 0 is always allowed: a lower bound of each optimum
    picked = np.zeros((n_comb, b), dtype=int)  # 0 is k = 0
    requests = np.arange(b)  # with a [C, B] pick, marginal[requests, pick] is each pick's cost [C, B]
    flat, rows = tables.reshape(-1), _flat_rows(tables)  # with a [C, B] pick, flat[rows + pick] is its gain
    active = np.ones(n_comb, dtype=bool)
    for _ in range(MAX_ROUNDS):
        net = tables - g[:, None, None] * marginal[None, :, :]
        new_pick = np.argmax(net, axis=2)  # ties go to the first: k = 0 before any speculation
        expected = b + flat[rows + new_pick].sum(axis=1)
        g_new = expected / (base + marginal[requests, new_pick].sum(axis=1))
        moved = active & np.any(new_pick != picked, axis=1) & (g_new > g * (1 + 1e-12))
        picked[moved] = new_pick[moved]
        g = np.where(moved, g_new, g)
        active = moved
        if not active.any():
            break
    return picked


def _flat_rows(tables: np.ndarray) -> np.ndarray:
    """[C, B] where each (c, b)'s row of tables [C, B, W] starts in tables.reshape(-1): adding a [C, B]
    pick looks the picks up as np.take_along_axis would, without its per-call index building (which
    cost more than the lookup, every round of every step)."""
    n_comb, b, width = tables.shape
    return np.arange(0, n_comb * b * width, width).reshape(n_comb, b)


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
        candidate = _choice(ks, choice, b + float(gained.sum()), cost)
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

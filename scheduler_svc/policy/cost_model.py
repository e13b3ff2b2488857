"""The step-time model the goodput chooser scores plans with, fitted online from measured timings.

    T_verify   = c0 + c1 * batch_size + c2 * batched_tokens + c3 * context_tokens   (verifier's total_ms)
    T_proposer = d0 + d1 * requests + d2 * tokens + d3 * max_k + d4 * caught_up      (per costly proposer)
    T_overhead = o0 + o1 * batch_size + o2 * batched_tokens                          (RPCs, scheduler work)

A batched draft model proposes chains one token per forward pass over its requests, so it runs
max_k = max_i k_i passes (the longest chain asked of it): d3 is the cost of a pass, d1 and d2 what
requests and tokens add on top. The proposer terms need steps (or a profile) with several batch
sizes and chain lengths to be told apart; the ridge pull keeps them sensible meanwhile.

caught_up counts the committed tokens a proposer reads beyond a steady step's (caught_up_tokens): a
draft reads a request's whole prompt the first time it serves it. Under load nearly every step serves
a request the draft has not read yet, so a fit that left such steps out learnt the draft's costs at
large batches from the few steps without one, and mostly from its seed: d4 keeps them in.

Each part is a least-squares fit over a sliding window of recent steps, ridge-regularised towards a
seed (the start-up profile's fit, or defaults) so that directions the recent steps do not pin down
stay where the profile measured them, and kept non-negative so that no cost is predicted to fall when
more work is done. Under load the batch size, the batched tokens and the context tokens all rise
together, so serving steps alone cannot tell a token's cost from a context token's: a weak pull let
the token cost drift to 0 (and speculation look free) while the context term absorbed it. So a seed
that was measured (the profile's, MEASURED_PRIOR_STEPS) pulls much harder than the defaults, which
are a guess (GUESS_PRIOR_STEPS). The fit is also robust (Huber weights, a few reweighted passes): a step
slowed twice over by something else on the machine must not raise every cost it is fitted on.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from scheduler_svc.policy.goodput import StepCost

DEFAULT_WINDOW = 256
# The seed weighs like this many steps' worth of data, in every coefficient's own scale. A measured seed
# (the start-up profile's fit) holds the directions serving steps leave unidentified and still gives way
# to a window that pins a direction down; a guessed seed (the defaults) only breaks ties.
GUESS_PRIOR_STEPS = 0.1
MEASURED_PRIOR_STEPS = 8.0
# Huber threshold in robust standard deviations of the residuals (1.4826 * MAD), and reweighted passes.
HUBER_K = 1.5
ROBUST_PASSES = 5
WARM_PASSES = 2  # a refit after a few more steps, starting from the previous fit
WARM_MAX_PENDING = 16
REFIT_EVERY = 16  # CostModel refits each part once this many of its steps have come in (a refit costs
# about 0.3 ms, a batch-1 step 8-16: refitting every few steps would be a few per cent of every step)
ERROR_EMA_ALPHA = 0.1

# Defaults before any measurement: roughly a small model on a CPU; the start-up profile replaces them.
DEFAULT_VERIFY_SEED = (5.0, 0.5, 0.5, 0.0)  # c0, c1, c2, c3 (ms, ms/request, ms/token, ms/context token)
# d0, d1, d2, d3, d4 (ms, ms/request, ms/token, ms/pass, ms/token caught up on): about the embedded draft on
# two CPU cores, where a pass over the batch costs five times what each token in it adds, and reading a
# prompt token costs a tenth of proposing one.
DEFAULT_PROPOSER_SEED = (0.5, 0.05, 0.2, 1.0, 0.02)
DEFAULT_OVERHEAD_SEED = (1.0, 0.05, 0.0)  # o0, o1, o2


class RidgeFit:
    """y ~ x . w over a sliding window of (x, y), non-negative, ridge-pulled towards `seed`."""

    def __init__(self, seed: Sequence[float], window: int = DEFAULT_WINDOW, prior_steps: float = GUESS_PRIOR_STEPS):
        self.seed = np.asarray(seed, dtype=float)
        self.coef = self.seed.copy()
        self.prior_steps = prior_steps
        self._x: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self._y: collections.deque[float] = collections.deque(maxlen=window)
        self._warm = False  # self.coef is a robust fit of an earlier window
        self._pending = 0  # rows added since that fit

    def __len__(self) -> int:
        return len(self._y)

    def predict(self, x: Sequence[float]) -> float:
        return float(np.dot(self.coef, x))

    def add(self, x: Sequence[float], y: float, refit: bool = True) -> None:
        """Add one measurement; refit unless told not to (then call refit() later)."""
        if not np.isfinite(y):
            return
        self._x.append(np.asarray(x, dtype=float))
        self._y.append(float(y))
        self._pending += 1
        if refit:
            self.refit()

    def refit_if_stale(self, max_pending: int) -> None:
        """Refit once `max_pending` rows have come since the last fit (a fit per step costs more than
        it changes)."""
        if self._pending >= max_pending:
            self.refit()

    def reseed(self, seed: Sequence[float], prior_steps: float | None = None) -> None:
        """Pull towards new coefficients from now on (e.g. the start-up profile's fit), with the weight of
        `prior_steps` steps (None: the weight so far).

        A shorter seed leaves the trailing coefficients at 0 (a seed written before a feature was added).
        """
        given = np.asarray(seed, dtype=float)
        if len(given) > len(self.seed):
            raise ValueError(f"seed has {len(given)} coefficients, the fit {len(self.seed)}")
        self.seed = np.concatenate([given, np.zeros(len(self.seed) - len(given))])
        if prior_steps is not None:
            self.prior_steps = prior_steps
        self._warm = False
        self.refit()

    def refit(self) -> None:
        """Solve min sum_i h_i(x_i w - y_i) + lambda |D (w - seed)|^2 with w >= 0, h the Huber loss.

        Iteratively reweighted least squares: each pass weighs a row by min(1, HUBER_K * scale / |residual|)
        of the previous pass's residuals, scale their median absolute deviation.
        """
        if not self._y:
            self.coef, self._warm = self.seed.copy(), False
            return
        x = np.asarray(self._x)
        y = np.asarray(self._y)
        # Each coefficient's pull is scaled by its feature's size, so the prior weighs like prior_steps rows.
        reg = self.prior_steps * np.maximum(np.mean(x * x, axis=0), 1e-9)
        if self._warm and self._pending <= WARM_MAX_PENDING:  # a few rows moved: start from the last fit
            coef, passes = self.coef, WARM_PASSES
        else:
            coef, passes = self._solve(x, y, np.ones(len(y)), reg), ROBUST_PASSES - 1
        for _ in range(passes):
            residual = np.abs(y - x @ coef)
            scale = 1.4826 * float(np.median(residual))
            if scale <= 1e-9:
                break
            weights = np.minimum(1.0, HUBER_K * scale / np.maximum(residual, 1e-12))
            coef = self._solve(x, y, weights, reg)
        self.coef = coef
        self._warm, self._pending = True, 0

    def _solve(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray, reg: np.ndarray) -> np.ndarray:
        """Weighted ridge towards the seed, non-negative by an active set (zero the negatives, solve again)."""
        free = np.ones(len(self.seed), dtype=bool)
        coef = np.zeros(len(self.seed))
        xw = x * weights[:, None]
        for _ in range(len(self.seed)):
            xf, xwf = x[:, free], xw[:, free]
            a = xwf.T @ xf + np.diag(reg[free])
            b = xwf.T @ y + reg[free] * self.seed[free]
            coef = np.zeros(len(self.seed))
            coef[free] = np.linalg.solve(a, b)
            negative = coef < 0
            if not negative.any():
                break
            free &= ~negative
            coef[negative] = 0.0
        return np.maximum(coef, 0.0)


@dataclass(frozen=True)
class StepShape:
    """What a step looks like to the cost model: the plan's totals."""

    batch_size: int
    batched_tokens: int  # sum over requests of k + 1
    context_tokens: int  # committed tokens of the requests in the batch
    proposer_requests: Mapping[str, int]  # costly proposers: requests each served
    proposer_tokens: Mapping[str, int]  # and candidate tokens asked of each
    # and the longest chain asked of each (its sequential passes); where missing, the mean chain
    proposer_max_k: Mapping[str, int] = field(default_factory=dict)
    # and the committed tokens each read beyond a steady step's (caught_up_tokens); where missing, none
    proposer_caught_up: Mapping[str, int] = field(default_factory=dict)

    def proposer_features(self, name: str) -> tuple[float, float, float, float, float]:
        """(1, requests, tokens, max_k, caught_up) of a costly proposer: what CostModel.proposer(name) is
        fitted on."""
        requests = self.proposer_requests.get(name, 0)
        tokens = self.proposer_tokens.get(name, 0)
        longest = self.proposer_max_k.get(name)
        if longest is None:
            longest = -(-tokens // requests) if requests > 0 else 0
        return (1.0, float(requests), float(tokens), float(longest), float(self.proposer_caught_up.get(name, 0)))


def steady_new_tokens(max_k: int) -> int:
    """Most committed tokens a proposer that serves a request every step is sent at once (its accepted
    candidates + the bonus token)."""
    return max(max_k, 1) + 1


def caught_up_tokens(new_tokens: Iterable[int], steady: int) -> int:
    """Tokens a proposer read beyond a steady step's, over the requests it was sent `new_tokens` for: a
    prompt it sees for the first time, or what a request committed in steps it did not serve."""
    return sum(max(0, n - steady) for n in new_tokens)


class CostModel:
    """Verifier, proposer and overhead fits, and the StepCost view of them for one step's chooser."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self.verify = RidgeFit(DEFAULT_VERIFY_SEED, window)
        self.overhead = RidgeFit(DEFAULT_OVERHEAD_SEED, window)
        self.proposers: dict[str, RidgeFit] = {}
        self.last_predicted_ms: float | None = None
        self.last_measured_ms: float | None = None
        self.last_relative_error: float | None = None  # |predicted - measured| / measured, last step
        self.relative_error_ema: float | None = None
        self.steps_observed = 0

    def proposer(self, name: str) -> RidgeFit:
        fit = self.proposers.get(name)
        if fit is None:
            fit = self.proposers[name] = RidgeFit(DEFAULT_PROPOSER_SEED, self.window)
        return fit

    # -- prediction ----------------------------------------------------------------------------------

    def predict_verify_ms(self, batch_size: int, batched_tokens: int, context_tokens: int) -> float:
        return self.verify.predict((1.0, batch_size, batched_tokens, context_tokens))

    def predict_step_ms(self, shape: StepShape) -> float:
        """Predicted step time (no admission) of a plan with these totals."""
        t = self.predict_verify_ms(shape.batch_size, shape.batched_tokens, shape.context_tokens)
        t += self.overhead.predict((1.0, shape.batch_size, shape.batched_tokens))
        for name, requests in shape.proposer_requests.items():
            if requests > 0:
                t += self.proposer(name).predict(shape.proposer_features(name))
        return t

    def catch_up_ms_per_token(self, name: str) -> float:
        """d4 of a costly proposer: what each token it catches up on costs."""
        return float(self.proposer(name).coef[4])

    def no_speculation_ms(self, batch_size: int, context_tokens: int) -> float:
        """Predicted time of a step in which nobody speculates (one new token per request)."""
        return self.predict_step_ms(StepShape(batch_size, batch_size, context_tokens, {}, {}))

    def step_cost(self, batch_size: int, context_tokens: int, proposers: Sequence[str],
                  free: Sequence[bool], catch_up_ms: np.ndarray | None = None) -> StepCost:
        """The StepCost for a batch of this size and context, proposers in the chooser's order; the
        per-request charges (StepCost.catch_up_ms) as given."""
        c0, c1, c2, c3 = self.verify.coef
        o0, o1, o2 = self.overhead.coef
        fits = [None if is_free else self.proposer(name).coef for name, is_free in zip(proposers, free)]
        return StepCost(
            base_ms=c0 + c1 * batch_size + c3 * context_tokens + o0 + o1 * batch_size,
            token_ms=c2 + o2,
            fixed_ms=np.array([0.0 if f is None else f[0] for f in fits]),
            request_ms=np.array([0.0 if f is None else f[1] for f in fits]),
            proposer_token_ms=np.array([0.0 if f is None else f[2] for f in fits]),
            depth_ms=np.array([0.0 if f is None else f[3] for f in fits]),
            catch_up_ms=catch_up_ms,
        )

    # -- learning ------------------------------------------------------------------------------------

    def observe(self, shape: StepShape, *, verify_ms: float, proposer_ms: Mapping[str, float],
                overhead_ms: float | None, predicted_ms: float | None = None,
                measured_ms: float | None = None) -> None:
        """One step's measurements: the verifier's time, each costly proposer's (as the engine waited for
        it), and the rest (None when the step is not representative, e.g. it also admitted requests)."""
        self.steps_observed += 1
        _learn(self.verify, (1.0, shape.batch_size, shape.batched_tokens, shape.context_tokens), verify_ms)
        for name, ms in proposer_ms.items():
            if shape.proposer_requests.get(name, 0) > 0:
                _learn(self.proposer(name), shape.proposer_features(name), ms)
        if overhead_ms is not None:
            _learn(self.overhead, (1.0, shape.batch_size, shape.batched_tokens), max(overhead_ms, 0.0))
        if predicted_ms is not None and measured_ms is not None and measured_ms > 0:
            self.record_error(predicted_ms, measured_ms)

    def record_error(self, predicted_ms: float, measured_ms: float) -> None:
        """Keep the relative prediction error of a step (for the metrics exporter)."""
        error = abs(predicted_ms - measured_ms) / measured_ms
        self.last_predicted_ms, self.last_measured_ms, self.last_relative_error = predicted_ms, measured_ms, error
        self.relative_error_ema = error if self.relative_error_ema is None else (
            self.relative_error_ema + ERROR_EMA_ALPHA * (error - self.relative_error_ema))


def _learn(fit: RidgeFit, x: Sequence[float], y: float) -> None:
    """One serving step's measurement: kept now, fitted once REFIT_EVERY of them have come in."""
    fit.add(x, y, refit=False)
    fit.refit_if_stale(REFIT_EVERY)

"""Online acceptance-rate estimates: per request, starting from a per-proposer prior learned online.

What is estimated is the conditional acceptance rate a: the chance that a candidate is accepted given
that the ones before it were. A step that proposes n candidates and accepts A of them *tested*
min(A + 1, n) positions (the one after a rejection was never looked at) and accepted A, so
a = accepted / tested is the maximum-likelihood estimate for iid acceptance. (accepted / proposed
would be biased low: with a = 0.5 and n = 5 it reads 0.19.)

Both the proposer's prior and a request's own estimate are exponential moving averages of the
accepted and tested counts (their ratio is the rate). A request's estimate starts at the prior of the
proposer it is served by and moves with its own outcomes. Per proposer, the conditional rate of each
position j (accepted at j given accepted up to j - 1) is tracked as well: it shapes a request's rates
by position (prompt lookup, once it matches, tends to keep matching; a draft tends to drift).

Exploration: a request whose estimate fell (by noise, or in a hard stretch of text) gets k = 0, and
then, served by a costly proposer, gives no evidence that could raise it again. So an estimate drifts
back towards the proposer's prior while steps pass without evidence for it: after n such steps its
counts are regressed to

    accepted <- w * accepted + (1 - w) * prior_rate * tested,   w = (1 - drift)^n,   tested unchanged

i.e. the rate moves from its own value to the prior's, a fraction `drift` of the way per step (a half
life of ln 2 / drift steps), keeping the weight of the evidence. The chooser re-tries the request
once the rate is back where speculation pays, which takes a bounded number of steps when the prior
says it pays; a prior that says it does not keeps the request at k = 0.

The drift reads as a mixture: with probability w the request is as its evidence says, with 1 - w it
changed and is like any other (the prior). A re-try's evidence (evidence after steps without any)
first updates that mixture by Bayes' rule, w' = w L_own / (w L_own + (1 - w) L_prior) with
L_a = a^accepted (1 - a)^(tested - accepted), and the counts are regressed with w' instead of w
before the usual EMA update: a miss where the request's own rate expected one takes the drift back,
a hit where only the prior expected one completes it. A re-try that fails (nothing accepted) also
doubles the request's `patience`, up to MAX_PATIENCE: its drift then runs that many times slower
(n / patience steps in the formula above); one that accepts something resets it to 1. So a request
that keeps failing is re-tried at exponentially spaced steps (it would be every few steps where
little acceptance pays), while one that fell by noise comes back within a half life or two.

The prior itself can fall the same way: a stretch of requests a proposer serves badly pulls it below
where speculation pays, and from then on every new request starts at k = 0 and none brings evidence
that could raise it again (one bad tenant would switch the draft off for good). So while no request
brings evidence for a proposer, its prior drifts the same way towards its ceiling, the highest rate
it has held (the initial rate at first), PRIOR_PATIENCE times slower than a request's estimate and
with a patience of its own: a re-try that fails doubles it, one that accepts something resets it. Its
first re-try's evidence weighs the drift by Bayes' rule as a request's does. A proposer whose requests
keep failing costs a short re-try every few hundred steps at most; one that is good again is back
within a few tens. The position rates keep their shape meanwhile: it is taken against the evidence's
own rate, and a position's shape fades as its observations age (deep positions are reached only
after hits, so a stretch where the proposer was good would otherwise keep promising long chains).

The clock is the policy's plans: it calls advance() once per plan (without those calls nothing
drifts). The drift is applied lazily, when an estimate is read or updated, so a step costs O(1)
whatever the number of requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

# Rates are kept inside (0, 1): a request that missed a few times must still be able to recover when
# the chooser tries it again, and a = 1 would promise unbounded gains.
MIN_RATE = 0.01
MAX_RATE = 0.99
# A position's shape (its rate over the proposer's) is shrunk towards 1 by seen / (seen + this), seen
# its decayed count of observations: a position observed rarely, or long ago, shapes little. (Deep
# positions are reached only after hits: from a stretch where the proposer was good, their rates
# would otherwise linger and promise long chains where the first candidate already fails.)
POSITION_SHRINK = 20.0
# Per observation of the proposer, the counts decay by prior_alpha / this (a memory this many times
# the prior's own): a position reached in a quarter of the steps keeps a count near 20.
POSITION_MEMORY = 4.0
# Fraction of the way from a request's own rate to the prior's covered per step without evidence:
# a half life of about 10 steps, short next to a request's life (tens to hundreds of steps).
DEFAULT_DRIFT = 0.07
# Most a request's drift is slowed by failed re-tries (x2 each): a half life of about 80 steps.
MAX_PATIENCE = 8.0
# A proposer's prior drifts this many times slower than a request's estimate (a half life of about 40
# steps, at most 320 after failed re-tries): every request starts from it, so a prior that rose too
# soon would cost a re-try per request.
PRIOR_PATIENCE = 4.0
MAX_PRIOR_PATIENCE = PRIOR_PATIENCE * MAX_PATIENCE


@dataclass(frozen=True)
class Observation:
    """One step's evidence about a proposer on a request: tested positions and how many were accepted."""

    proposer: str
    tested: int  # candidate positions the verifier looked at (accepted + the first rejected, if any)
    accepted: int

    @staticmethod
    def from_verified(proposer: str, proposed: int, accepted: int) -> "Observation":
        """From a verified chain of `proposed` candidates of which `accepted` were accepted."""
        return Observation(proposer, min(accepted + 1, proposed), accepted)

    @staticmethod
    def from_shadow(proposer: str, candidates: Sequence[int], committed: Sequence[int]) -> "Observation":
        """What a deterministic chain would have scored against the tokens the step committed.

        For a proposer that proposes the same tokens whatever is verified (prompt lookup), comparing
        its full chain with the committed tokens (accepted + bonus) tells how far the verifier would have
        accepted it; only as far as there are committed tokens to compare with, though.
        """
        m = min(len(candidates), len(committed))
        matched = 0
        while matched < m and candidates[matched] == committed[matched]:
            matched += 1
        return Observation(proposer, matched + 1 if matched < m else m, matched)


@dataclass
class _Rate:
    """EMA of accepted and tested counts; the rate is their ratio."""

    accepted: float
    tested: float
    step: int = 0  # the estimator's clock when evidence (or drift) was last folded in
    patience: float = 1.0  # the drift runs this many times slower (doubled by each failed re-try)

    def drifted(self, prior_rate: float, weight: float) -> float:
        """Accepted count after drifting a fraction 1 - weight of the way to the prior's rate."""
        return weight * self.accepted + (1.0 - weight) * prior_rate * self.tested

    def settle(self, target: float, weight: float, observation: Observation, patience: float,
               most_patience: float) -> None:
        """A re-try after steps without evidence, `weight` of the estimate left undrifted: fold the drift
        towards `target` in, weighed by how well each rate explains this evidence (Bayes' rule). A re-try
        that accepted nothing doubles the patience (up to most_patience); one that did resets it."""
        unchanged = weight * _likelihood(self.rate, observation)
        changed = (1.0 - weight) * _likelihood(target, observation)
        self.accepted = self.drifted(target, unchanged / (unchanged + changed))
        self.patience = min(2.0 * self.patience, most_patience) if observation.accepted == 0 else patience

    def update(self, alpha: float, accepted: float, tested: float) -> None:
        self.accepted += alpha * (accepted - self.accepted)
        self.tested += alpha * (tested - self.tested)

    @property
    def rate(self) -> float:
        return min(MAX_RATE, max(MIN_RATE, self.accepted / self.tested)) if self.tested > 0 else MIN_RATE


@dataclass
class _ProposerStats:
    """A proposer's prior over all requests, and its per-position conditional rates."""

    prior: _Rate  # its `step` and `patience` drive the prior's own drift towards `ceiling`
    ceiling: float  # the highest rate the prior has held: where it drifts while no evidence comes
    since_drift: float  # observations since a drift was last folded into the prior's counts
    evidence: _Rate  # the prior's EMA without the drift: the scale of the position rates
    position_accepted: np.ndarray  # [K] EMA of acceptance at position j given j - 1 accepted
    position_seen: np.ndarray  # [K] how often each position was tested (decayed count)
    # [K] position rate / evidence rate, shrunk towards 1; None: to be recomputed from the above (a step
    # observes every request in turn and a plan reads the shape once, so it is computed when read).
    _shape: np.ndarray | None = None

    @property
    def shape(self) -> np.ndarray:
        if self._shape is None:
            # Against the evidence's own rate (both are EMAs of the same observations): the prior's drift
            # moves the level the shape multiplies, not the shape.
            shape = np.clip(self.position_accepted, MIN_RATE, MAX_RATE) / self.evidence.rate
            trust = self.position_seen / (self.position_seen + POSITION_SHRINK)
            self._shape = 1.0 + trust * (shape - 1.0)
        return self._shape


class AcceptanceEstimator:
    """Per-request, per-proposer conditional acceptance rates with learned per-proposer priors.

    alpha: EMA weight of one step in a request's estimate; prior_alpha: in a proposer's prior (smaller:
    the prior averages many requests). initial_rate: the prior before a proposer was ever observed.
    drift: per step without evidence, the fraction of the way a request's rate moves back to the
    prior (see the module docstring; 0 turns it off).
    """

    def __init__(self, max_k: int, *, alpha: float = 0.3, prior_alpha: float = 0.05,
                 initial_rate: float = 0.5, drift: float = DEFAULT_DRIFT) -> None:
        if not 0 < alpha <= 1 or not 0 < prior_alpha <= 1:
            raise ValueError(f"EMA weights must be in (0, 1], got alpha={alpha} prior_alpha={prior_alpha}")
        if not 0 <= drift < 1:
            raise ValueError(f"drift must be in [0, 1), got {drift}")
        self.max_k = max_k
        self.alpha = alpha
        self.prior_alpha = prior_alpha
        self.initial_rate = initial_rate
        self.drift = drift
        self.steps = 0  # the clock: plans so far (advance())
        self._proposers: dict[str, _ProposerStats] = {}
        self._requests: dict[tuple[str, str], _Rate] = {}  # (request id, proposer) -> its estimate

    # -- reading -----------------------------------------------------------------------------------

    def prior(self, proposer: str) -> float:
        """The proposer's conditional acceptance rate over all requests, drifted towards its ceiling for
        the steps in which no request brought evidence for it."""
        stats = self._stats(proposer)
        weight = self._drift_weight(stats.prior)
        if weight >= 1.0:
            return stats.prior.rate
        return _Rate(stats.prior.drifted(stats.ceiling, weight), stats.prior.tested).rate

    def rate(self, request_id: str, proposer: str) -> float:
        """The request's conditional acceptance rate with this proposer (the prior until it has its own),
        drifted towards the prior for the steps without evidence since its last."""
        own = self._requests.get((request_id, proposer))
        if own is None:
            return self.prior(proposer)
        weight = self._drift_weight(own)
        if weight >= 1.0:
            return own.rate
        return _Rate(own.drifted(self.prior(proposer), weight), own.tested).rate

    def position_rates(self, request_ids: Sequence[str], proposer: str) -> np.ndarray:
        """Conditional rates by position for each request [R, K]: its own level, the proposer's shape."""
        stats = self._stats(proposer)
        levels = np.fromiter((self.rate(rid, proposer) for rid in request_ids), float, len(request_ids))
        return np.clip(levels[:, None] * stats.shape[None, :], MIN_RATE, MAX_RATE)

    # -- learning ----------------------------------------------------------------------------------

    def advance(self) -> None:
        """One more step is being planned: the clock of the drift towards the prior. Call once per plan."""
        self.steps += 1

    def observe(self, request_id: str, observation: Observation) -> None:
        """Fold one step's evidence into the request's estimate, the proposer's prior and position rates."""
        if observation.tested <= 0:
            return
        stats = self._stats(observation.proposer)
        self._settle_prior(stats, observation)
        key = (request_id, observation.proposer)
        own = self._requests.get(key)
        if own is None:
            # Start at the prior, weighing like a step that tested max_k positions: one early miss (which
            # tests a single position) must not shut a request out of speculation for good.
            weight = float(max(self.max_k, observation.tested))
            own = self._requests[key] = _Rate(stats.prior.rate * weight, weight, self.steps)
        else:
            weight = self._drift_weight(own)
            if weight < 1.0:  # a re-try after steps without evidence: was the drift right?
                own.settle(stats.prior.rate, weight, observation, 1.0, MAX_PATIENCE)
        own.update(self.alpha, observation.accepted, observation.tested)
        own.step = self.steps
        stats.prior.update(self.prior_alpha, observation.accepted, observation.tested)
        stats.evidence.update(self.prior_alpha, observation.accepted, observation.tested)
        stats.prior.step = self.steps
        stats.since_drift += 1
        if stats.since_drift >= 2.0 / self.prior_alpha:
            # Only a prior that its evidence has made its own (the drift's pull has faded) moves the
            # ceiling: re-tries that happened to hit must not ratchet it up.
            stats.ceiling = max(stats.ceiling, stats.prior.rate)
        # Position j (from 0) was tested, and hit where j < accepted. Element by element: a chain's few
        # positions cost less so than as numpy slices, and the arithmetic is the same.
        accepted_at, seen = stats.position_accepted, stats.position_seen
        seen *= 1.0 - self.prior_alpha / POSITION_MEMORY
        for j in range(min(observation.tested, self.max_k)):
            accepted_at[j] += self.prior_alpha * ((1.0 if j < observation.accepted else 0.0) - accepted_at[j])
            seen[j] += 1.0
        stats._shape = None

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the estimates of requests not in `keep` (finished ones)."""
        keep = set(keep)
        for key in [key for key in self._requests if key[0] not in keep]:
            del self._requests[key]

    def _settle_prior(self, stats: _ProposerStats, observation: Observation) -> None:
        """The first evidence for a proposer after steps without any: fold the prior's drift into its
        counts, and slow the next drift down if this re-try failed (reset it if it did not)."""
        prior = stats.prior
        weight = self._drift_weight(prior)
        if weight < 1.0:  # as a request's re-try, with the prior's own patience
            prior.settle(stats.ceiling, weight, observation, PRIOR_PATIENCE, MAX_PRIOR_PATIENCE)
            stats.since_drift = 0.0
            prior.step = self.steps

    def _drift_weight(self, own: _Rate) -> float:
        """(1 - drift)^(n / patience) for the n steps since own's last evidence that brought none.

        A step's evidence is folded in between its plan's advance() and the next one (at clock s), so
        the next plan reads at s + 1 with n = 0, and each plan after it that brings nothing adds one.
        """
        idle = self.steps - own.step - 1
        return (1.0 - self.drift) ** (idle / own.patience) if idle > 0 and self.drift > 0 else 1.0

    @property
    def tracked_requests(self) -> int:
        return len({rid for rid, _ in self._requests})

    def _stats(self, proposer: str) -> _ProposerStats:
        stats = self._proposers.get(proposer)
        if stats is None:
            stats = self._proposers[proposer] = _ProposerStats(
                prior=_Rate(self.initial_rate, 1.0, self.steps, PRIOR_PATIENCE), ceiling=self.initial_rate,
                since_drift=np.inf, evidence=_Rate(self.initial_rate, 1.0),
                position_accepted=np.full(self.max_k, self.initial_rate), position_seen=np.zeros(self.max_k))
        return stats


def _likelihood(rate: float, observation: Observation) -> float:
    """P(the observation | iid conditional acceptance `rate`): accepted hits, then a miss if one was tested."""
    return rate ** observation.accepted * (1.0 - rate) ** (observation.tested - observation.accepted)

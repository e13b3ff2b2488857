"""Per proposer, how the acceptance model's rates by position compare with what its chains then did.

The rates the chooser scores a chain with (acceptance.py, shaped per request by chain_calibration.py) are
estimates, and two things bias them in a way that matters for k. Requests differ: an estimate that starts
at the proposer's prior and moves with the request's own steps is shrunk towards that prior, so over many
requests it spreads less than the true rates do, and the chance of a long run of hits, a product of rates,
comes out low where it counts most (in-process with the draft at 16 req/s under fixed k = 5, the chance of
all five accepted was predicted 0.30 and came out 0.38). And the chooser picks: a deep position is tried
where its estimate is high, so among the chains that reach it the estimate runs high (under smartspec the
7th candidate's survival was predicted 0.38 and came out 0.16).

Both are measured where they bite: at each position j, over the chains the verifier tested there, the sum
of the rates the chooser was given and the sum of the hits. The rates are scaled by their ratio before the
next plan:

    factor_j = (hits_j + m) / (predicted_j + m)

with sums that decay per chain observed (a memory of about 1 / DECAY chains) and m (PRIOR_HITS) keeping a
position seen rarely near factor 1. What is compared is the model's own rate, before this scaling: the
factor corrects the model and does not chase itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scheduler_svc.policy.acceptance import MAX_RATE, MIN_RATE

# A position's factor stays at 1 until its sums outweigh this many hits predicted and seen alike.
PRIOR_HITS = 20.0
# Per chain of the proposer observed, the sums decay by this fraction: a memory of a few hundred chains,
# tens of steps at a busy batch.
DECAY = 0.005


class RateCalibration:
    """Per proposer, a factor per position on the acceptance model's conditional rates (module docstring)."""

    def __init__(self, max_k: int, *, prior_hits: float = PRIOR_HITS, decay: float = DECAY) -> None:
        if prior_hits <= 0:
            raise ValueError(f"prior_hits must be > 0, got {prior_hits}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.max_k = max_k
        self.prior_hits = prior_hits
        self.decay = decay
        self._predicted: dict[str, np.ndarray] = {}  # proposer -> [K] decayed sum of the model's rates tested
        self._hits: dict[str, np.ndarray] = {}  # proposer -> [K] decayed sum of hits there

    def factors(self, proposer: str) -> np.ndarray:
        """[K] what the model's rate at each position is multiplied by (1 where nothing was observed)."""
        predicted = self._predicted.get(proposer)
        if predicted is None:
            return np.ones(self.max_k)
        return (self._hits[proposer] + self.prior_hits) / (predicted + self.prior_hits)

    def apply(self, proposer: str, rates: np.ndarray) -> np.ndarray:
        """The model's conditional rates [..., K] for this proposer, scaled by its factors."""
        if proposer not in self._predicted:
            return rates
        return np.clip(rates * self.factors(proposer)[: rates.shape[-1]], MIN_RATE, MAX_RATE)

    def observe(self, proposer: str, model_rates: Sequence[float], proposed: int, accepted: int) -> None:
        """A chain of `proposed` candidates, scored with the model's conditional rates `model_rates` (before
        apply), had `accepted` accepted: positions 1..accepted hit, the one after (if proposed) missed."""
        if proposed <= 0:
            return
        predicted = self._predicted.get(proposer)
        if predicted is None:
            predicted = self._predicted[proposer] = np.zeros(self.max_k)
            self._hits[proposer] = np.zeros(self.max_k)
        hits = self._hits[proposer]
        predicted *= 1.0 - self.decay
        hits *= 1.0 - self.decay
        for j in range(min(accepted + 1, proposed, self.max_k, len(model_rates))):
            predicted[j] += float(model_rates[j])
            if j < accepted:
                hits[j] += 1.0

"""Per request, a costly proposer's acceptance by the distance from its last miss, not from the chain's start.

The acceptance model (acceptance.py) takes a request's candidates as accepted at per-position rates, the
position counted from the chain's start, independently from step to step. On repetitive text (code,
lists, a copied span) that misses what decides a step: the draft misses the same token of each repeated
line, so its misses come at a period of the text, and *where chains end* decides how many tokens a step
commits. A chain that stops just before such a token gets it for free (the verifier's bonus token) and
the next chain starts right after it, in step with the text; a chain that stops a token or two earlier
leaves the next one to fail at its first candidate. Replaying the target's greedy text through the draft
on a code prompt: chains of 5 commit 4.4 tokens a step, chains of 4 commit 3.1, and chains alternating 4
and 6 (where the position model, rising after a full chain and falling after a miss, led) 3.2.

What stays put from step to step is the text's distance between misses. So per (request, proposer) this
keeps the *age* of the request's text, the tokens committed since the draft last missed, and the
request's conditional acceptance at each age (a renewal process's survival, as decaying counts of
tokens tested and accepted at that age). A chain starting at age u has its j-th candidate at age u + j,
and its rate there is the request's own at that age, shrunk towards the position model's rate:

    r_j = (accepted[u + j] + m * model_j) / (tested[u + j] + m)

m (PRIOR_TESTS) weighs the position model like that many tokens tested: an age seen rarely keeps the
model's rate. Where misses do not follow the text's period (a draft that misses at random) every age's
rate tends to the request's overall rate, which the position model tracks, and the choice changes little.

What is and is not seen: a rejected candidate is a miss at its age, and the age restarts after it (the
verifier's bonus token replaced it). A chain accepted in full ends with a bonus token the draft was never
asked about, and a step without speculation commits one the same way: those tokens age the text without
telling whether the draft would have missed them (counted neither way). Ages from `ages` on (by default
two longest chains and two more) share one count: a text that has gone that long without a miss.

Counts decay with every chain the request verifies with the proposer (a memory of about 1 / DECAY
chains): text whose pattern changed does not hold the choice for long.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# The position model's rate weighs as much as this many tokens tested at an age.
PRIOR_TESTS = 4.0
# Per verified chain of the request with the proposer, every age's counts decay by this fraction: a memory
# of about twenty steps, short next to a request's life (tens to hundreds of steps).
DECAY = 0.05


@dataclass
class _Record:
    age: int  # tokens committed since the proposer's last observed miss on this request
    tested: np.ndarray  # [ages + 1] decaying count of candidates tested at each age (index 0 unused)
    accepted: np.ndarray  # [ages + 1] of those, accepted


class ChainCalibration:
    """Per (request, proposer), conditional acceptance by age since the last miss (see the module docstring)."""

    def __init__(self, max_k: int, *, ages: int | None = None, prior_tests: float = PRIOR_TESTS,
                 decay: float = DECAY) -> None:
        if prior_tests <= 0:
            raise ValueError(f"prior_tests must be > 0, got {prior_tests}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        # Two chains' worth: a period up to about twice the longest chain is still seen as one.
        self.ages = ages if ages is not None else 2 * max_k + 2
        self.prior_tests = prior_tests
        self.decay = decay
        self._records: dict[tuple[str, str], _Record] = {}

    def rates(self, request_ids: Sequence[str], proposer: str, model: np.ndarray) -> np.ndarray:
        """[R, K] conditional rates of each request's next chain by position: `model` [R, K] (the position
        model's) where the request has no record, its own by age shrunk towards the model's where it has."""
        out = np.array(model, dtype=float, copy=True)
        positions = np.arange(1, out.shape[1] + 1)
        for i, rid in enumerate(request_ids):
            record = self._records.get((rid, proposer))
            if record is not None:
                ages = np.minimum(record.age + positions, self.ages)
                out[i] = (record.accepted[ages] + self.prior_tests * out[i]) / (record.tested[ages] + self.prior_tests)
        return out

    def observe(self, request_id: str, proposer: str, k: int, accepted: int) -> None:
        """A chain of k candidates from `proposer` was verified and `accepted` of them accepted."""
        if k <= 0:
            return
        record = self._records.get((request_id, proposer))
        if record is None:
            record = self._records[(request_id, proposer)] = _Record(0, np.zeros(self.ages + 1),
                                                                     np.zeros(self.ages + 1))
        record.tested *= 1.0 - self.decay
        record.accepted *= 1.0 - self.decay
        # Candidate j (from 1) was tested at age + j, the last ages sharing one count; a handful of
        # scalar adds, cheaper here than np.add.at.
        for j in range(1, min(accepted + 1, k) + 1):
            age = min(record.age + j, self.ages)
            record.tested[age] += 1.0
            if j <= accepted:
                record.accepted[age] += 1.0
        # After a miss the bonus token took the missed one's place: the next candidate is the first after it.
        record.age = 0 if accepted < k else min(record.age + k + 1, self.ages)

    def skip(self, request_id: str, proposer: str, committed: int) -> None:
        """The request committed tokens the proposer was not asked about (a step it did not serve)."""
        record = self._records.get((request_id, proposer))
        if record is not None:
            record.age = min(record.age + committed, self.ages)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the records of requests not in `keep` (finished ones)."""
        keep = set(keep)
        for key in [key for key in self._records if key[0] not in keep]:
            del self._records[key]

    @property
    def tracked(self) -> int:
        return len(self._records)

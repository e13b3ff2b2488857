"""Plain results of the client SDK: what a generation returns, free of protobuf types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

FINISH_LENGTH = "length"  # max_tokens tokens were generated
FINISH_EOS = "eos"  # the model produced its end-of-sequence token (not in the output)
FINISH_STOP = "stop"  # a stop string was produced (not in the output)


def _rate(accepted: int, proposed: int) -> float:
    return accepted / proposed if proposed else 0.0


class ProposerStats(NamedTuple):
    """One proposer's counts over one request; unpacks as (steps, proposed, accepted)."""

    steps: int = 0  # engine steps in which this proposer served the request with k > 0
    proposed: int = 0  # candidate tokens it proposed that were verified
    accepted: int = 0  # of those, tokens the target accepted

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed, 0.0 when nothing was proposed."""
        return _rate(self.accepted, self.proposed)


@dataclass
class GenerationStats:
    """What one request cost and how well speculation worked for it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0  # engine steps the request took part in after its prefill
    proposed: int = 0  # candidate tokens verified for the request, all proposers together
    accepted: int = 0  # of those, tokens accepted
    proposers: dict[str, ProposerStats] = field(default_factory=dict)
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed over all proposers, 0.0 when nothing was proposed."""
        return _rate(self.accepted, self.proposed)


@dataclass
class GenerationChunk:
    """The tokens of one engine step as streamed; the last chunk also carries finish_reason and stats."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "length" | "eos" | "stop" on the last chunk, else None
    stats: GenerationStats | None = None  # on the last chunk only

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    """A whole completion."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop"
    stats: GenerationStats

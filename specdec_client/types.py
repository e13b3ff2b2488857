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


class LogprobCandidate(NamedTuple):
    """A token and its log-probability; unpacks as (token_id, token, logprob)."""

    token_id: int
    token: str  # the token alone, decoded
    logprob: float


@dataclass
class TokenLogprob:
    """The target's log-probability of one generated token (log-softmax of its raw logits, temperature 1,
    no top-k / top-p), and the most likely tokens at its position, most likely first."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[LogprobCandidate] = field(default_factory=list)


@dataclass
class GenerationChunk:
    """The tokens of one engine step as streamed; a completion's last chunk also carries finish_reason and
    stats. With n > 1 the completions' chunks interleave: `index` says whose."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "length" | "eos" | "stop" on the completion's last chunk, else None
    stats: GenerationStats | None = None  # on the completion's last chunk only
    index: int = 0  # which completion (0..n-1)
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for

    @property
    def is_last(self) -> bool:
        """The last chunk of its completion."""
        return self.finish_reason is not None


@dataclass
class Completion:
    """One whole completion."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop"
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for
    index: int = 0


@dataclass
class GenerationResult(Completion):
    """A whole generation: its own fields are completion 0's (the only one when n = 1); `completions`
    holds all n, in index order."""

    completions: list[Completion] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """What the server serves."""

    model: str  # the model's name
    context_length: int  # most tokens one request may hold: prompt + output
    vocab_size: int
    has_chat_template: bool  # whether chat messages can be sent
    max_tokens_limit: int  # largest max_tokens a request may ask for
    eos_token_ids: list[int]  # every id that ends generation
    proposers: list[str]  # proposer names a request may pin

"""Per-request state held by the scheduler: the token-level truth of every request.

The engine owns these objects and mutates them between steps; the gRPC servicer only reads the
request's event queue (and flips `cancelled`). Everything here is plain Python, testable without gRPC.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field

from scheduler_svc.detokenizer import IncrementalDetokenizer
from specdec.contracts import TokenLogprobs
from specdec.model.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationParams:
    """A validated GenerateRequest, in plain Python."""

    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # of the request's sampling; None = the verifier picks one
    stop: tuple[str, ...] = ()
    proposer: str = ""  # "" = the server's choice, "none" = no speculation, else a configured name
    ignore_eos: bool = False
    n: int = 1  # independent completions of the prompt (one engine request each)
    logprobs: bool = False  # report the target's log-probability of every output token
    top_logprobs: int = 0  # with logprobs: the most likely tokens at each position, this many


class FinishReason(enum.Enum):
    """Why a request ended; the values match specdec.v1.FinishReason."""

    LENGTH = 1
    EOS = 2
    STOP = 3


@dataclass
class ProposerCounts:
    """One proposer's counts over one request (see ProposerStats in generation.proto)."""

    steps: int = 0  # steps in which it served the request with k > 0 and answered
    proposed: int = 0  # candidate tokens it proposed that were verified
    accepted: int = 0  # of those, tokens the target accepted


@dataclass
class RequestStats:
    """Counts and times of one request, reported on its last message."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0  # verify steps after the prefill
    proposed: int = 0
    accepted: int = 0
    proposers: dict[str, ProposerCounts] = field(default_factory=dict)
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class StreamChunk:
    """One message to the client: tokens committed in one step (after truncation) and their new text."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None  # set on the last chunk only
    stats: RequestStats | None = None  # set on the last chunk only
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked
    index: int = 0  # which of the call's n completions


@dataclass
class RequestFailed:
    """The engine gave up on a request (not a client error); the servicer turns it into a gRPC status."""

    code: str  # a grpc.StatusCode name, e.g. "UNAVAILABLE"
    message: str
    index: int = 0  # which of the call's n completions failed


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, no verifier slot yet
    RUNNING = "running"  # holds a verifier slot; its pending token is its last committed token
    FINISHED = "finished"  # done, cancelled or failed; released everywhere


@dataclass(eq=False)  # identity semantics: requests are kept in sets and dicts
class Request:
    """One generation request: its committed tokens, limits, stats and the queue its stream reads."""

    params: GenerationParams
    detokenizer: IncrementalDetokenizer
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival_s: float = field(default_factory=time.perf_counter)
    state: RequestState = RequestState.WAITING
    # Every committed token: prompt then output. The last one is the verifier's pending token.
    tokens: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    # StreamChunk | RequestFailed; the n completions of one call share theirs (chunks carry `index`).
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0  # which of its call's n completions this request is
    first_token_s: float | None = None
    finished_s: float | None = None
    # The target's hidden state at the position its pending token was sampled from (float32 bytes),
    # kept only when a proposer reads it (tree heads).
    hidden_state: bytes = b""

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.params.prompt_token_ids)
        self.stats.prompt_tokens = len(self.params.prompt_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.params.prompt_token_ids)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining_tokens(self) -> int:
        """Output tokens still allowed by max_tokens."""
        return self.params.max_tokens - self.num_output

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def proposer_counts(self, name: str) -> ProposerCounts:
        counts = self.stats.proposers.get(name)
        if counts is None:
            counts = self.stats.proposers[name] = ProposerCounts()
        return counts

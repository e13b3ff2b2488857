"""What crosses between the services, as plain dataclasses both sides share: a proposer's candidates, and the
Verifier service's calls and answers. The verifier (verifier_svc/core.py) and the scheduler's client of it
(scheduler_svc/clients/verifier.py) each convert to and from protobuf at their own edge
(proto/specdec/v1/common.proto, verifier.proto); nothing here imports grpc or protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from specdec.model.sampling import SamplingParams


@dataclass(frozen=True)
class Candidates:
    """A proposer's candidate tokens for one request: a tree whose parents come before their children
    (parents[j] = -1: node j follows the last committed token). A chain is the tree (-1, 0, 1, ...): the
    scheduler and the verifier take both alike."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    # Per node, the proposer's distribution over the vocabulary when it sampled its tokens (chains only); empty:
    # they are deterministic (the verifier then accepts by matching, else by rejection sampling).
    distributions: tuple[Sequence[float], ...] = ()

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> Candidates:
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def fit(self, max_nodes: int, max_depth: int) -> Candidates:
        """The first max_nodes nodes, without those deeper than max_depth (a root is at depth 1). Parents
        precede children, so what remains is a tree; parent indices are renumbered."""
        cut = self if len(self) <= max_nodes else Candidates(
            self.tokens[:max_nodes], self.parents[:max_nodes], self.distributions[:max_nodes])
        if len(cut) <= max_depth:
            return cut  # no node can be deeper than the node count
        depth: list[int] = []
        for p in cut.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        keep = [j for j, d in enumerate(depth) if d <= max_depth]
        new_index = {old: new for new, old in enumerate(keep)}
        return Candidates(tuple(cut.tokens[j] for j in keep),
                          tuple(new_index[cut.parents[j]] if cut.parents[j] >= 0 else -1 for j in keep),
                          tuple(cut.distributions[j] for j in keep) if cut.distributions else ())


@dataclass(frozen=True)
class TokenLogprobs:
    """The target's raw log-probability of one emitted token, and the most likely tokens at its position as
    (token id, logprob) pairs, most likely first (see specdec.model.sampling.raw_logprobs)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Timing:
    """Time the verifier spent on one call."""

    forward_ms: float = 0.0  # model forward incl. logits (device-synchronised)
    total_ms: float = 0.0  # the whole call
    batched_tokens: int = 0  # new tokens through the model
    context_tokens: int = 0  # cached tokens attended over, all requests together
    batch_size: int = 0


@dataclass(frozen=True)
class VerifierInfo:
    """The served model and the verifier's capacity."""

    model: str  # checkpoint folder of the target model
    device: str
    dtype: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # every id that ends generation
    max_seq_len: int
    max_slots: int
    free_slots: int
    max_batch_size: int
    active_request_ids: tuple[str, ...]
    hidden_size: int


@dataclass(frozen=True)
class PrefillItem:
    """Admit a request: its committed tokens, how it samples, and whether it wants log-probabilities."""

    request_id: str
    token_ids: Sequence[int]  # every committed token of the request
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: the verifier picks one
    logprobs: bool = False  # report TokenLogprobs of every token the request emits, until Release
    top_logprobs: int = 0  # with logprobs: this many most likely tokens at each emitted position


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    next_token_id: int  # the new pending token
    hidden_state: bytes = b""  # float32 little-endian [hidden_size] at the last prompt token, when asked
    logprobs: TokenLogprobs | None = None  # of next_token_id, when the item asked


@dataclass(frozen=True)
class VerifyItem:
    """One request's step: candidates following its pending token (None: a plain decode step)."""

    request_id: str
    candidates: Candidates | None = None


@dataclass(frozen=True)
class VerifyResult:
    """What a step committed for one request."""

    request_id: str
    accepted_token_ids: tuple[int, ...]  # a root path of the candidates, in order
    bonus_token_id: int  # sampled after the accepted path; the new pending token
    accepted_indices: tuple[int, ...] = ()  # their node indices in the candidates (the path in a tree)
    hidden_state: bytes = b""  # float32 little-endian [hidden_size] at the last kept node, when asked
    logprobs: tuple[TokenLogprobs, ...] = ()  # accepted then bonus, when the request asked at Prefill

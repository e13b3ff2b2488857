"""Target-side sampling: filtered distributions and position-seeded random draws.

A request's random stream is keyed by (seed, position, stream), where position is the index the token
will have in the request's full sequence. A draw therefore does not depend on how many tokens were
speculated or how requests were batched, so a seeded request gives the same tokens with or without
speculation (for deterministic proposals). `stream` separates the several draws one rule may make at
one position (rejection sampling needs an acceptance test and a residual draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STREAM_TARGET = 0  # the draw from the target distribution (plain sampling, deterministic-candidate rule, bonus)
STREAM_ACCEPT = 1  # rejection sampling: the uniform of the accept test
STREAM_RESIDUAL = 2  # rejection sampling: the draw from norm(max(p - q, 0)) after a rejection

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How a request samples. temperature 0 = greedy; top_k 0 = no limit; top_p 1 = no nucleus cut."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The sampling distribution of each row of `logits`.

    logits: [n, V]. Returns probs [n, V] float32 on the same device, each row summing to 1.
    temperature 0 gives the one-hot argmax (top_p and top_k are then irrelevant). Otherwise
    softmax(logits / temperature), keeping the top_k most likely tokens (0 = all), then the smallest
    set of most likely tokens whose mass reaches top_p, renormalised after each cut.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    # Shift by the row maximum before dividing: the same softmax, but a tiny temperature sends the other
    # logits to -inf instead of overflowing them all to +inf (inf - inf is NaN), so any finite temperature
    # > 0 gives a distribution; as temperature -> 0 it tends to the greedy one-hot.
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < vocab:
        # Exactly top_k survivors even with ties: keep the indices topk returns, not a threshold.
        keep = torch.zeros_like(scaled, dtype=torch.bool).scatter_(-1, scaled.topk(top_k, dim=-1).indices, True)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # A token survives while the more likely ones have not yet reached top_p (the first always does).
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


MAX_TOP_LOGPROBS = 20  # most alternatives a request may ask for at each position (OpenAI's limit)


def raw_logprobs(
    logits: torch.Tensor, token_ids: list[int], top: int = 0
) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """Log-probabilities of `token_ids` under the raw logits: log-softmax at temperature 1, no top-k / top-p.

    logits: [n, V], row i the position token_ids[i] was emitted at. Returns (logprob of each token,
    the `top` most likely ids at each row, their logprobs), most likely first; one device sync.
    These are the model's own probabilities, not the request's sampling distribution (vLLM's default
    "raw logprobs"): a greedy request still learns how sure the model was.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = logp.gather(-1, torch.tensor(token_ids, device=logp.device).unsqueeze(-1)).squeeze(-1)  # [n]
    if top > 0:
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)  # [n, top]
        return chosen.tolist(), indices.tolist(), values.tolist()
    return chosen.tolist(), [[] for _ in token_ids], [[] for _ in token_ids]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_generator(seed: int, position: int, stream: int = STREAM_TARGET) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, position, stream).

    The three are mixed through splitmix64 so that neighbouring seeds or positions give unrelated
    streams (seeding Mersenne Twister with seed + position directly would correlate them).
    """
    key = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) ^ (stream & _MASK64))
    gen = torch.Generator(device="cpu")
    gen.manual_seed(key)
    return gen


def uniform(gen: torch.Generator) -> float:
    """One draw from U[0, 1)."""
    return torch.rand(1, generator=gen, dtype=torch.float64).item()


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    """Draw one token id from `probs` [V] (any device, need not be normalised) by inverse CDF.

    One uniform per draw, so the token depends only on the generator and the distribution.
    """
    cdf = probs.detach().to("cpu", torch.float64).cumsum(0)
    u = uniform(gen) * cdf[-1].item()
    index = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True).item())
    if index >= cdf.numel():  # u rounded up to the total: take the last token with mass
        index = int(torch.nonzero(probs.detach().cpu() > 0)[-1].item())
    return index

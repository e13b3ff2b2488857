"""Prompt lookup (n-gram) proposer: continue the text the way it went after the last n tokens' previous occurrence.

As vLLM's ngram proposer and transformers' prompt_lookup: for n from max_n down to min_n, find the
most recent earlier occurrence of the request's last n tokens and propose the (up to k) tokens that
followed it. Per request an index maps every n-gram to the position just after its most recent
occurrence that has a continuation; it is updated as tokens arrive, so a step costs
O(new tokens * n range + k), never O(context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proposer_svc.base import Proposer, ProposalRequest


@dataclass
class NgramState:
    """Committed tokens of one request and its n-gram index."""

    tokens: list[int] = field(default_factory=list)
    # n-gram (a tuple of n tokens, min_n <= n <= max_n) -> position of the token that followed its
    # most recent occurrence. Tuples of different n never collide, so one dict serves all n.
    index: dict[tuple[int, ...], int] = field(default_factory=dict)


class NgramProposer(Proposer):
    kind = "ngram"
    free = True  # a suffix lookup: microseconds per request

    def __init__(self, *, min_n: int = 1, max_n: int = 4, max_budget: int = 8, vocab_size: int | None = None):
        super().__init__(max_budget=max_budget, vocab_size=vocab_size)
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n} max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self._states: dict[str, NgramState] = {}

    def describe(self) -> str:
        return f"{super().describe()} min_n={self.min_n} max_n={self.max_n}"

    def active_request_ids(self) -> list[str]:
        return list(self._states)

    def _drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _propose(self, items: list[ProposalRequest]) -> list[list[int]]:
        out = []
        for item in items:
            state = self._states.get(item.request_id)
            if state is None or item.reset:
                state = self._states[item.request_id] = NgramState()
            self.extend(state, item.new_token_ids)
            out.append(self.lookup(state, item.budget))
        return out

    # -- the algorithm, on one request's state ---------------------------------------------------

    def extend(self, state: NgramState, new_tokens) -> None:
        """Append committed tokens, indexing each n-gram that thereby gains a continuation."""
        tokens, index = state.tokens, state.index
        lo, hi = self.min_n, self.max_n
        for token in new_tokens:
            end = len(tokens)  # the n-grams ending just before `token` now have it as continuation
            for n in range(lo, min(hi, end) + 1):
                index[tuple(tokens[end - n : end])] = end
            tokens.append(int(token))

    def lookup(self, state: NgramState, k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest matching suffix."""
        if k <= 0:
            return []
        tokens, length = state.tokens, len(state.tokens)
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            # The suffix's own occurrence has no continuation yet, so it is not in the index: a hit is earlier.
            follow = state.index.get(tuple(tokens[length - n :]))
            if follow is not None:
                return tokens[follow : follow + k]
        return []


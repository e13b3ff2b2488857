"""Draft-model proposer: a small model greedily continues each request, batched across requests.

Each request owns one KV slot of a `ModelRunner`. Per request we keep the committed tokens and the
tokens the slot caches. A step first rolls the cache back to its longest common prefix with the
committed tokens: the draft's own earlier proposals that the target accepted are already cached
and are kept, only the rejected tail is dropped. Then, batched over all requests:

- forward 1 (ragged): each request's uncached committed tokens; for requests that want candidates
  this includes the last committed token, and its logits give the first candidate; requests with
  budget 0 just catch up (all but the last token, which is fed with the next candidates);
- forward 2..k: one token per request still decoding (the candidate just chosen).

Candidates are the draft's argmax (deterministic: no draft_distributions). The slot holds at most
`max_seq_len` tokens, so near the end fewer candidates are proposed; with no free slot a request
gets none (and a warning) until one frees up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from proposer_svc.base import Proposer, ProposalRequest
from specdec.model.runner import ModelRunner, SeqInput

log = logging.getLogger(__name__)


@dataclass
class DraftState:
    """One request: its committed tokens and what its KV slot caches (committed prefix + own candidates)."""

    committed: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    slot: int | None = None  # None while every slot is taken
    # cached[:known] are committed tokens (fed as such): they never need comparing again, which keeps
    # the rollback O(new tokens) rather than O(context).
    known: int = 0
    warned_no_slot: bool = False


@dataclass
class _Work:
    """One request's part of this step's batched forwards."""

    index: int  # position among the step's items
    state: DraftState
    k: int  # candidates to produce (0: catch up only)
    feed: list[int]  # tokens for forward 1
    candidates: list[int] = field(default_factory=list)


class DraftProposer(Proposer):
    kind = "draft"

    def __init__(self, runner: ModelRunner, *, max_budget: int = 8, model_name: str = "") -> None:
        super().__init__(max_budget=max_budget, vocab_size=runner.vocab_size)
        self.runner = runner
        self.model_name = model_name
        self._states: dict[str, DraftState] = {}

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_slots: int = 64,
        max_seq_len: int | None = 1024,
        max_budget: int = 8,
        numpy_chains: bool = True,
    ) -> "DraftProposer":
        """Load the draft model from a local checkpoint folder into a fresh runner, whose forwards run in NumPy on
        CPU in float32 unless numpy_chains is False (specdec/model/numpy_forward.py: a small model's torch forward is
        mostly operator overhead)."""
        runner = ModelRunner(checkpoint, device=device, dtype=dtype, max_slots=max_slots, max_seq_len=max_seq_len,
                             numpy_chains=numpy_chains)
        return cls(runner, max_budget=max_budget, model_name=str(checkpoint))

    def describe(self) -> str:
        r = self.runner
        dtype = str(r.dtype).removeprefix("torch.")
        return (f"{super().describe()} model={self.model_name} device={r.device} dtype={dtype}"
                f" max_slots={r.max_slots} max_seq_len={r.max_seq_len} forward={'numpy' if r.runs_numpy else 'torch'}")

    def active_request_ids(self) -> list[str]:
        return list(self._states)

    def _drop(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None and state.slot is not None:
            self.runner.release(state.slot)

    # -- a step ----------------------------------------------------------------------------------

    def _propose(self, items: list[ProposalRequest]) -> list[list[int]]:
        work = [w for i, item in enumerate(items) if (w := self._prepare(i, item)) is not None]
        # Forward 1: catch-up chunks, ending with the last committed token where candidates are wanted.
        decoding = [w for w in work if w.k > 0]
        if work:
            firsts = self._forward(work, [w.feed for w in work])
            for w in work:
                w.state.known = len(w.state.cached) if firsts is not None else 0
            for w, token in zip(work, firsts or ()):
                if w.k > 0:
                    w.candidates.append(token)
            if firsts is None:
                decoding = []
        # Forward 2..k: one token each for the requests still decoding.
        while decoding := [w for w in decoding if len(w.candidates) < w.k]:
            nexts = self._forward(decoding, [[w.candidates[-1]] for w in decoding])
            if nexts is None:
                break
            for w, token in zip(decoding, nexts):
                w.candidates.append(token)
        out: list[list[int]] = [[] for _ in items]
        for w in work:
            out[w.index] = w.candidates
        return out

    def _prepare(self, index: int, item: ProposalRequest) -> _Work | None:
        """Update the request's committed tokens, roll its cache back, and plan its forward-1 chunk."""
        state = self._states.get(item.request_id)
        if state is None or item.reset:
            self._drop(item.request_id)
            state = self._states[item.request_id] = DraftState()
        state.committed.extend(int(t) for t in item.new_token_ids)
        if state.slot is None and not self._allocate(item.request_id, state):
            return None
        n = len(state.committed)
        if n == 0:
            return None
        max_len = self.runner.max_seq_len
        # After decoding k candidates the slot holds the n committed tokens + the first k-1 candidates.
        k = max(0, min(item.budget, max_len - n + 1))
        target = n if k > 0 else n - 1  # committed tokens cached after forward 1
        # Keep the cached prefix that agrees with the committed tokens, but never the last committed
        # token: forward 1 needs its logits (feeding it again is the only way to get them).
        keep = _common_prefix(state.cached, state.committed, start=state.known, limit=min(n - 1, max_len))
        state.known = keep
        if keep < len(state.cached):
            self.runner.truncate(state.slot, keep)
            del state.cached[keep:]
        if target > max_len or target <= keep:
            return None
        return _Work(index, state, k, state.committed[keep:target])

    def _allocate(self, request_id: str, state: DraftState) -> bool:
        if self.runner.free_slots == 0:
            if not state.warned_no_slot:
                log.warning("draft proposer: all %d KV slots are in use; request %r gets no candidates until one "
                            "frees up (raise --max-slots)", self.runner.max_slots, request_id)
                state.warned_no_slot = True
            return False
        state.slot = self.runner.allocate()
        return True

    def _forward(self, work: list[_Work], feeds: list[list[int]]) -> list[int] | None:
        """One batched forward; returns each request's argmax after its last fed token.

        On failure every involved cache is emptied (it may be half written) and None is returned, so the
        step still answers (those requests get what they had so far) and the next step rebuilds them.
        """
        batch = [SeqInput(w.state.slot, feed) for w, feed in zip(work, feeds)]
        start = time.perf_counter()
        try:
            tokens = self.runner.next_tokens(batch)  # a list: the device has finished, so the time below is real
        except Exception:
            log.exception("draft proposer: forward over %d requests failed; their caches are rebuilt", len(batch))
            for w in work:
                self.runner.truncate(w.state.slot, 0)
                w.state.cached.clear()
                w.state.known = 0
                w.k = len(w.candidates)
            return None
        finally:
            self.forward_ms += (time.perf_counter() - start) * 1000.0
        for w, feed in zip(work, feeds):
            w.state.cached.extend(feed)
        return tokens


def _common_prefix(a: list[int], b: list[int], *, start: int, limit: int) -> int:
    """Length of the longest common prefix of a and b (at most `limit`), given that a[:start] == b[:start]."""
    n = min(len(a), len(b), limit)
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i

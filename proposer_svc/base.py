"""The proposer contract: what the scheduler asks for each step, what a proposer answers.

Plain dataclasses and one small ABC, free of gRPC (the servicer in server.py translates). A concrete
proposer keeps per-request state built from committed tokens and implements three hooks: `_propose`
(bring valid items up to date and propose), `_drop` (forget one request) and `active_request_ids`.
Validation of items (vocab, budget, duplicates) lives here, once, so every proposer treats malformed
input the same way: that item gets an empty proposal and a warning, the rest of the batch proceeds.
A proposer answers chains (a list of tokens: parent_indices -1, 0, 1, ...) or trees (a Proposal with
its own parent indices, e.g. the Medusa heads' candidate trees).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

log = logging.getLogger(__name__)


@dataclass
class ProposalRequest:
    """One request's part of a step (mirrors specdec.v1.ProposeItem).

    new_token_ids: committed tokens not sent before (the prompt and first token on first sight).
    reset: drop any state and rebuild from new_token_ids, which then hold every committed token.
    budget: most candidate nodes wanted (k for a chain); 0 only brings the state up to date.
    hidden_state: the target's final hidden state at the last committed token (float32 LE bytes),
        for proposers that work on it; None or empty when not sent.
    """

    request_id: str
    new_token_ids: Sequence[int] = ()
    reset: bool = False
    budget: int = 0
    hidden_state: bytes | None = None


@dataclass
class Proposal:
    """Candidates for one request: a tree as tokens + parent indices (-1 = follows the last committed token)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    parent_indices: list[int] = field(default_factory=list)

    @classmethod
    def chain(cls, request_id: str, token_ids: Sequence[int]) -> "Proposal":
        """A chain: parent_indices -1, 0, 1, ..., k-2."""
        tokens = [int(t) for t in token_ids]
        return cls(request_id, tokens, list(range(-1, len(tokens) - 1)))


class Proposer(ABC):
    """Per-request state + `step`: bring every item's state up to date, then propose for those with budget > 0.

    Subclasses set `kind`, `max_budget`, `vocab_size` (None when unknown) and implement `_propose`,
    `_drop` and `active_request_ids`.
    """

    kind: str = "base"
    # Capabilities the scheduler reads from Info: proposing costs next to nothing (so it may propose for
    # everyone before the plan), and it answers trees (its budget counts nodes).
    free: bool = False
    tree: bool = False
    # Size of the target hidden state the proposer reads from each item (0: it reads none).
    hidden_size: int = 0

    def __init__(self, *, max_budget: int, vocab_size: int | None = None) -> None:
        if max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {max_budget}")
        self.max_budget = max_budget
        self.vocab_size = vocab_size
        self.forward_ms = 0.0  # model forward time of the last step (0 for model-free proposers)

    # -- the contract ---------------------------------------------------------------------------

    def step(self, items: Sequence[ProposalRequest]) -> list[Proposal]:
        """One engine step: one Proposal per item with budget > 0, in item order (the proto's contract).

        Every valid item's state is first brought up to date with its new tokens (an unknown request
        id counts as a reset). Budgets above `max_budget` are capped. An invalid item gets an empty
        proposal (when its budget is > 0) and a warning, and the rest of the batch proceeds:
        - negative budget: a warning, and its tokens are still applied as with budget 0; it gets no
          Candidates entry, since the proto promises exactly one per item with budget > 0 and the
          scheduler counts on that;
        - bad token ids, or a request id twice in one step: the request's state is dropped, since
          skipping those tokens would leave a hole in its context; the next item for it rebuilds
          from what it brings (the scheduler can always resend everything with reset=true).
        """
        self.forward_ms = 0.0
        counts = Counter(item.request_id for item in items)
        work: list[ProposalRequest] = []
        work_of: dict[int, int] = {}  # item index -> index in work, for valid items only
        for i, item in enumerate(items):
            problem, keep_tokens = self._problem(item, counts)
            if problem is None:
                work_of[i] = len(work)
                work.append(item if item.budget <= self.max_budget else _with_budget(item, self.max_budget))
                continue
            log.warning("%s proposer: request %r gets no candidates: %s", self.kind, item.request_id, problem)
            if keep_tokens:
                work.append(_with_budget(item, 0))
            else:
                self._drop(item.request_id)

        proposed = self._propose(work) if work else []
        out: list[Proposal] = []
        for i, item in enumerate(items):
            if i not in work_of:
                if item.budget > 0:  # an invalid item that asked for candidates gets an empty answer
                    out.append(Proposal(item.request_id))
            elif item.budget > 0:
                answer = proposed[work_of[i]]
                out.append(answer if isinstance(answer, Proposal) else Proposal.chain(item.request_id, answer))
        return out

    def release(self, request_ids: Iterable[str]) -> None:
        """Drop the state of finished or cancelled requests (unknown ids are ignored)."""
        for request_id in request_ids:
            self._drop(request_id)

    @abstractmethod
    def active_request_ids(self) -> list[str]:
        """Requests this proposer holds state for."""

    def describe(self) -> str:
        """Human-readable configuration, for Info and the start-up log."""
        return f"kind={self.kind} max_budget={self.max_budget} vocab_size={self.vocab_size}"

    # -- hooks ----------------------------------------------------------------------------------

    @abstractmethod
    def _propose(self, items: list[ProposalRequest]) -> list[list[int] | Proposal]:
        """Bring each item (unique ids, 0 <= budget <= max_budget) up to date; return one answer per item:
        a chain (list of tokens) or a tree (Proposal, parents before children).

        The answer for an item with budget 0 is empty; any answer may hold fewer nodes than its budget.
        """

    @abstractmethod
    def _drop(self, request_id: str) -> None:
        """Forget one request's state, freeing what it holds; unknown ids are ignored."""

    # -- validation -----------------------------------------------------------------------------

    def _problem(self, item: ProposalRequest, counts: Counter) -> tuple[str | None, bool]:
        """(what is wrong with the item or None, whether its tokens may still be applied)."""
        if not item.request_id:
            return "empty request_id", False
        if counts[item.request_id] > 1:
            return f"request id appears {counts[item.request_id]} times in one step", False
        vocab = self.vocab_size
        for t in item.new_token_ids:
            if t < 0 or (vocab is not None and t >= vocab):
                limit = f"[0, {vocab})" if vocab is not None else "the non-negative ids"
                return f"token id {t} outside the vocabulary {limit}", False
        if item.budget < 0:
            return f"negative budget {item.budget}", True
        return None, True


def _with_budget(item: ProposalRequest, budget: int) -> ProposalRequest:
    return ProposalRequest(item.request_id, item.new_token_ids, item.reset, budget, item.hidden_state)

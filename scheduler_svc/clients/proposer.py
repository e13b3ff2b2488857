"""One bidi Propose stream per proposer service, and the checks that keep a bad proposer harmless.

Per step the engine hands each proposer the requests it serves (every committed token and a budget);
this client sends only the tokens the proposer has not seen, awaits the answer with a timeout, and
checks it. Any failure (stream error, timeout, wrong step_id, too many or malformed candidates,
tokens outside the vocabulary) costs only speculation: the step's candidates are empty, the stream is
dropped, the proposer is left out for a short backoff, and every request is sent again from scratch
(reset=true) on the next stream. Output never depends on a proposer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc
import numpy as np
from opentelemetry import trace

from scheduler_svc.clients.verifier import CHANNEL_OPTIONS  # its reconnect backoff too: a proposer is back in 1 s
from scheduler_svc.types import Candidates, ProposerSpec
from specdec.pb import common_pb2, proposer_pb2, proposer_pb2_grpc
from specdec.rpc.security import ClientTLS, aio_channel
from specdec.telemetry.tracing import inject_context, tracer

log = logging.getLogger(__name__)


class ProposerFault(Exception):
    """A proposer step that failed or answered garbage."""


@dataclass(frozen=True)
class ProposeWork:
    """One request's part of a proposer step."""

    request_id: str
    tokens: Sequence[int]  # every committed token of the request; only the unsent tail goes out
    budget: int  # most candidate nodes wanted (> 0)
    hidden_state: bytes = b""  # the target's hidden state for proposers that read it (tree heads)


@dataclass
class ProposeResult:
    """What one proposer step gave: validated candidates by request id, and the proposer's timings."""

    candidates: dict[str, Candidates] = field(default_factory=dict)
    propose_ms: float = 0.0
    forward_ms: float = 0.0
    ok: bool = True  # False: skipped (backoff) or failed; candidates are then empty
    # Committed tokens each item brought, in the order of the work (a request seen for the first time
    # brings its whole prompt, which a draft model must run through before it can propose: not what a
    # step usually costs).
    new_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProposerInfo:
    kind: str
    config: str
    max_budget: int
    active_request_ids: tuple[str, ...]
    hidden_size: int = 0  # size of the target hidden state it reads (0: none)
    free: bool = False  # proposing costs next to nothing (types.ProposerSpec)
    tree: bool = False  # it answers trees



class ProposerClient:
    """The scheduler's side of one proposer service's Propose stream (opened lazily)."""

    def __init__(
        self, name: str, address: str, *, vocab_size: int = 0, timeout_s: float = 5.0, backoff_s: float = 1.0,
        tls: ClientTLS | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.vocab_size = vocab_size  # 0 = unknown (no token range check); set once the verifier is known
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_budget = 1 << 30  # from Info; until then no cap
        self.kind = ""  # from Info (ngram, draft, ...); "" until known
        self.hidden_size = 0  # from Info: > 0 when it reads the target's hidden state (tree heads)
        self.free = False  # from Info: proposing costs next to nothing
        self.tree = False  # from Info: it answers trees
        self._channel = aio_channel(address, tls, options=CHANNEL_OPTIONS)
        self._stub = proposer_pb2_grpc.ProposerStub(self._channel)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._step_id = 0
        self._sent: dict[str, int] = {}  # request id -> committed tokens the current stream has seen
        self._maybe_held: set[str] = set()  # ids the proposer may hold state for (across streams)
        self._to_release: set[str] = set()  # finished ids to name in the next step's release list
        self._retry_at = 0.0  # perf_counter time before which the proposer is left out after a fault
        self.faults = 0  # failed steps so far (for logs and tests)

    async def close(self) -> None:
        self._drop_stream()
        await self._channel.close()

    async def info(self, timeout_s: float = 5.0) -> ProposerInfo:
        msg = await self._stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=timeout_s)
        if msg.max_budget > 0:
            self.max_budget = msg.max_budget
        self.kind = msg.kind
        self.hidden_size = msg.hidden_size
        self.free, self.tree = msg.free, msg.tree
        return ProposerInfo(msg.kind, msg.config, msg.max_budget, tuple(msg.active_request_ids), msg.hidden_size,
                            msg.free, msg.tree)

    @property
    def spec(self) -> ProposerSpec:
        """What the policy may know of this proposer (from its Info)."""
        return ProposerSpec(self.kind, self.max_budget, free=self.free, tree=self.tree)

    # -- bookkeeping between steps -----------------------------------------------------------------

    def available(self) -> bool:
        """False while the proposer sits out the backoff after a fault."""
        return time.perf_counter() >= self._retry_at

    @property
    def has_releases(self) -> bool:
        return bool(self._to_release)

    def forget(self, request_id: str) -> None:
        """The request ended: tell the proposer to drop it on the next step (if it may hold state)."""
        self._sent.pop(request_id, None)
        if request_id in self._maybe_held:
            self._maybe_held.discard(request_id)
            self._to_release.add(request_id)

    def release_leftovers(self, request_ids: Sequence[str]) -> None:
        """Requests the proposer holds for nobody (an earlier scheduler's): drop them with the next step."""
        self._to_release.update(request_ids)

    def unsent(self, request_id: str, committed: int) -> int:
        """Committed tokens of a request this proposer has not been sent yet (all of them at first)."""
        return committed - self._sent.get(request_id, 0)

    def resync(self) -> None:
        """Send every request from scratch (reset=true) next time, keeping the stream."""
        self._sent.clear()

    # -- one step ------------------------------------------------------------------------------------

    async def step(self, work: Sequence[ProposeWork]) -> ProposeResult:
        """Send one ProposeRequest (work items + pending releases) and return its checked candidates.

        Never raises for a proposer fault: the result is then empty with ok=False. Inside a trace (an
        engine step) it is a CLIENT span whose context travels in the message to the proposer's span.
        """
        if not self.available():
            return ProposeResult(ok=False)
        if not trace.get_current_span().get_span_context().is_valid:
            return await self._step(work)
        with tracer().start_as_current_span(f"Propose {self.name}", kind=trace.SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": "specdec.v1.Proposer", "rpc.method": "Propose",
            "specdec.proposer": self.name, "specdec.requests": len(work),
            "specdec.budget": sum(w.budget for w in work),
        }) as span:
            result = await self._step(work)
            span.set_attributes({"specdec.ok": result.ok,
                                 "specdec.proposed_tokens": sum(len(c) for c in result.candidates.values()),
                                 "specdec.propose_ms": result.propose_ms, "specdec.forward_ms": result.forward_ms})
            if not result.ok:
                span.set_status(trace.Status(trace.StatusCode.ERROR, "the proposer failed or was left out"))
            return result

    async def _step(self, work: Sequence[ProposeWork]) -> ProposeResult:
        self._step_id += 1
        releases = sorted(self._to_release)
        request = proposer_pb2.ProposeRequest(step_id=self._step_id, release_request_ids=releases,
                                              trace_context=inject_context())
        for w in work:
            sent = self._sent.get(w.request_id, 0)
            request.items.add(request_id=w.request_id, new_token_ids=w.tokens[sent:], reset=sent == 0,
                              budget=w.budget, hidden_state=w.hidden_state)
            self._maybe_held.add(w.request_id)  # before the answer: a failed step may still have built state
        try:
            response = await asyncio.wait_for(self._exchange(request), self.timeout_s)
            candidates = self._check(request, response)
        except asyncio.CancelledError:
            self._drop_stream()  # the engine is stopping; the stream's state is unknown
            raise
        except Exception as exc:  # any failure at all (also e.g. writing to a stream that just ended)
            self.fault(_describe(exc))
            return ProposeResult(ok=False)
        for w in work:
            self._sent[w.request_id] = len(w.tokens)
        self._to_release.difference_update(releases)
        return ProposeResult(candidates, response.propose_ms, response.forward_ms,
                             new_tokens=tuple(len(item.new_token_ids) for item in request.items))

    async def _exchange(self, request: proposer_pb2.ProposeRequest) -> proposer_pb2.ProposeResponse:
        if self._call is None:
            self._call = self._stub.Propose()
        await self._call.write(request)
        response = await self._call.read()
        if response is grpc.aio.EOF:
            raise ProposerFault("the proposer closed its stream")
        return response

    def _check(
        self, request: proposer_pb2.ProposeRequest, response: proposer_pb2.ProposeResponse
    ) -> dict[str, Candidates]:
        """Validate the answer against what was asked; raises ProposerFault on any mismatch."""
        if response.step_id != request.step_id:
            raise ProposerFault(f"answered step_id {response.step_id} to step {request.step_id}")
        asked = [item for item in request.items if item.budget > 0]
        if len(response.candidates) != len(asked):
            raise ProposerFault(f"{len(response.candidates)} candidate sets for {len(asked)} items")
        out = {}
        for item, cand in zip(asked, response.candidates):
            # An empty request_id is taken to mean "this item's" (the order already says which).
            if cand.request_id and cand.request_id != item.request_id:
                raise ProposerFault(f"candidates for {cand.request_id!r} where {item.request_id!r} was asked")
            check_candidates(cand, item.budget, self.vocab_size)
            if cand.token_ids:
                out[item.request_id] = candidates_from_pb(cand)
        return out

    def fault(self, reason: str) -> None:
        """Drop the stream, forget what it was sent, and leave the proposer out for the backoff."""
        self.faults += 1
        log.warning(
            "proposer %s (%s): %s; its candidates are dropped this step and it sits out %.1fs",
            self.name, self.address, reason, self.backoff_s,
        )
        self._drop_stream()
        self._sent.clear()
        self._retry_at = time.perf_counter() + self.backoff_s

    def _drop_stream(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


def candidates_from_pb(cand: common_pb2.Candidates) -> Candidates:
    distributions = tuple(np.asarray(d.probs, dtype=np.float32) for d in cand.draft_distributions)
    return Candidates(tuple(cand.token_ids), tuple(cand.parent_indices), distributions)


def check_candidates(cand: common_pb2.Candidates, budget: int, vocab_size: int) -> None:
    """Raise ProposerFault unless `cand` is a well-formed tree of at most `budget` nodes.

    vocab_size 0 skips the token range check.
    """
    n = len(cand.token_ids)
    if n > budget:
        raise ProposerFault(f"{n} candidates for a budget of {budget}")
    if len(cand.parent_indices) != n:
        raise ProposerFault(f"{len(cand.parent_indices)} parent indices for {n} candidate tokens")
    chain = True
    for j, parent in enumerate(cand.parent_indices):
        if not -1 <= parent < j:
            raise ProposerFault(f"parent index {parent} of node {j} is out of range -1..{j - 1}")
        chain = chain and parent == j - 1
    if vocab_size:
        for token in cand.token_ids:
            if not 0 <= token < vocab_size:
                raise ProposerFault(f"candidate token {token} is outside the vocabulary [0, {vocab_size})")
    if cand.draft_distributions:
        if not chain:
            raise ProposerFault("draft distributions come with a tree; only chains may carry them")
        if len(cand.draft_distributions) != n:
            raise ProposerFault(f"{len(cand.draft_distributions)} draft distributions for {n} candidates")
        for j, dist in enumerate(cand.draft_distributions):
            # Like the verifier: a draft vocabulary may be shorter than the target's (padded with 0).
            probs = np.asarray(dist.probs, dtype=np.float64)
            if not 0 < probs.size <= (vocab_size or probs.size):
                raise ProposerFault(f"draft distribution {j} has {probs.size} probabilities for a vocabulary "
                                    f"of {vocab_size}")
            if not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
                raise ProposerFault(f"draft distribution {j} is not finite, non-negative and non-zero")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer within the timeout"
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"stream error {exc.code().name}: {exc.details()}"
    if isinstance(exc, ProposerFault):
        return f"garbage answer: {exc}"
    return f"stream failure: {type(exc).__name__}: {exc}"

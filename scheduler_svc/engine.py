"""The engine: one asyncio task that runs the step loop over all requests (continuous batching).

One step (DESIGN.md "One step of the engine"):
1. admit waiting requests into free verifier slots and Prefill them in one batch (first token out);
2. the policy plans a proposer and k per running request (capped by context room and max_tokens);
   free proposers (prompt lookup) may propose before it, for everyone, and are truncated to the plan;
3. every other proposer used gets one ProposeRequest, all in parallel;
4. one Verify call for all running requests (k = 0 ones bring no candidates);
5. commit accepted + bonus tokens, apply EOS / stop strings / max_tokens, stream, release the finished;
6. record the step's timings (StepRecord) and feed them, with the outcomes, to the policy.

The engine holds the token truth of every request: when the verifier fails a call its state is
unknown, so the running requests are released there and prefilled again from their committed tokens
(re-prefill), and the proposers rebuild theirs (reset=true). No accepted token is lost.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from scheduler_svc.clients.proposer import ProposeResult, ProposerClient, ProposeWork
from scheduler_svc.clients.verifier import VerifierClient, VerifierError
from scheduler_svc.policy.base import Policy
from scheduler_svc.request import FinishReason, Request, RequestFailed, RequestState, StreamChunk
from scheduler_svc.telemetry import SchedulerTelemetry
from scheduler_svc.types import NO_SPECULATION, Candidates, RequestOutcome, RequestView, StepRecord
from specdec.contracts import PrefillItem, Timing, TokenLogprobs, VerifyItem, VerifyResult

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.05


class QueueFull(Exception):
    """The waiting queue is full; the caller should answer RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class ModelLimits:
    """What the verifier serves, from its Info."""

    vocab_size: int
    eos_token_ids: frozenset[int]  # every id that ends generation (unless the request ignores EOS)
    max_seq_len: int  # most tokens one request may hold
    max_slots: int
    max_batch_size: int


class Engine:
    """Runs requests through prefill and speculative steps; see the module docstring."""

    def __init__(
        self,
        *,
        verifier: VerifierClient,
        proposers: Mapping[str, ProposerClient],
        policy: Policy,
        limits: ModelLimits,
        max_waiting: int = 256,
        step_record_limit: int = 10_000,
        backoff_max_s: float = 2.0,
        telemetry: SchedulerTelemetry | None = None,
    ) -> None:
        self.verifier = verifier
        self.proposers = dict(proposers)
        self.policy = policy
        policy.bind_proposers({name: p.spec for name, p in self.proposers.items()})
        self.limits = limits
        self.max_waiting = max_waiting
        self.backoff_max_s = backoff_max_s
        self.telemetry = telemetry or SchedulerTelemetry()
        # Requests in one Verify call are the running ones, so the verifier's batch size caps them too.
        self.capacity = max(1, min(limits.max_slots, limits.max_batch_size))
        self.step_records: collections.deque[StepRecord] = collections.deque(maxlen=step_record_limit)
        # Tree heads read the target's hidden state: the verifier returns it only when someone needs it.
        self.wants_hidden = any(p.hidden_size > 0 for p in self.proposers.values())
        self.steps = 0
        self.verifier_failures = 0
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[str, Request] = {}
        self._cancelled: list[Request] = []
        self._release_in_verifier: list[str] = []  # finished ids the verifier still holds
        self._needs_reprefill = False
        self._isolate_verify = False  # the next Verify goes one call per request (after a failed batch)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- API for the servicer ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        """Stop the loop; every unfinished request gets UNAVAILABLE."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for request in [*self._waiting, *self._running.values()]:
            self._fail(request, "UNAVAILABLE", "the scheduler is shutting down")
        self._waiting.clear()
        await self._flush_releases()

    async def _flush_releases(self, timeout_s: float = 2.0) -> None:
        """Best effort at shutdown: send the releases the loop had not sent yet (a request that finished
        just before the stop), so that a stopped scheduler leaves no state in the verifier or proposers."""
        async def send() -> None:
            if self._release_in_verifier:
                await self.verifier.release(list(self._release_in_verifier))
                self._release_in_verifier.clear()
            if any(p.has_releases for p in self.proposers.values()):
                await self._propose({})

        try:
            await asyncio.wait_for(send(), timeout_s)
        except Exception as exc:  # the services may be gone already; nothing more to do at shutdown
            log.warning("could not release every request's state at shutdown: %s", exc)

    def submit(self, *requests: Request) -> None:
        """Queue validated requests (the n completions of one call: all or none); raises QueueFull when too
        many are already waiting."""
        # Requests the next step can admit do not count as queued.
        if len(self._waiting) + len(requests) > self.max_waiting + self._free_slots():
            raise QueueFull(
                f"the server is full: {len(self._waiting)} requests are waiting for a slot "
                f"(limit {self.max_waiting}); retry later"
            )
        for request in requests:
            self._waiting.append(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request and free its state everywhere. No-op once finished."""
        if request.is_finished or request.cancelled:
            return
        request.cancelled = True
        if request.state is RequestState.WAITING and request in self._waiting:
            self._waiting.remove(request)
            self._finish(request, None)
        else:
            # Running, or in the middle of its admission: the loop finishes it between steps.
            self._cancelled.append(request)
            self._wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- the loop ------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        backoff = 0.0
        while True:
            if not self._has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._traced_iterate()
                backoff = 0.0
            except VerifierError as exc:
                self.verifier_failures += 1
                backoff = min(max(2 * backoff, MIN_BACKOFF_S), self.backoff_max_s)
                if exc.is_unavailable:
                    # Go on the moment the verifier is back (its channel reconnects within a second of it
                    # listening), not after a blind sleep; the short pause keeps a flapping one from spinning.
                    log.warning("%s; waiting for the verifier (requests are kept)", exc)
                    await asyncio.sleep(MIN_BACKOFF_S)
                    await self.verifier.wait_ready(self.backoff_max_s)
                else:
                    log.warning("%s; retrying in %.2fs (requests are kept)", exc, backoff)
                    await asyncio.sleep(backoff)
            except Exception:
                # A bug must not kill the loop silently: fail what is running and go on with the rest.
                log.exception("engine step failed; failing the running requests")
                for request in list(self._running.values()):
                    self._fail(request, "INTERNAL", "the scheduler failed on this request's step; see its log")
                await asyncio.sleep(MIN_BACKOFF_S)

    def _has_work(self) -> bool:
        return bool(
            self._waiting
            or self._running
            or self._cancelled
            or self._release_in_verifier
            or any(p.has_releases and p.available() for p in self.proposers.values())
        )

    async def _traced_iterate(self) -> None:
        """_iterate inside the step's span, so that the calls it makes are the step's children."""
        served = [*self._running.values(), *list(self._waiting)[: max(0, self._free_slots())]]
        with self.telemetry.step_span(served):
            await self._iterate()

    async def _iterate(self) -> None:
        for request in self._cancelled:
            if not request.is_finished:
                self._finish(request, None)
        self._cancelled.clear()
        if self._release_in_verifier:
            ids = list(self._release_in_verifier)
            await self.verifier.release(ids)
            del self._release_in_verifier[: len(ids)]
        if self._needs_reprefill:
            await self._reprefill()
        record = StepRecord(step_id=self.steps + 1, start_s=time.perf_counter())
        await self._admit(record)
        if self._running:
            self.steps += 1
            outcomes = await self._step(record)
            record.wall_ms = (time.perf_counter() - record.start_s) * 1e3
            self.step_records.append(record)
            self.telemetry.observe_step(record, outcomes, self.policy)
            try:
                self.policy.observe(outcomes, record)
            except Exception:  # a fault in the policy's learning costs it one step's lesson, nobody's output
                log.exception("the policy failed to learn from step %d", record.step_id)
        elif any(p.has_releases for p in self.proposers.values()):
            await self._propose({})  # nothing runs: send the release lists on their own

    def _free_slots(self) -> int:
        return self.capacity - len(self._running) - len(self._release_in_verifier)

    # -- 1. admission ----------------------------------------------------------------------------------

    async def _admit(self, record: StepRecord) -> None:
        batch: list[Request] = []
        free = self._free_slots()
        while self._waiting and len(batch) < free:
            request = self._waiting.popleft()
            if request.cancelled:
                self._finish(request, None)
            else:
                batch.append(request)
        if not batch:
            return
        try:
            batch, first, timing, hidden, logprobs = await self._prefill(batch)
        except VerifierError:
            # Some of them may hold state now: release before they are tried again.
            self._release_in_verifier.extend(r.request_id for r in batch)
            self._waiting.extendleft(reversed(batch))
            raise
        record.admitted = len(batch)
        record.prefill_forward_ms, record.prefill_total_ms = timing.forward_ms, timing.total_ms
        now = time.perf_counter()
        for request in batch:
            request.state = RequestState.RUNNING
            self._running[request.request_id] = request
            request.first_token_s = now
            request.stats.time_to_first_token_ms = (now - request.arrival_s) * 1e3
            self.telemetry.request_admitted(request, record.start_s)
            request.hidden_state = hidden.get(request.request_id, b"")
            record.committed += 1
            self._commit(request, [first[request.request_id]], _one(logprobs.get(request.request_id)))

    async def _prefill(
        self, requests: list[Request]
    ) -> tuple[list[Request], dict[str, int], Timing, dict[str, bytes], dict[str, TokenLogprobs]]:
        """Prefill `requests` in one call. When it fails in a way one request's own input may cause, prefill
        them one call each, so that only a request whose own call fails is failed (alone, with the
        verifier's message) and the others go on. Returns the requests now held, their first tokens, the
        timing, hidden states and first tokens' logprobs; a transient failure is raised (the caller keeps
        the requests)."""
        def items(batch: Sequence[Request]) -> list[PrefillItem]:
            return [PrefillItem(r.request_id, r.tokens, r.params.sampling, r.params.seed, r.params.logprobs,
                                r.params.top_logprobs)
                    for r in batch]

        try:
            first, timing, hidden, logprobs = await self.verifier.prefill(items(requests), self.wants_hidden)
            return requests, first, timing, hidden, logprobs
        except VerifierError as exc:
            if not exc.may_be_input:
                raise
            if len(requests) == 1:
                self._fail_on_verifier(requests[0], exc)
                return [], {}, Timing(), {}, {}
            log.warning("a Prefill of %d requests failed (%s); prefilling them one at a time", len(requests), exc)
        # A failed call leaves nothing behind in the verifier (it rolls back), but make sure before retrying.
        await self.verifier.release([r.request_id for r in requests])
        held: list[Request] = []
        first, hidden, logprobs = {}, {}, {}
        forward_ms = total_ms = 0.0
        for request in requests:
            try:
                one, timing, state, lp = await self.verifier.prefill(items([request]), self.wants_hidden)
            except VerifierError as exc:
                if not exc.may_be_input:
                    raise
                self._fail_on_verifier(request, exc)
                continue
            held.append(request)
            first.update(one)
            hidden.update(state)
            logprobs.update(lp)
            forward_ms, total_ms = forward_ms + timing.forward_ms, total_ms + timing.total_ms
        return held, first, Timing(forward_ms, total_ms), hidden, logprobs

    def _fail_on_verifier(self, request: Request, exc: VerifierError) -> None:
        """Fail a request whose own call failed in the verifier; the others are not touched."""
        log.warning("request %s failed in the verifier: %s", request.request_id, exc)
        self._fail(request, exc.request_status, f"the verifier could not serve this request: {exc.details}")

    async def _reprefill(self) -> None:
        """Rebuild every running request in the verifier from its committed tokens."""
        running = list(self._running.values())
        first: dict[str, int] = {}
        hidden: dict[str, bytes] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        if running:
            await self.verifier.release([r.request_id for r in running])
            running, first, _, hidden, logprobs = await self._prefill(running)
            log.warning("re-prefilled %d running requests in the verifier from their committed tokens", len(running))
        for proposer in self.proposers.values():
            proposer.resync()
        self._needs_reprefill = False
        for request in running:
            request.hidden_state = hidden.get(request.request_id, b"")
            self._commit(request, [first[request.request_id]], _one(logprobs.get(request.request_id)))

    # -- 2.-5. one speculative step ------------------------------------------------------------------

    async def _step(self, record: StepRecord) -> list[RequestOutcome]:
        """Plan, propose, verify and commit for every running request; fills `record`."""
        running = list(self._running.values())
        offered = await self._free_proposals(running, record)
        t0 = time.perf_counter()
        plans = self.policy.plan([self._view(r, offered) for r in running])
        record.plan_ms = (time.perf_counter() - t0) * 1e3
        record.predicted_step_ms = self.policy.predicted_step_ms
        work: dict[str, list[ProposeWork]] = collections.defaultdict(list)
        planned: dict[str, tuple[str, int]] = {}  # request id -> (proposer, k) after the caps
        candidates: dict[str, Candidates] = {}
        for request in running:
            plan = plans.get(request.request_id, NO_SPECULATION)
            proposer = self.proposers.get(plan.proposer) if plan.proposer else None
            if plan.proposer in offered:
                # Proposed already: keep the planned prefix (no call).
                cand = offered[plan.proposer].get(request.request_id)
                if cand is not None:
                    cand = cand.fit(min(plan.k, self._node_room(request)), self._room(request))
                if cand:
                    candidates[request.request_id] = cand
                    planned[request.request_id] = (plan.proposer, len(cand))
                continue
            if proposer is None or not proposer.available():
                continue
            k = min(plan.k, self._node_room(request) if proposer.tree else self._room(request),
                    proposer.max_budget)
            if k > 0:
                work[proposer.name].append(self._work(request, proposer, k))
                planned[request.request_id] = (proposer.name, k)

        t0 = time.perf_counter()
        results = await self._propose(work)
        record.propose_wall_ms = (time.perf_counter() - t0) * 1e3
        answered = {name for name, result in results.items() if result.ok} | set(offered)
        for name, result in results.items():
            record.propose_ms[name], record.propose_forward_ms[name] = result.propose_ms, result.forward_ms
            record.propose_new_tokens[name] = result.new_tokens
            for rid, cand in result.candidates.items():
                # A tree may be deeper than max_tokens can use; chains were asked for no more than that.
                cand = cand.fit(len(cand), self._room(self._running[rid]))
                if cand:
                    candidates[rid] = cand

        items = [VerifyItem(r.request_id, candidates.get(r.request_id)) for r in running]
        try:
            if self._isolate_verify:
                running, items, outputs, timing = await self._verify_each(running, items)
            else:
                outputs, timing = await self.verifier.verify(items, self.wants_hidden)
        except VerifierError as exc:
            # The verifier's state is unknown now: rebuild it from the committed tokens.
            self._needs_reprefill = True
            if exc.may_be_input:
                # The candidates or one request's own input: leave out every proposer that sent some, and
                # verify the requests one call each next time to find whose input it is.
                self._isolate_verify = True
                for name in {planned[rid][0] for rid in candidates}:
                    self.proposers[name].fault(f"the verifier failed on a batch with its candidates ({exc})")
            raise
        self._isolate_verify = False
        record.batch_size = len(items)
        record.verify_forward_ms, record.verify_total_ms = timing.forward_ms, timing.total_ms
        record.verify_batched_tokens, record.verify_context_tokens = timing.batched_tokens, timing.context_tokens

        proposed = [len(i.candidates) if i.candidates is not None else 0 for i in items]
        for item, n in zip(items, proposed):  # check all before committing any
            accepted = len(outputs[item.request_id].accepted_token_ids)
            if accepted > n:
                self._needs_reprefill = True
                raise VerifierError(f"verifier accepted {accepted} of {n} candidates for {item.request_id}")

        outcomes = []
        for request, n in zip(running, proposed):
            out = outputs[request.request_id]
            accepted = len(out.accepted_token_ids)
            name, k = planned.get(request.request_id, (None, 0))
            self._count(request, name if name in answered else None, n, accepted)
            verified = candidates.get(request.request_id)
            outcomes.append(RequestOutcome(
                request.request_id, name, k, n, accepted,
                committed=(*out.accepted_token_ids, out.bonus_token_id),
                free_proposals={name: c[request.request_id] for name, c in offered.items() if request.request_id in c},
                verified_parents=verified.parents if verified is not None else (),
                accepted_indices=out.accepted_indices,
            ))
            record.proposed += n
            record.accepted += accepted
            record.committed += accepted + 1
            request.hidden_state = out.hidden_state
            self._commit(request, [*out.accepted_token_ids, out.bonus_token_id], out.logprobs)
        return outcomes

    async def _verify_each(
        self, running: list[Request], items: list[VerifyItem]
    ) -> tuple[list[Request], list[VerifyItem], dict[str, VerifyResult], Timing]:
        """The step's Verify as one call per request, after a batch failed for a reason that may be one
        request's input: a request whose own call fails is failed alone. Returns the requests and items
        that were verified, their outputs and the summed timing."""
        kept: list[tuple[Request, VerifyItem]] = []
        outputs: dict[str, VerifyResult] = {}
        forward_ms = total_ms = 0.0
        batched = context = 0
        for request, item in zip(running, items):
            try:
                out, timing = await self.verifier.verify([item], self.wants_hidden)
            except VerifierError as exc:
                if not exc.may_be_input:
                    raise
                self._fail_on_verifier(request, exc)
                continue
            kept.append((request, item))
            outputs.update(out)
            forward_ms, total_ms = forward_ms + timing.forward_ms, total_ms + timing.total_ms
            batched, context = batched + timing.batched_tokens, context + timing.context_tokens
        timing = Timing(forward_ms, total_ms, batched, context, len(kept))
        return [r for r, _ in kept], [i for _, i in kept], outputs, timing

    async def _propose(self, work: Mapping[str, Sequence[ProposeWork]]) -> dict[str, ProposeResult]:
        """One step on every proposer with work or pending releases, all in parallel."""
        names = [n for n, p in self.proposers.items() if work.get(n) or (p.has_releases and p.available())]
        results = await asyncio.gather(*(self.proposers[n].step(work.get(n, ())) for n in names))
        return dict(zip(names, results))

    async def _free_proposals(
        self, running: Sequence[Request], record: StepRecord
    ) -> dict[str, dict[str, Candidates]]:
        """Before the plan, when the policy asks: every free proposer proposes its full budget for each
        request it may serve. Returns proposer name -> request id -> candidates (answered proposers only)."""
        chain_budget, tree_budget = self.policy.free_proposal_budget, self.policy.free_tree_budget
        work: dict[str, list[ProposeWork]] = collections.defaultdict(list)
        for name, proposer in self.proposers.items():
            if not proposer.free or not proposer.available():
                continue
            tree = proposer.tree
            for request in running:
                room = self._node_room(request) if tree else self._room(request)
                k = min(tree_budget if tree else chain_budget, room, proposer.max_budget)
                if request.params.proposer in ("", name) and k > 0:
                    work[name].append(self._work(request, proposer, k))
        if not work:
            return {}
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self.proposers[name].step(items)
                                         for name, items in work.items()))
        record.free_propose_wall_ms = (time.perf_counter() - t0) * 1e3
        offered = {}
        for name, result in zip(work, results):
            record.propose_ms[name], record.propose_forward_ms[name] = result.propose_ms, result.forward_ms
            if result.ok:
                offered[name] = result.candidates
        return offered

    def _view(
        self, request: Request, offered: Mapping[str, Mapping[str, Candidates]] | None = None
    ) -> RequestView:
        rid, offered = request.request_id, offered or {}
        return RequestView(
            request_id=rid,
            proposer=request.params.proposer,
            context_len=len(request.tokens),
            max_k=self._room(request),
            proposed=request.stats.proposed,
            accepted=request.stats.accepted,
            offered={name: c[rid].parents if rid in c else () for name, c in offered.items()},
            max_nodes=self._node_room(request),
            unsent={name: p.unsent(rid, len(request.tokens)) for name, p in self.proposers.items()
                    if not p.free},
        )

    def _work(self, request: Request, proposer: ProposerClient, budget: int) -> ProposeWork:
        hidden = request.hidden_state if proposer.hidden_size else b""
        return ProposeWork(request.request_id, request.tokens, budget, hidden)

    def _room(self, request: Request) -> int:
        """Most candidates worth verifying in a chain (the depth of a tree): within the context, and no
        more than max_tokens can use."""
        return max(0, min(self._node_room(request), request.remaining_tokens - 1))

    def _node_room(self, request: Request) -> int:
        """Most candidate nodes the request's context has room for (the verifier caches every node)."""
        return max(0, self.limits.max_seq_len - len(request.tokens) - 1)

    @staticmethod
    def _count(request: Request, proposer: str | None, proposed: int, accepted: int) -> None:
        stats = request.stats
        stats.steps += 1
        stats.proposed += proposed
        stats.accepted += accepted
        if proposer is not None:
            counts = request.proposer_counts(proposer)
            counts.steps += 1
            counts.proposed += proposed
            counts.accepted += accepted

    # -- commit and finish ---------------------------------------------------------------------------

    def _commit(self, request: Request, new_tokens: Sequence[int], logprobs: Sequence[TokenLogprobs] = ()) -> None:
        """Append one step's tokens, apply EOS / stop strings / max_tokens, and stream the result (with each
        kept token's logprobs when the request asked for them: `logprobs` is then one per new token)."""
        if request.cancelled:
            self._finish(request, None)
            return
        kept: list[int] = []
        text: list[str] = []
        reason: FinishReason | None = None
        eos = self.limits.eos_token_ids
        for token in new_tokens:
            if token in eos and not request.params.ignore_eos:
                reason = FinishReason.EOS
                break
            kept.append(token)
            request.tokens.append(token)
            piece = request.detokenizer.add(token)
            text.append(piece.text)
            if piece.stopped:
                reason = FinishReason.STOP
                break
            if request.remaining_tokens <= 0:
                reason = FinishReason.LENGTH
                break
        if reason is not None and reason is not FinishReason.STOP:
            text.append(request.detokenizer.flush())
        if reason is not None:
            self._finish(request, reason)
        kept_logprobs = None
        if request.params.logprobs:
            if len(logprobs) != len(new_tokens):  # a verifier that does not know the flag
                log.warning("the verifier sent %d logprobs for %d tokens of %s", len(logprobs), len(new_tokens),
                            request.request_id)
            else:
                kept_logprobs = list(logprobs[: len(kept)])
        request.events.put_nowait(
            StreamChunk(kept, "".join(text), reason, request.stats if reason is not None else None, kept_logprobs,
                        request.index)
        )

    def _finish(self, request: Request, reason: FinishReason | None) -> None:
        """End a request (reason None: cancelled or failed) and queue the release of its state."""
        if request.is_finished:
            return
        was_running = request.state is RequestState.RUNNING
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        request.finished_s = time.perf_counter()
        request.stats.completion_tokens = request.num_output
        request.stats.total_ms = (request.finished_s - request.arrival_s) * 1e3
        if was_running:
            del self._running[request.request_id]
            self._release_in_verifier.append(request.request_id)
        for proposer in self.proposers.values():
            proposer.forget(request.request_id)
        self._wake.set()

    def _fail(self, request: Request, code: str, message: str) -> None:
        if request.is_finished:
            return
        self._finish(request, None)
        request.events.put_nowait(RequestFailed(code, message, request.index))


def _one(logprobs: TokenLogprobs | None) -> tuple[TokenLogprobs, ...]:
    return () if logprobs is None else (logprobs,)

"""The scheduler's spans and metrics: one span per request, one per engine step, and the counters.

Trace shape (one client request): client span -> Generate server span -> `scheduler.request`; each
engine step that serves the request -> `engine.step` -> the Prefill / Verify client spans (and the
verifier's server spans under them) and one `proposer.propose` span per proposer asked (with the
proposer's own span under it). A step serves many requests but a span has one parent: the step's
parent is the request span of the oldest request it serves (so a request's trace holds every step
while it is the oldest, always its first), and the step links to the request span of every request
it serves, so each request's steps are one click away.

Nothing here is on the critical path when tracing is off (non-recording spans) and metric updates
are a few counter increments per step (per-position counts are summed over the step's requests first).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import trace

from specdec.telemetry.metrics import NO_PROPOSER_LABEL, SchedulerMetrics
from specdec.telemetry.tracing import tracer

if TYPE_CHECKING:
    from scheduler_svc.policy.base import Policy
    from scheduler_svc.types import RequestOutcome, StepRecord
    from scheduler_svc.request import Request


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def candidate_depth(parents: Sequence[int], proposed: int) -> int:
    """How many positions the verified candidates reach: a chain's length, a tree's depth (parents precede
    children, -1 = a root); no parents = a chain of `proposed` tokens."""
    if not parents:
        return proposed
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    return max(depth)


def k_summary(ks: Sequence[int]) -> dict[str, object]:
    """Span attributes that summarise the k chosen per request in one step."""
    if not ks:
        return {}
    counts = collections.Counter(ks)
    return {
        "specdec.k.mean": sum(ks) / len(ks),
        "specdec.k.min": min(ks),
        "specdec.k.max": max(ks),
        "specdec.k.speculating": sum(1 for k in ks if k > 0),
        # "k:requests" pairs, e.g. "0:2 3:5" = two requests without speculation, five with k = 3.
        "specdec.k.counts": " ".join(f"{k}:{n}" for k, n in sorted(counts.items())),
    }


class _RequestTrace:
    __slots__ = ("span", "request", "k_sum", "k_steps", "last_tokens_s")

    def __init__(self, span: trace.Span, request: Request) -> None:
        self.span = span
        self.request = request
        self.k_sum = 0
        self.k_steps = 0
        self.last_tokens_s: float | None = None  # end of the last step that gave it tokens


class SchedulerTelemetry:
    """Spans and metrics of one scheduler; the servicer reports requests, the engine reports steps."""

    def __init__(self, metrics: SchedulerMetrics | None = None) -> None:
        self.metrics = metrics or SchedulerMetrics()
        self._requests: dict[str, _RequestTrace] = {}
        self._children: dict[tuple, object] = {}  # (metric, *labels) -> its child, see _child

    def _child(self, metric, *labels: str):
        """metric.labels(*labels), kept: labels() takes a lock and builds a key on every call, and a step
        updates a few metrics per request."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- requests (servicer) -------------------------------------------------------------------------

    def request_started(self, request: Request) -> None:
        """Open the request's span, a child of the current context (the Generate call's server span)."""
        params = request.params
        span = tracer().start_span("scheduler.request", kind=trace.SpanKind.INTERNAL, attributes={
            "specdec.request_id": request.request_id,
            "specdec.prompt_tokens": len(params.prompt_token_ids),
            "specdec.max_tokens": params.max_tokens,
            "specdec.temperature": params.sampling.temperature,
            "specdec.proposer.requested": params.proposer,
        })
        self._requests[request.request_id] = _RequestTrace(span, request)
        self.metrics.prompt_tokens.inc(len(params.prompt_token_ids))

    def request_admitted(self, request: Request, admitted_s: float) -> None:
        """The engine took the request off the queue at `admitted_s` (time.perf_counter()) to prefill it."""
        self.metrics.queue_time.observe(max(0.0, admitted_s - request.arrival_s))

    def tokens_sent(self, count: int) -> None:
        """Output tokens that went out to the client."""
        self.metrics.generated_tokens.inc(count)

    def request_ended(self, request: Request, outcome: str) -> None:
        """Close the request's span and count it; `outcome` is its finish reason, or cancelled / failed."""
        entry = self._requests.pop(request.request_id, None)
        stats = request.stats
        self.metrics.requests.labels(outcome).inc()
        if request.finish_reason is not None:
            self.metrics.request_latency.observe(stats.total_ms / 1e3)
        if request.first_token_s is not None:
            self.metrics.time_to_first_token.observe(stats.time_to_first_token_ms / 1e3)
        if request.finish_reason is not None:
            self.metrics.prompt_length.observe(stats.prompt_tokens)
            self.metrics.generation_length.observe(stats.completion_tokens)
            if stats.completion_tokens > 1 and request.first_token_s is not None and request.finished_s is not None:
                self.metrics.time_per_output_token.observe(
                    (request.finished_s - request.first_token_s) / (stats.completion_tokens - 1))
        if entry is None:
            return
        used = sorted(name for name, counts in stats.proposers.items() if counts.steps)
        entry.span.set_attributes({
            "specdec.finish_reason": outcome,
            "specdec.output_tokens": stats.completion_tokens,
            "specdec.steps": stats.steps,
            "specdec.proposer": ",".join(used) or NO_PROPOSER_LABEL,
            "specdec.k.mean": entry.k_sum / entry.k_steps if entry.k_steps else 0.0,
            "specdec.proposed": stats.proposed,
            "specdec.accepted": stats.accepted,
            "specdec.acceptance_rate": stats.accepted / stats.proposed if stats.proposed else 0.0,
            "specdec.time_to_first_token_ms": stats.time_to_first_token_ms,
            "specdec.total_ms": stats.total_ms,
        })
        if outcome == "failed":
            entry.span.set_status(trace.Status(trace.StatusCode.ERROR, "the request failed"))
        entry.span.end()

    # -- steps (engine) ------------------------------------------------------------------------------

    @contextmanager
    def step_span(self, served: Sequence[Request]) -> Iterator[trace.Span]:
        """The current span for one engine iteration serving `served` (oldest first); a non-recording
        span when none of them is traced (the iteration's RPCs are then not traced either)."""
        contexts = [e.span.get_span_context() for r in served if (e := self._requests.get(r.request_id))]
        contexts = [c for c in contexts if c.is_valid]
        if not contexts:
            yield trace.INVALID_SPAN
            return
        parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0]))
        links = [trace.Link(c) for c in contexts]
        with tracer().start_as_current_span("engine.step", context=parent, links=links,
                                            kind=trace.SpanKind.INTERNAL) as span:
            yield span

    def observe_step(self, record: StepRecord, outcomes: Sequence[RequestOutcome], policy: Policy) -> None:
        """Count one finished step and describe it on the current (step) span."""
        m = self.metrics
        wall_s = record.wall_ms / 1e3
        ended_s = record.start_s + wall_s  # the step's tokens were committed (and streamed) just before
        m.step_time.observe(wall_s)
        m.committed_tokens.inc(record.committed)
        m.batch_size.observe(record.batch_size)
        # Per proposer: tokens proposed and accepted, and (positions reached) -> requests for the candidates and
        # the accepted paths, summed over the step's requests first: one counter update per label and step.
        totals: collections.defaultdict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        reached: collections.Counter[tuple[str, int]] = collections.Counter()
        accepted_reached: collections.Counter[tuple[str, int]] = collections.Counter()
        for outcome in outcomes:
            proposer = outcome.proposer
            self._child(m.chosen_k, proposer or NO_PROPOSER_LABEL).observe(outcome.k)
            if proposer:
                total = totals[proposer]
                total[0] += outcome.proposed
                total[1] += outcome.accepted
                if outcome.proposed:
                    reached[proposer, candidate_depth(outcome.verified_parents, outcome.proposed)] += 1
                    accepted_reached[proposer, outcome.accepted] += 1
            entry = self._requests.get(outcome.request_id)
            if entry is not None:
                entry.k_sum += outcome.k
                entry.k_steps += 1
                previous = entry.last_tokens_s if entry.last_tokens_s is not None else entry.request.first_token_s
                if previous is not None:
                    m.inter_token_latency.observe(max(0.0, ended_s - previous))
                entry.last_tokens_s = ended_s
        for proposer, (proposed, accepted) in totals.items():
            self._child(m.proposed_tokens, proposer).inc(proposed)
            self._child(m.accepted_tokens, proposer).inc(accepted)
        positions: collections.defaultdict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
        for column, counts in enumerate((reached, accepted_reached)):
            for (proposer, depth), requests in counts.items():
                for position in range(depth):
                    positions[proposer, str(position)][column] += requests
        for labels, (proposed, accepted) in positions.items():
            self._child(m.proposed_per_position, *labels).inc(proposed)
            # 0 too: the series exists from the first time its position is proposed.
            self._child(m.accepted_per_position, *labels).inc(accepted)
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes: dict[str, object] = {
            "specdec.step_id": record.step_id,
            "specdec.batch_size": record.batch_size,
            "specdec.admitted": record.admitted,
            "specdec.proposed": record.proposed,
            "specdec.accepted": record.accepted,
            "specdec.committed": record.committed,
            "specdec.step_ms": record.wall_ms,
            "specdec.forward_ms": record.forward_ms,
            "specdec.overhead_ms": record.overhead_ms,
            "specdec.propose_wall_ms": record.propose_wall_ms,
            "specdec.verify_forward_ms": record.verify_forward_ms,
            "specdec.verify_batched_tokens": record.verify_batched_tokens,
            "specdec.goodput.measured": record.committed / wall_s if wall_s > 0 else 0.0,
            **k_summary([o.k for o in outcomes]),
        }
        predicted = _number(policy.predicted_goodput)
        if predicted is not None:
            attributes["specdec.goodput.predicted"] = predicted
        predicted_ms = _number(policy.predicted_step_ms)
        if predicted_ms is not None:
            attributes["specdec.step_ms.predicted"] = predicted_ms
        span.set_attributes(attributes)

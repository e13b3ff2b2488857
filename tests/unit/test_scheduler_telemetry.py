"""scheduler_svc.telemetry without gRPC: request and step spans, their parent/links, the step attributes
(k summary, measured and predicted goodput) and the metrics a step moves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from opentelemetry import trace

from scheduler_svc.types import RequestOutcome, StepRecord
from scheduler_svc.request import FinishReason, GenerationParams, Request
from scheduler_svc.telemetry import SchedulerTelemetry, candidate_depth, k_summary


def make_request(prompt_len: int = 4) -> Request:
    return Request(GenerationParams(tuple(range(1, prompt_len + 1)), max_tokens=8), detokenizer=None)


def sample(telemetry: SchedulerTelemetry, name: str, **labels) -> float:
    return telemetry.metrics.registry.get_sample_value(name, labels) or 0.0


def test_k_summary():
    assert k_summary([]) == {}
    summary = k_summary([0, 3, 3, 5])
    assert summary["specdec.k.mean"] == pytest.approx(11 / 4)
    assert (summary["specdec.k.min"], summary["specdec.k.max"], summary["specdec.k.speculating"]) == (0, 5, 3)
    assert summary["specdec.k.counts"] == "0:1 3:2 5:1"


def test_step_span_is_a_child_of_the_oldest_request_and_links_all(span_recorder):
    telemetry = SchedulerTelemetry()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("call-a"):
        a = make_request(3)
        telemetry.request_started(a)
    with tracer.start_as_current_span("call-b"):
        b = make_request(5)
        telemetry.request_started(b)
    policy = SimpleNamespace(predicted_goodput=250.0, predicted_step_ms=12.0)
    record = StepRecord(step_id=7, start_s=0.0, wall_ms=20.0, batch_size=2, proposed=6, accepted=4, committed=6)
    outcomes = [RequestOutcome(a.request_id, "ngram", 3, 3, 2), RequestOutcome(b.request_id, "draft", 3, 3, 2)]
    with telemetry.step_span([a, b]) as span:
        assert span.is_recording() and trace.get_current_span() is span
        telemetry.observe_step(record, outcomes, policy)
    for request, reason in ((a, FinishReason.LENGTH), (b, None)):
        request.finish_reason = reason
        request.stats.proposed, request.stats.accepted, request.stats.steps = 3, 2, 1
        request.stats.completion_tokens = 3
        request.proposer_counts("ngram" if request is a else "draft").steps = 1
    telemetry.request_ended(a, "length")
    telemetry.request_ended(b, "cancelled")

    finished = {s.name: s for s in span_recorder.get_finished_spans()
                if s.context.trace_id in {span.get_span_context().trace_id}}
    step, request_a = finished["engine.step"], finished["scheduler.request"]
    assert step.parent.span_id == request_a.context.span_id  # the oldest request's trace
    assert [link.context.span_id for link in step.links] == [
        telemetry_span.context.span_id for telemetry_span in span_recorder.get_finished_spans()
        if telemetry_span.name == "scheduler.request" and telemetry_span.attributes["specdec.request_id"]
        in (a.request_id, b.request_id)]
    attrs = step.attributes
    assert attrs["specdec.goodput.measured"] == pytest.approx(6 / 0.020)
    assert attrs["specdec.goodput.predicted"] == 250.0 and attrs["specdec.step_ms.predicted"] == 12.0
    assert attrs["specdec.k.mean"] == 3 and attrs["specdec.batch_size"] == 2
    assert request_a.attributes["specdec.k.mean"] == 3 and request_a.attributes["specdec.proposer"] == "ngram"
    assert request_a.attributes["specdec.acceptance_rate"] == pytest.approx(2 / 3)

    assert sample(telemetry, "specdec_proposed_tokens_total", proposer="ngram") == 3
    assert sample(telemetry, "specdec_accepted_tokens_total", proposer="draft") == 2
    assert sample(telemetry, "specdec_chosen_k_count", proposer="ngram") == 1
    assert sample(telemetry, "specdec_requests_total", finish_reason="cancelled") == 1
    assert sample(telemetry, "specdec_request_latency_seconds_count") == 1  # completed ones only
    assert sample(telemetry, "specdec_prompt_tokens_total") == 8


def test_untraced_requests_make_no_step_span():
    telemetry = SchedulerTelemetry()
    with telemetry.step_span([make_request()]) as span:
        assert not span.is_recording()
    with telemetry.step_span([]) as span:
        assert not span.is_recording()


def test_candidate_depth_is_a_chains_length_and_a_trees_depth():
    assert candidate_depth((), 4) == 4  # no parents: a chain
    assert candidate_depth((-1, 0, 1), 3) == 3
    assert candidate_depth((-1, -1, 0, 0, 2), 5) == 3  # roots at depth 1, node 4 under node 2 under node 0
    assert candidate_depth((), 0) == 0


def test_step_and_request_metrics():
    """Queue time, inter-token latency, time per output token, lengths, batch size and the per-position
    acceptance counters, from hand-made steps."""
    telemetry = SchedulerTelemetry()
    a, b, c = make_request(3), make_request(5), make_request(2)
    for request in (a, b, c):
        request.arrival_s = 9.0
        telemetry.request_started(request)
        telemetry.request_admitted(request, 9.5)
        request.first_token_s = 10.005
    outcomes = [
        RequestOutcome(a.request_id, "ngram", 3, 3, 2, verified_parents=(-1, 0, 1)),
        RequestOutcome(b.request_id, "medusa", 5, 5, 2, verified_parents=(-1, -1, 0, 0, 2)),
        RequestOutcome(c.request_id, None, 0, 0, 0),
    ]
    telemetry.observe_step(StepRecord(step_id=1, start_s=10.0, wall_ms=20.0, batch_size=3), outcomes, object())
    telemetry.observe_step(StepRecord(step_id=2, start_s=10.02, wall_ms=10.0, batch_size=3), outcomes[:1], object())

    assert sample(telemetry, "specdec_request_queue_time_seconds_count") == 3
    assert sample(telemetry, "specdec_request_queue_time_seconds_sum") == pytest.approx(1.5)
    # Step 1 ends at 10.02: 15 ms after each first token; step 2 ends 10 ms later, for `a` only.
    assert sample(telemetry, "specdec_inter_token_latency_seconds_count") == 4
    assert sample(telemetry, "specdec_inter_token_latency_seconds_sum") == pytest.approx(3 * 0.015 + 0.010)
    assert sample(telemetry, "specdec_step_batch_size_count") == 2
    assert sample(telemetry, "specdec_step_batch_size_sum") == 6
    # A chain reaches as many positions as it has tokens, a tree as deep as it goes; accepted paths likewise.
    for proposer, proposed, accepted in (("ngram", [2, 2, 2], [2, 2, 0]), ("medusa", [1, 1, 1], [1, 1, 0])):
        for position in range(3):
            labels = {"proposer": proposer, "position": str(position)}
            assert sample(telemetry, "specdec_proposed_tokens_per_position_total", **labels) == proposed[position]
            assert sample(telemetry, "specdec_accepted_tokens_per_position_total", **labels) == accepted[position]
    assert telemetry.metrics.registry.get_sample_value(
        "specdec_proposed_tokens_per_position_total", {"proposer": "ngram", "position": "3"}) is None
    assert telemetry.metrics.registry.get_sample_value(
        "specdec_proposed_tokens_per_position_total", {"proposer": "none", "position": "0"}) is None

    a.finish_reason, a.finished_s, a.stats.completion_tokens = FinishReason.LENGTH, 10.105, 11
    telemetry.request_ended(a, "length")
    c.stats.completion_tokens = 1
    telemetry.request_ended(c, "cancelled")  # not completed: no lengths, no time per token
    assert sample(telemetry, "specdec_time_per_output_token_seconds_count") == 1
    assert sample(telemetry, "specdec_time_per_output_token_seconds_sum") == pytest.approx(0.1 / 10)
    assert sample(telemetry, "specdec_request_prompt_tokens_sum") == 3
    assert sample(telemetry, "specdec_request_generation_tokens_sum") == 11
    assert sample(telemetry, "specdec_request_generation_tokens_count") == 1

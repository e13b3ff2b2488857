"""Tracing end to end: the stack as separate processes exports spans over OTLP to a collector started
here; one client request must come back as one trace that crosses every service:

    caller span (this test) -> SDK CLIENT span -> scheduler Generate SERVER span -> scheduler.request
      -> engine.step -> Prefill / Verify CLIENT span -> verifier SERVER span (batched tokens, forward ms)
                     -> Propose <name> CLIENT span -> proposer.propose span in the proposer process

with the attributes the dashboards and docs/metrics.md promise, and no spans for health checks.
"""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace

from specdec_client import Client

SPAN_WAIT_S = 30.0


def wait_for_trace(collector, trace_id: str, services: set[str]) -> list[dict]:
    """The trace's spans once every service in `services` has sent its part (the request's last step
    included), or fail after SPAN_WAIT_S."""
    deadline = time.monotonic() + SPAN_WAIT_S
    while True:
        spans = [s for s in collector.spans() if s["trace_id"] == trace_id]
        seen = {s["service"] for s in spans}
        done = any(s["name"] == "scheduler.request" for s in spans)
        if services <= seen and done:
            time.sleep(0.5)  # a last batch may still be in flight from another service
            return [s for s in collector.spans() if s["trace_id"] == trace_id]
        if time.monotonic() > deadline:
            pytest.fail(f"trace {trace_id} incomplete after {SPAN_WAIT_S:g} s: services {sorted(seen)}, "
                        f"spans {sorted({s['name'] for s in spans})}")
        time.sleep(0.1)


def one(spans: list[dict], **match) -> dict:
    found = [s for s in spans if all(s[k] == v for k, v in match.items())]
    assert len(found) == 1, f"expected one span with {match}, found {len(found)}: {[s['name'] for s in spans]}"
    return found[0]


def children(spans: list[dict], parent: dict, **match) -> list[dict]:
    return [s for s in spans if s["parent_id"] == parent["span_id"] and all(s[k] == v for k, v in match.items())]


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_one_request_is_one_trace_across_every_service(observed_stack, span_recorder, proposer):
    stack, collector = observed_stack
    prompt = [5, 6, 7, 8] * 6  # repetitive: prompt lookup finds candidates
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        with Client(stack.spec("scheduler").address, timeout=60) as client:
            result = client.generate(prompt, max_tokens=12, ignore_eos=True, proposer=proposer)
    trace_id = format(caller.get_span_context().trace_id, "032x")
    assert len(result.token_ids) == 12

    # This process: the caller's span and the SDK's CLIENT span under it, in the same trace.
    local = [s for s in span_recorder.get_finished_spans() if s.context.trace_id == caller.get_span_context().trace_id]
    sdk = [s for s in local if s.name == "specdec.v1.Generation/GenerateUnary"]
    assert len(sdk) == 1 and sdk[0].parent.span_id == caller.get_span_context().span_id
    assert sdk[0].kind is trace.SpanKind.CLIENT
    assert sdk[0].attributes["specdec.completion_tokens"] == 12
    sdk_span_id = format(sdk[0].context.span_id, "016x")

    used = f"specdec-proposer-{proposer}"
    unused = "specdec-proposer-" + ({"ngram", "draft"} - {proposer}).pop()
    spans = wait_for_trace(collector, trace_id, {"specdec-scheduler", "specdec-verifier", used})

    # Scheduler: the served call is the SDK span's child, the request span the call's.
    served = one(spans, service="specdec-scheduler", name="/specdec.v1.Generation/GenerateUnary")
    assert served["parent_id"] == sdk_span_id and served["kind"] == "SPAN_KIND_SERVER"
    request = one(spans, name="scheduler.request")
    assert request["parent_id"] == served["span_id"]
    attrs = request["attributes"]
    assert attrs["specdec.prompt_tokens"] == len(prompt)
    assert attrs["specdec.output_tokens"] == 12
    assert attrs["specdec.proposer"] == proposer
    assert attrs["specdec.finish_reason"] == "length"
    assert attrs["specdec.k.mean"] > 0
    assert attrs["specdec.accepted"] <= attrs["specdec.proposed"]
    assert attrs["specdec.acceptance_rate"] == pytest.approx(attrs["specdec.accepted"] / attrs["specdec.proposed"])

    # Steps: children of the request (it is the only one), linked to it, with timings and goodput.
    steps = children(spans, request, name="engine.step")
    assert len(steps) == attrs["specdec.steps"] >= 1  # the first step also prefills
    assert any(step["attributes"]["specdec.k.max"] > 0 for step in steps)
    for step in steps:
        a = step["attributes"]
        assert step["links"] == [request["span_id"]]
        assert a["specdec.batch_size"] == 1 and a["specdec.step_ms"] > 0
        assert a["specdec.goodput.measured"] == pytest.approx(a["specdec.committed"] / (a["specdec.step_ms"] / 1e3))
        assert a["specdec.k.max"] >= a["specdec.k.min"] >= 0 and "specdec.k.counts" in a
        assert a["specdec.accepted"] <= a["specdec.proposed"]

        # Verifier: Verify (and Prefill on the first step) as CLIENT spans of the step, each with the
        # verifier's SERVER span under it, in the verifier's process.
        for call in children(spans, step, service="specdec-scheduler", kind="SPAN_KIND_CLIENT"):
            if call["name"].startswith("/specdec.v1.Verifier/"):
                remote = children(spans, call, service="specdec-verifier")
                assert len(remote) == 1 and remote[0]["name"] == call["name"], call
                assert remote[0]["attributes"]["specdec.batched_tokens"] >= 1
                assert remote[0]["attributes"]["specdec.forward_ms"] > 0
        names = {s["name"] for s in children(spans, step)}
        assert "/specdec.v1.Verifier/Verify" in names

        # The proposer asked this step (unless no k fitted: near max_tokens), and its own span under the call.
        proposes = children(spans, step, name=f"Propose {proposer}")
        if a["specdec.k.max"] == 0:
            assert not proposes
            continue
        (propose,) = proposes
        (remote,) = children(spans, propose, service=used)
        assert remote["name"] == "proposer.propose"
        assert remote["attributes"]["specdec.proposed_tokens"] == propose["attributes"]["specdec.proposed_tokens"]
        assert remote["attributes"]["specdec.budget"] == a["specdec.k.max"]
    prefills = [s for s in spans if s["name"] == "/specdec.v1.Verifier/Prefill"]
    assert {s["service"] for s in prefills} == {"specdec-scheduler", "specdec-verifier"}

    assert not [s for s in spans if s["service"] == unused], "an unused proposer joined the trace"
    assert not [s for s in collector.spans() if "grpc.health.v1.Health" in s["name"]], "health checks traced"

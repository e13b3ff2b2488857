from __future__ import annotations

import torch

torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def observed_stack(tmp_path_factory):
    """The whole stack (verifier, ngram and draft proposers, scheduler) as processes on tiny models,
    exporting spans to an in-test OTLP collector and serving Prometheus metrics; shared by the tracing
    and metrics tests. Yields (stack, collector)."""
    from specdec.launcher import Stack, local_specs
    from specdec.testing import OtlpCollector, make_tiny_stack_checkpoints

    target, draft = make_tiny_stack_checkpoints(tmp_path_factory.mktemp("observed-models"))
    collector = OtlpCollector()
    env = {
        "SPECDEC_TORCH_THREADS": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the collector quickly
    }
    # The fixed policy: every request is served by the proposer it names, with k = 3 and no free prompt
    # lookup before the plan, so the spans and counters each test expects follow from its requests alone.
    specs = local_specs(0, ("ngram", "draft"), policy="fixed", k=3, model=target, draft_model=draft, env=env,
                        metrics=True)
    try:
        with Stack(specs, startup_timeout_s=180, grace_s=5, echo=None) as stack:
            yield stack, collector
    finally:
        collector.stop()


@pytest.fixture(scope="session")
def span_recorder():
    """Spans recorded in this test process (an in-memory exporter on the global SDK tracer provider,
    installed here if none is). Tests filter by their own trace ids."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()

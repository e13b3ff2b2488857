from __future__ import annotations

import torch

torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def observed_stack(tmp_path_factory):
    """The whole stack (verifier, ngram and draft proposers, scheduler) as processes on tiny models,
    exporting spans to an in-test OTLP collector and serving Prometheus metrics; shared by the tracing
    and metrics tests. Yields (stack, collector)."""
    from specdec.ops.launcher import Stack, local_specs
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(target, draft, Medusa heads) folders of the tiny test stack: the target with the embedded tokenizer,
    a draft near it, heads fitted briefly on it."""
    from specdec.testing import make_tiny_medusa_heads, make_tiny_stack_checkpoints

    root = tmp_path_factory.mktemp("tiny-models")
    target, draft = make_tiny_stack_checkpoints(root, eos_token_id=0)
    return target, draft, make_tiny_medusa_heads(target, root / "medusa", steps=100)


@pytest.fixture(scope="session")
def tiny_stack(tiny_models, tmp_path_factory):
    """The whole stack as processes on the tiny models: verifier, prompt-lookup, draft and tree proposers,
    scheduler (fixed policy, k = 3; also serving the OpenAI-compatible HTTP API, see http_url), under the
    launcher's supervisor (which the fault tests use to restart what they kill). Tests must leave it as they
    found it: every service up, no request held."""
    from specdec.ops.launcher import Stack, free_ports, local_specs

    target, draft, heads = tiny_models
    specs = local_specs(0, ("ngram", "draft", "medusa"), policy="fixed", k=3, model=target, draft_model=draft,
                        medusa_model=heads, env={"SPECDEC_TORCH_THREADS": "1"}, metrics=False,
                        http_port=free_ports(1)[0])
    with Stack(specs, log_dir=tmp_path_factory.mktemp("tiny-stack-logs"), startup_timeout_s=180, grace_s=5,
               echo=None, max_restarts=2) as stack:
        yield stack


def http_url(stack) -> str:
    """The base URL of the HTTP API of a stack's scheduler (started with --http-port)."""
    spec = stack.spec("scheduler")
    return f"http://{spec.address.rsplit(':', 1)[0]}:{spec.args[spec.args.index('--http-port') + 1]}"

"""OpenTelemetry tracing shared by the services: one tracer provider per process, gRPC instrumentation.

`setup_tracing(service_name)` installs an SDK tracer provider whose resource says `service.name` and
which exports over OTLP/gRPC (batched) when the standard variables say where:
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT (the exporter reads the other
OTEL_EXPORTER_OTLP_* variables itself: headers, timeout, insecure, compression). Without them it
installs nothing: the API's no-op provider makes non-recording spans, which still carry an incoming
trace context through the process, so nothing is exported, logged or paid for.

What is traced (see docs/metrics.md for the span attributes):
- every gRPC call a service serves, except health checks and the long-lived Propose stream (the
  proposer opens one span per ProposeRequest instead, from the context carried in the message);
- internal services (verifier, proposers) serve only the scheduler, and trace only calls that arrive
  with a trace context: start-up Info calls and idle Release calls are not request work and would
  each be a trace of their own;
- outgoing calls are traced only inside a trace (an engine step), for the same reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
HEALTH_SERVICE = "grpc.health.v1.Health"
# The bidi stream of a scheduler to a proposer lives as long as both: a span for it would never end.
UNTRACED_METHODS = ("/specdec.v1.Proposer/Propose",)
TRACER_NAME = "specdec"


def exporting_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_EXPORTER_OTLP_* variables name an endpoint (and the SDK is not disabled)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


@dataclass
class Tracing:
    """What setup_tracing installed; `shutdown()` flushes the spans still queued (call it at exit)."""

    service_name: str
    provider: object | None  # the SDK TracerProvider, or None when not exporting

    @property
    def exporting(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes the batch processor, bounded by its export timeout


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> Tracing:
    """Install the process's tracer provider for `service_name` (see the module docstring)."""
    env = os.environ if env is None else env
    if not exporting_configured(env):
        log.info("tracing: no OTEL_EXPORTER_OTLP_ENDPOINT set, spans are not exported")
        return Tracing(service_name, None)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol.strip().lower() not in ("", "grpc"):
        log.warning("tracing: OTLP protocol %r is not supported here, exporting over grpc", protocol)
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES may add to the resource; the service's own name wins
    # unless the operator set OTEL_SERVICE_NAME explicitly.
    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    # BatchSpanProcessor reads OTEL_BSP_* (schedule delay, queue and batch sizes) from the environment.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    endpoint = next(env[name] for name in ENDPOINT_VARIABLES if env.get(name, "").strip())
    log.info("tracing: exporting spans of %s over OTLP to %s", service_name, endpoint)
    return Tracing(service_name, provider)


def tracer() -> trace.Tracer:
    """The tracer of specdec's own spans (the global provider's, so a later setup_tracing applies)."""
    return trace.get_tracer(TRACER_NAME)


# -- gRPC instrumentation -------------------------------------------------------------------------------


def _method(details) -> str:
    method = getattr(details, "method", "") or ""
    return method.decode() if isinstance(method, bytes) else method


def _is_traced_method(method: str) -> bool:
    return not method.startswith(f"/{HEALTH_SERVICE}/") and method not in UNTRACED_METHODS


def _has_incoming_context(details) -> bool:
    return any(key == "traceparent" for key, _ in (getattr(details, "invocation_metadata", None) or ()))


def server_filter(require_context: bool) -> Callable[[object], bool]:
    """Which served calls get a span: never health checks or Propose streams; with `require_context`,
    only calls that arrive with a trace context."""

    def traced(details) -> bool:
        return _is_traced_method(_method(details)) and (not require_context or _has_incoming_context(details))

    return traced


def client_filter(details) -> bool:
    """Outgoing calls get a span (and carry the trace context) only inside a trace."""
    return _is_traced_method(_method(details)) and trace.get_current_span().get_span_context().is_valid


def server_interceptors(require_context: bool = False) -> list:
    """Interceptors for grpc.aio.server(): a SERVER span per traced call, child of the caller's context."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=server_filter(require_context))]


def client_interceptors() -> list:
    """Interceptors for grpc.aio channels: a CLIENT span per traced call, its context sent as metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(filter_=client_filter)


# -- context carried in messages ------------------------------------------------------------------------


def inject_context(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """The W3C trace context (traceparent, tracestate) of `ctx` (default: the current one) as a dict;
    empty when there is no trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a carrier made by inject_context() describes (an empty context for an empty carrier)."""
    return propagate.extract(dict(carrier))

"""Trace context for Generation calls: the SDK continues the caller's trace.

Every call gets a CLIENT span, a child of the caller's current span when the call was made (or the
root of a new trace), and sends its W3C trace context as gRPC metadata, so the scheduler's spans join
that trace. Without an OpenTelemetry SDK installed by the caller the span is non-recording: it costs
nothing and still passes the caller's context on.

OpenTelemetry's API is optional (the `tracing` extra of specdec-client; the full specdec install has it):
without it a call has no span and sends no trace context, and the server starts a trace of its own.
"""

from __future__ import annotations

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:
    trace = None

SERVICE = "specdec.v1.Generation"


class CallSpan:
    """The span of one call: created with the caller's context, started when the call starts (once, for
    all its retries), ended once."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._parent = otel_context.get_current() if trace is not None else None
        self.span: trace.Span | None = None
        self._ended = False

    def start(self) -> tuple[tuple[str, str], ...]:
        """Start the span (if not yet) and return the metadata that carries its context."""
        if trace is None:
            return ()
        if self.span is None:
            self.span = trace.get_tracer("specdec_client").start_span(
                f"{SERVICE}/{self.method}", context=self._parent, kind=trace.SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": self.method},
            )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span, self._parent))
        return tuple(carrier.items())

    def fail(self, error: BaseException) -> None:
        if self.span is not None and not self._ended:
            self.span.record_exception(error)
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    def end(self, completion_tokens: int | None = None) -> None:
        if self.span is None or self._ended:
            return
        self._ended = True
        if completion_tokens is not None:
            self.span.set_attribute("specdec.completion_tokens", completion_tokens)
        self.span.end()

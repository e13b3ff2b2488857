"""gRPC front of a proposer: a thin grpc.aio servicer over `Proposer`, plus health, reflection and shutdown.

The proposer's state is not thread-safe and its steps are blocking compute: every call into it runs on
the event-loop thread, one at a time. A hop to a worker thread cost more per step than it saved (torch
ran its forward slower there too, bench.step_overhead); health checks wait for the step in progress.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from proposer_svc.base import Proposal, ProposalRequest, Proposer
from proposer_svc.config import ProposerConfig
from specdec.telemetry.metrics import ProposerMetrics, start_metrics_server
from specdec.pb import common_pb2, proposer_pb2, proposer_pb2_grpc
from specdec.rpc.security import ServerTLS, bind, transport
from specdec.rpc.signals import stop_event
from specdec.rpc.status import StatusInterceptor
from specdec.telemetry.tracing import extract_context, server_interceptors, setup_tracing, tracer

log = logging.getLogger(__name__)

SERVICE_NAME = proposer_pb2.DESCRIPTOR.services_by_name["Proposer"].full_name


def to_requests(message: proposer_pb2.ProposeRequest) -> list[ProposalRequest]:
    """protobuf items -> contract dataclasses."""
    return [
        ProposalRequest(item.request_id, list(item.new_token_ids), item.reset, item.budget, item.hidden_state or None)
        for item in message.items
    ]


def to_candidates(proposal: Proposal) -> common_pb2.Candidates:
    return common_pb2.Candidates(
        request_id=proposal.request_id, token_ids=proposal.token_ids, parent_indices=proposal.parent_indices
    )


class ProposerService(proposer_pb2_grpc.ProposerServicer):
    """specdec.v1.Proposer over one `Proposer`."""

    def __init__(self, proposer: Proposer, metrics: ProposerMetrics | None = None) -> None:
        self.proposer = proposer
        self.metrics = metrics or ProposerMetrics(proposer.kind)
        self._owner: dict[str, object] = {}  # request id -> the Propose stream that last sent it

    def step(self, message: proposer_pb2.ProposeRequest) -> proposer_pb2.ProposeResponse:
        """One ProposeRequest -> its ProposeResponse (plain Python; no gRPC context needed).

        Traced as a child of the engine step that sent it (the context travels in the message, the
        stream outlives the step); a message without one (not part of a trace) makes no span."""
        if not message.trace_context:
            return self._step(message)
        with tracer().start_as_current_span(
            "proposer.propose", context=extract_context(message.trace_context), kind=trace.SpanKind.SERVER,
            attributes={"specdec.proposer.kind": self.proposer.kind, "specdec.step_id": message.step_id},
        ) as span:
            response = self._step(message)
            span.set_attributes({
                "specdec.requests": len(message.items),
                "specdec.budget": sum(item.budget for item in message.items),
                "specdec.new_tokens": sum(len(item.new_token_ids) for item in message.items),
                "specdec.proposed_tokens": sum(len(c.token_ids) for c in response.candidates),
                "specdec.propose_ms": response.propose_ms,
                "specdec.forward_ms": response.forward_ms,
            })
            return response

    def _step(self, message: proposer_pb2.ProposeRequest) -> proposer_pb2.ProposeResponse:
        start = time.perf_counter()
        proposer = self.proposer
        proposer.release(message.release_request_ids)
        items = to_requests(message)
        try:
            proposals = proposer.step(items)
        except Exception:
            # A bug, not bad input (that is handled per item). Answer with nothing for this step and drop
            # the touched requests, whose state may be half updated; the stream and the others go on.
            log.exception("%s proposer: step %d failed; its requests lose their state", proposer.kind,
                          message.step_id)
            proposer.release({item.request_id for item in items})
            proposals = [Proposal(item.request_id) for item in items if item.budget > 0]
        response = proposer_pb2.ProposeResponse(
            step_id=message.step_id,
            candidates=[to_candidates(p) for p in proposals],
            propose_ms=(time.perf_counter() - start) * 1000.0,
            forward_ms=proposer.forward_ms,
        )
        self.metrics.steps.inc()
        self.metrics.proposed_tokens.inc(sum(len(p.token_ids) for p in proposals))
        self.metrics.propose_time.observe(response.propose_ms / 1e3)
        return response

    async def Propose(self, request_iterator, context: grpc.aio.ServicerContext):
        peer = context.peer()
        log.info("propose stream opened by %s", peer)
        steps = 0
        stream = object()  # this stream's identity in self._owner
        try:
            async for message in request_iterator:
                for rid in message.release_request_ids:
                    self._owner.pop(rid, None)
                for item in message.items:
                    self._owner[item.request_id] = stream
                yield self.step(message)
                steps += 1
        finally:
            # The stream is the scheduler's session: when it ends (closed, cancelled, or its scheduler gone),
            # nobody will ask for its requests again on it; a scheduler that reconnects sends every request
            # again from scratch (reset). So their state is dropped now rather than leaked, except where a
            # newer stream has taken a request over (a scheduler that dropped a stream and opened another).
            dropped = [rid for rid, owner in self._owner.items() if owner is stream]
            for rid in dropped:
                del self._owner[rid]
            self.proposer.release(dropped)
            log.info("propose stream from %s closed after %d steps; dropped the state of %d requests", peer,
                     steps, len(dropped))

    async def Info(self, request, context: grpc.aio.ServicerContext) -> proposer_pb2.ProposerInfo:
        proposer = self.proposer
        active = proposer.active_request_ids()
        return proposer_pb2.ProposerInfo(
            kind=proposer.kind, config=proposer.describe(), active_request_ids=active, max_budget=proposer.max_budget,
            hidden_size=proposer.hidden_size, free=proposer.free, tree=proposer.tree,
        )


@dataclass
class RunningServer:
    """A started server and the pieces needed to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service: ProposerService

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING and let in-flight calls finish (up to grace_s)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(proposer: Proposer, host: str = "127.0.0.1", port: int = 0,
                       tls: ServerTLS | None = None) -> RunningServer:
    """Serve `proposer` on host:port (0 = a free port, read back from the result; TLS with `tls`) with
    health and reflection."""
    # Only the scheduler calls a proposer: calls without a trace context are not request work.
    server = grpc.aio.server(interceptors=[*server_interceptors(require_context=True), StatusInterceptor()])
    service = ProposerService(proposer)
    proposer_pb2_grpc.add_ProposerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    bound = bind(server, f"{host}:{port}", tls)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health_servicer, service)


def build_proposer(config: ProposerConfig) -> Proposer:
    """The proposer the configuration names (loads the draft model; can take a while)."""
    if config.kind == "ngram":
        from proposer_svc.ngram import NgramProposer

        vocab_size = config.vocab_size
        if vocab_size is None and config.model is not None:
            vocab_size = _config_vocab_size(config.model)
        return NgramProposer(min_n=config.min_n, max_n=config.max_n, max_budget=config.max_budget,
                             vocab_size=vocab_size)
    if config.kind == "draft":
        from proposer_svc.draft import DraftProposer
        from specdec.model.checkpoint import validate_checkpoint

        folder = validate_checkpoint(config.model, need_tokenizer=False)
        return DraftProposer.from_checkpoint(
            folder,
            device=None if config.device == "auto" else config.device,
            dtype=config.dtype,
            max_slots=config.max_slots,
            max_seq_len=config.max_seq_len,
            max_budget=config.max_budget,
        )
    if config.kind == "medusa":
        from proposer_svc.medusa import MedusaProposer

        return MedusaProposer.from_folder(
            config.model,
            device=None if config.device == "auto" else config.device,
            dtype=config.dtype,
            max_budget=config.max_budget,
            top_k=config.top_k,
            target=config.target_model,
            free={"auto": None, "yes": True, "no": False}[config.free],
        )
    raise ValueError(f"unknown proposer kind {config.kind!r}")


def _config_vocab_size(folder: Path) -> int:
    from specdec.model.checkpoint import validate_checkpoint

    folder = validate_checkpoint(folder, need_tokenizer=False)
    return int(json.loads((folder / "config.json").read_text())["vocab_size"])


async def serve(config: ProposerConfig) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully."""
    tracing = setup_tracing(f"specdec-proposer-{config.kind}")
    proposer = build_proposer(config)
    log.info("proposer ready: %s", proposer.describe())
    running = await start_server(proposer, config.host, config.port, config.tls)
    log.info("serving %s (%s) on %s:%d (%s)", SERVICE_NAME, proposer.kind, config.host, running.port,
             transport(config.tls))
    if start_metrics_server(config.metrics_port, running.service.metrics.registry, config.host):
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    stop = stop_event()
    try:
        await stop.wait()
        log.info("shutting down (grace %.1f s)", config.grace_s)
    finally:
        await running.stop(config.grace_s)
        tracing.shutdown()
    log.info("stopped")

"""gRPC front of the verifier: a thin grpc.aio servicer over VerifierCore, plus health and reflection.

Model calls run on the event-loop thread, one at a time (VerifierCore is not thread-safe, and each call
is a whole step of the scheduler): a hop to a worker thread cost more per step than it saved.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from specdec.telemetry.metrics import VerifierMetrics, start_metrics_server
from specdec.pb import common_pb2, verifier_pb2, verifier_pb2_grpc
from specdec.model.sampling import SamplingParams
from specdec.contracts import Candidates, PrefillItem, Timing, TokenLogprobs, VerifyItem
from specdec.rpc.security import ServerTLS, bind, transport
from specdec.rpc.signals import stop_event
from specdec.rpc.status import MAX_MESSAGE_CHARS, StatusInterceptor
from specdec.telemetry.tracing import server_interceptors, setup_tracing
from verifier_svc.config import VerifierConfig
from verifier_svc.core import CapacityError, UnknownRequest, VerifierCore

log = logging.getLogger("verifier_svc")

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name  # specdec.v1.Verifier


def sampling_from_pb(pb: common_pb2.SamplingParams) -> tuple[SamplingParams, int | None]:
    """Protobuf SamplingParams -> (params, seed or None)."""
    params = SamplingParams(
        temperature=pb.temperature,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k,
    )
    return params, (pb.seed if pb.HasField("seed") else None)


def logprobs_to_pb(lp: TokenLogprobs) -> verifier_pb2.TargetLogprobs:
    return verifier_pb2.TargetLogprobs(token_id=lp.token_id, logprob=lp.logprob,
                                       top_token_ids=[t for t, _ in lp.top], top_logprobs=[v for _, v in lp.top])


def timing_to_pb(timing: Timing, total_ms: float) -> verifier_pb2.Timing:
    return verifier_pb2.Timing(
        forward_ms=timing.forward_ms,
        total_ms=total_ms,
        batched_tokens=timing.batched_tokens,
        context_tokens=timing.context_tokens,
        batch_size=timing.batch_size,
    )


def observe_call(metrics: VerifierMetrics, method: str, timing: Timing) -> None:
    """Count one model call in the metrics and describe it on the current (gRPC server) span."""
    metrics.calls.labels(method).inc()
    metrics.batched_tokens.labels(method).inc(timing.batched_tokens)
    metrics.forward_time.labels(method).observe(timing.forward_ms / 1e3)
    trace.get_current_span().set_attributes({
        "specdec.batch_size": timing.batch_size,
        "specdec.batched_tokens": timing.batched_tokens,
        "specdec.context_tokens": timing.context_tokens,
        "specdec.forward_ms": timing.forward_ms,
    })


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, core: VerifierCore, metrics: VerifierMetrics | None = None) -> None:
        self.core = core
        self.metrics = metrics or VerifierMetrics()

    async def _call(self, context: grpc.aio.ServicerContext, fn, *args):
        """Run a core call; bad input and capacity become status codes.

        The call runs on the event-loop thread itself: handing it to a worker thread cost about 0.3 ms per
        step (bench.step_overhead), and every call is one step of one scheduler anyway, so calls are
        serialised either way; health checks simply wait for the forward in progress.
        """
        # Any other exception (a bug, or an input no check foresaw) becomes INTERNAL in StatusInterceptor; the
        # core rolls a failed call back, so the service goes on. Messages are cut: they quote request ids.
        try:
            return fn(*args)
        except CapacityError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)[:MAX_MESSAGE_CHARS])
        except UnknownRequest as exc:  # the scheduler re-prefills on NOT_FOUND: a typed signal, not a message
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc)[:MAX_MESSAGE_CHARS])
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:MAX_MESSAGE_CHARS])

    async def Prefill(self, request: verifier_pb2.PrefillRequest, context) -> verifier_pb2.PrefillResponse:
        started = time.perf_counter()
        items = []
        for item in request.items:
            params, seed = sampling_from_pb(item.sampling)
            items.append(PrefillItem(item.request_id, list(item.token_ids), params, seed, item.logprobs,
                                     item.top_logprobs))
        out = await self._call(context, self.core.prefill, items, request.return_hidden)
        observe_call(self.metrics, "Prefill", out.timing)
        return verifier_pb2.PrefillResponse(
            results=[verifier_pb2.PrefillResult(request_id=r.request_id, next_token_id=r.next_token_id,
                                                 hidden_state=r.hidden_state,
                                                 logprobs=logprobs_to_pb(r.logprobs) if r.logprobs else None)
                     for r in out.results],
            timing=timing_to_pb(out.timing, (time.perf_counter() - started) * 1000.0),
        )

    async def Verify(self, request: verifier_pb2.VerifyRequest, context) -> verifier_pb2.VerifyResponse:
        started = time.perf_counter()
        for item in request.items:
            if item.candidates.request_id and item.candidates.request_id != item.request_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Verify item {item.request_id!r} carries candidates for request {item.candidates.request_id!r}",
                )
        items = [
            VerifyItem(item.request_id, Candidates(
                tuple(item.candidates.token_ids), tuple(item.candidates.parent_indices),
                tuple(np.asarray(d.probs, dtype=np.float64) for d in item.candidates.draft_distributions),
            ) if item.HasField("candidates") else None)
            for item in request.items
        ]
        out = await self._call(context, self.core.verify, items, request.return_hidden)
        observe_call(self.metrics, "Verify", out.timing)
        return verifier_pb2.VerifyResponse(
            results=[
                verifier_pb2.VerifyResult(
                    request_id=r.request_id,
                    accepted_token_ids=r.accepted_token_ids,
                    accepted_indices=r.accepted_indices,
                    bonus_token_id=r.bonus_token_id,
                    hidden_state=r.hidden_state,
                    logprobs=[logprobs_to_pb(lp) for lp in r.logprobs],
                )
                for r in out.results
            ],
            timing=timing_to_pb(out.timing, (time.perf_counter() - started) * 1000.0),
        )

    async def Release(self, request: verifier_pb2.ReleaseRequest, context) -> verifier_pb2.ReleaseResponse:
        released = await self._call(context, self.core.release, list(request.request_ids))
        self.metrics.calls.labels("Release").inc()
        return verifier_pb2.ReleaseResponse(released=released)

    async def Info(self, request: verifier_pb2.VerifierInfoRequest, context) -> verifier_pb2.VerifierInfo:
        # Between two model calls, like every other call: it never sees a half-applied batch.
        info = await self._call(context, self.core.info)
        # eos_token_id: the first of them, for clients that read one id (-1: none).
        return verifier_pb2.VerifierInfo(**vars(info), eos_token_id=info.eos_token_ids[0] if info.eos_token_ids else -1)


@dataclass
class VerifierServer:
    """A started server; `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    port: int
    core: VerifierCore
    health: health.aio.HealthServicer
    metrics: VerifierMetrics

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(core: VerifierCore, host: str = "127.0.0.1", port: int = 0,
                       tls: ServerTLS | None = None) -> VerifierServer:
    """Serve `core` on host:port (0 = a free port; TLS with `tls`) with health (SERVING once started) and
    reflection."""
    # Only the scheduler calls the verifier: calls without a trace context are not request work.
    server = grpc.aio.server(interceptors=[*server_interceptors(require_context=True), StatusInterceptor()])
    metrics = VerifierMetrics()
    # The metrics server thread reads these between calls: a scrape may see them a call late.
    runner = core.runner
    metrics.watch(free_slots=lambda: runner.free_slots, kv_cache_tokens=lambda: runner.cached_tokens,
                  kv_cache_capacity_tokens=runner.max_slots * runner.max_seq_len)
    info = core.info()
    metrics.describe_model(model=info.model, device=info.device, dtype=info.dtype, max_seq_len=info.max_seq_len,
                           max_slots=info.max_slots)
    verifier_pb2_grpc.add_VerifierServicer_to_server(VerifierServicer(core, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    bound = bind(server, f"{host}:{port}", tls)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return VerifierServer(server, bound, core, health_servicer, metrics)


async def serve(config: VerifierConfig) -> None:
    """Load the model, serve until SIGTERM/SIGINT, then shut down gracefully."""
    logging.basicConfig(stream=sys.stderr, level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"verifier_svc config:\n{config.describe()}", file=sys.stderr, flush=True)
    tracing = setup_tracing("specdec-verifier")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    started = time.perf_counter()
    core = VerifierCore.from_checkpoint(
        config.model,
        device=config.device,
        dtype=config.dtype,
        max_slots=config.max_slots,
        max_seq_len=config.max_seq_len,
        max_batch_size=config.max_batch_size,
    )
    info = core.info()
    log.info("loaded %s on %s (%s%s, vocab %d, eos %s, context %d) in %.1f s", info.model, info.device, info.dtype,
             ", oneDNN-prepacked projections" if core.runner.weights.prepacked else "", info.vocab_size,
             info.eos_token_ids, info.max_seq_len, time.perf_counter() - started)
    if config.warmup_tokens:
        started = time.perf_counter()
        count = core.runner.warm_up(config.warmup_tokens)
        log.info("warmed up batches of 1..%d tokens in %.1f s", count, time.perf_counter() - started)
    running = await start_server(core, config.host, config.port, config.tls)
    log.info("serving %s on %s:%d (%s)", SERVICE_NAME, config.host, running.port, transport(config.tls))
    if start_metrics_server(config.metrics_port, running.metrics.registry, config.host):
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)

    stop = stop_event()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await running.stop(grace=5.0)
        tracing.shutdown()
        log.info("stopped")

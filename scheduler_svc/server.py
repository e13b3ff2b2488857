"""The scheduler's public side: the Generation servicer, start-up wiring, health and reflection, and the
OpenAI-compatible HTTP API (http_api.py) in the same process and event loop when --http-port is set.

The servicer is thin: generation.start_generation (shared with the HTTP API) validates a GenerateRequest and
starts its completions in the engine; the servicer turns their StreamChunks back into protobuf. A client that
goes away (context cancellation) cancels its request, which frees its state in the verifier and the proposers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.detokenizer import IncrementalDetokenizer
from scheduler_svc.engine import Engine, ModelLimits
from scheduler_svc.generation import GenerationError, start_generation
from scheduler_svc.policy import policy_from_config
from scheduler_svc.profile import profile_costs
from scheduler_svc.clients.proposer import ProposerClient
from scheduler_svc.request import GenerationParams, Request, RequestStats, StreamChunk
from scheduler_svc.telemetry import SchedulerTelemetry
from scheduler_svc.validation import Limits
from scheduler_svc.clients.verifier import VerifierClient
from specdec.pb import generation_pb2, generation_pb2_grpc
from specdec.rpc.security import api_key_interceptors, bind
from specdec.rpc.status import StatusInterceptor
from specdec.contracts import TokenLogprobs, VerifierInfo
from specdec.telemetry.tracing import server_interceptors

if TYPE_CHECKING:
    from scheduler_svc.http.app import HttpServer

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
RETRY_CONNECT_S = 0.5


def load_tokenizer(path: str):
    """The Hugging Face tokenizer in a local folder (never fetched from a hub)."""
    from specdec.model.checkpoint import load_tokenizer as load

    return load(path)


class StartupError(RuntimeError):
    """The configured services cannot work together (the scheduler exits with this message)."""


class Scheduler:
    """Clients, tokenizer and engine of one scheduler; ready once the verifier and every proposer answer Info."""

    def __init__(self, config: SchedulerConfig, tokenizer: Any = None) -> None:
        self.config = config
        self.verifier = VerifierClient(config.verifier, config.verifier_timeout_s, tls=config.internal_tls)
        self.proposers = {
            p.name: ProposerClient(p.name, p.address, timeout_s=config.proposer_timeout_s,
                                   backoff_s=config.proposer_backoff_s, tls=config.internal_tls)
            for p in config.proposers
        }
        self.tokenizer = tokenizer
        self.telemetry = SchedulerTelemetry()
        self.engine: Engine | None = None
        self.limits: Limits | None = None
        self.verifier_info: VerifierInfo | None = None
        self.ready = asyncio.Event()
        # Whether the verifier is reachable now (its channel's state, watched once connected): while it is
        # not, health says NOT_SERVING and new requests are refused at once with UNAVAILABLE.
        self.verifier_up = True
        self.on_readiness: Callable[[bool], Awaitable[None]] | None = None
        self._watch_task: asyncio.Task | None = None
        self._decode: Callable[[Sequence[int]], str] | None = None
        self._token_text: dict[int, str] = {}  # each token alone, decoded (for logprobs), filled on use
        self.model_name = config.model_name or ""  # the name requests use; the checkpoint's folder by default
        self.has_chat_template = False

    async def connect(self) -> None:
        """Wait for the verifier and the proposers, load the tokenizer, start the engine."""
        info = await _until_answered(f"verifier at {self.config.verifier}", self.verifier.info)
        self.verifier_info = info
        for proposer in self.proposers.values():
            proposer.vocab_size = info.vocab_size
            pinfo = await _until_answered(f"proposer {proposer.name} at {proposer.address}", proposer.info)
            log.info("proposer %s: kind=%s max_budget=%d (%s)", proposer.name, pinfo.kind, pinfo.max_budget,
                     pinfo.config)
            if pinfo.active_request_ids:
                # Left over from an earlier scheduler: dropped with the first step's release list.
                log.warning("proposer %s holds %d requests of an earlier scheduler; releasing them", proposer.name,
                            len(pinfo.active_request_ids))
                proposer.release_leftovers(pinfo.active_request_ids)
            if pinfo.hidden_size and pinfo.hidden_size != info.hidden_size:
                raise StartupError(
                    f"proposer {proposer.name} ({pinfo.kind}) reads hidden states of size {pinfo.hidden_size}, but "
                    f"the verifier's model {info.model} has hidden size {info.hidden_size}: its heads were trained "
                    f"for another target; give it heads trained on this one")
        if self.tokenizer is None:
            path = self.config.tokenizer or info.model
            log.info("loading the tokenizer from %s", path)
            self.tokenizer = await asyncio.to_thread(load_tokenizer, path)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust tokenizer directly: faster, and without transformers' space clean-up, which is
            # not prefix-stable and would break incremental decoding.
            self._decode = lambda ids: backend.decode(list(ids), skip_special_tokens=True)
        else:
            self._decode = lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if info.active_request_ids:
            # Left over from an earlier scheduler: nobody will ever finish them.
            log.warning("releasing %d requests the verifier still held", len(info.active_request_ids))
            await self.verifier.release(list(info.active_request_ids))
        self.model_name = self.config.model_name or Path(info.model).name or info.model
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None)) and hasattr(
            self.tokenizer, "apply_chat_template")
        log.info("verifier: model=%s device=%s dtype=%s vocab=%d max_seq_len=%d slots=%d batch=%d eos=%s; served as "
                 "%r, %s chat template", info.model, info.device, info.dtype, info.vocab_size, info.max_seq_len,
                 info.max_slots, info.max_batch_size, list(info.eos_token_ids), self.model_name,
                 "with a" if self.has_chat_template else "without a")
        self.limits = Limits(info.vocab_size, info.max_seq_len, self.config.max_tokens_limit,
                             tuple(self.proposers), longest_token_bytes(self.tokenizer))
        self.engine = Engine(
            verifier=self.verifier,
            proposers=self.proposers,
            policy=policy_from_config(self.config, list(self.proposers)),
            limits=ModelLimits(info.vocab_size, frozenset(info.eos_token_ids), info.max_seq_len, info.max_slots,
                               info.max_batch_size),
            max_waiting=self.config.max_waiting,
            step_record_limit=self.config.step_record_limit,
            backoff_max_s=self.config.verifier_backoff_max_s,
            telemetry=self.telemetry,
        )
        engine = self.engine
        cost_model = engine.policy.cost_model
        if cost_model is not None:  # goodput policies: seed the step-time model before the first step
            report = await profile_costs(
                cost_model, self.verifier, self.proposers, max_k=self.config.max_k, vocab_size=info.vocab_size,
                max_seq_len=info.max_seq_len, slots=engine.capacity, budget_s=self.config.profile_s)
            log.info("start-up cost profile: %d verifier and %s proposer measurements in %.2fs; verify ms = "
                     "%s . (1, batch, batched tokens, context tokens)", report.verify_points,
                     report.proposer_points or 0, report.seconds, cost_model.verify.coef.round(4).tolist())
        self.telemetry.metrics.watch(running=lambda: engine.num_running, waiting=lambda: engine.num_waiting,
                                     free_slots=lambda: max(0, engine.capacity - engine.num_running),
                                     cost_model_error=self._cost_model_error)
        self.engine.start()
        self.ready.set()
        self._watch_task = asyncio.create_task(self._watch_verifier(), name="verifier-watch")

    async def _watch_verifier(self) -> None:
        """Follow the verifier channel's connectivity: up when connected, down when an attempt failed."""
        while True:
            up = self.verifier.reachable(try_to_connect=True)
            if up is not None and up != self.verifier_up:
                self.verifier_up = up
                log.warning("the verifier at %s is %s", self.config.verifier, "reachable again" if up else
                            "unreachable: new requests get UNAVAILABLE, running ones wait for it")
                if self.on_readiness is not None:
                    await self.on_readiness(up)
            await self.verifier.wait_for_state_change()

    def _cost_model_error(self) -> float:
        cost_model = self.engine.policy.cost_model
        error = cost_model.relative_error_ema if cost_model is not None else None
        return float("nan") if error is None else error

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.engine is not None:
            await self.engine.stop()
        for proposer in self.proposers.values():
            await proposer.close()
        await self.verifier.close()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt text, with the special tokens the tokenizer adds (a BOS) unless told not to."""
        if add_special_tokens:
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat messages through the checkpoint's chat template, ready for the assistant's reply.
        The templated text already holds every special token the template writes (a BOS included), so it is
        tokenised without adding them again. A template that refuses the messages raises ValueError."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template's own raise_exception (a jinja2 error), or one it hit
            raise ValueError(f"the model's chat template refused these messages: {exc}") from None
        return self.tokenize(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """One token decoded alone (a piece of a multi-byte character decodes to U+FFFD), cached."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._decode([token_id])
        return text

    def new_request(self, params: GenerationParams, index: int = 0, events: asyncio.Queue | None = None) -> Request:
        request = Request(params, IncrementalDetokenizer(self._decode, params.prompt_token_ids, params.stop),
                          index=index)
        if events is not None:
            request.events = events
        return request

    def model_info(self) -> generation_pb2.ModelInfoResponse:
        info = self.verifier_info
        return generation_pb2.ModelInfoResponse(
            model=self.model_name, context_length=info.max_seq_len, vocab_size=info.vocab_size,
            has_chat_template=self.has_chat_template, max_tokens_limit=self.config.max_tokens_limit,
            eos_token_ids=info.eos_token_ids, proposers=list(self.proposers))


async def _until_answered(what: str, call: Callable[[], Awaitable[Any]]) -> Any:
    """Retry `call` until it answers; logs while waiting."""
    attempts = 0
    while True:
        try:
            return await call()
        except Exception as exc:  # any RPC failure: the service is not up yet
            if attempts % 20 == 0:
                log.info("waiting for the %s: %s", what, str(exc).splitlines()[0][:200])
            attempts += 1
            await asyncio.sleep(RETRY_CONNECT_S)


def longest_token_bytes(tokenizer: Any, default: int = 64) -> int:
    """Most UTF-8 bytes of one vocabulary entry: an upper bound on the bytes one token stands for (a byte-level
    entry spells each byte as one character; a sentencepiece one spells a space as the 3-byte '▁')."""
    source = getattr(tokenizer, "backend_tokenizer", tokenizer)
    try:
        vocab = source.get_vocab(with_added_tokens=True) if source is not tokenizer else tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary listing: the generous default
        return default
    return max((len(piece.encode("utf-8")) for piece in vocab), default=default)


def stats_to_pb(stats: RequestStats) -> generation_pb2.GenerationStats:
    return generation_pb2.GenerationStats(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        steps=stats.steps,
        proposed=stats.proposed,
        accepted=stats.accepted,
        proposers={
            name: generation_pb2.ProposerStats(steps=c.steps, proposed=c.proposed, accepted=c.accepted)
            for name, c in stats.proposers.items()
        },
        time_to_first_token_ms=stats.time_to_first_token_ms,
        total_ms=stats.total_ms,
    )


def logprobs_to_pb(scheduler: Scheduler, logprobs: Sequence[TokenLogprobs]) -> list[generation_pb2.TokenLogprob]:
    text = scheduler.token_text
    return [
        generation_pb2.TokenLogprob(
            token_id=lp.token_id, token=text(lp.token_id), logprob=lp.logprob,
            top_logprobs=[generation_pb2.LogprobCandidate(token_id=t, token=text(t), logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]


def chunk_to_pb(chunk: StreamChunk, scheduler: Scheduler | None = None) -> generation_pb2.GenerateResponse:
    msg = generation_pb2.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text, index=chunk.index)
    if chunk.finish_reason is not None:
        msg.finish_reason = chunk.finish_reason.value
    if chunk.stats is not None:
        msg.stats.CopyFrom(stats_to_pb(chunk.stats))
    if chunk.logprobs:
        msg.logprobs.extend(logprobs_to_pb(scheduler, chunk.logprobs))
    return msg


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """specdec.v1.Generation over a Scheduler (the same generation.start_generation as the HTTP API)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def Generate(self, request, context):
        generation = await self._start(request, context)
        try:
            async for chunk in generation.chunks():
                yield chunk_to_pb(chunk, self.scheduler)
        except GenerationError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        finally:
            generation.close()  # cancels what is unfinished (the client went away): its state is freed

    async def GenerateUnary(self, request, context):
        generation = await self._start(request, context)
        n = generation.n
        completions = [generation_pb2.Completion(index=i) for i in range(n)]
        texts: list[list[str]] = [[] for _ in range(n)]
        try:
            async for chunk in generation.chunks():
                completion = completions[chunk.index]
                completion.token_ids.extend(chunk.token_ids)
                texts[chunk.index].append(chunk.text)
                if chunk.logprobs:
                    completion.logprobs.extend(logprobs_to_pb(self.scheduler, chunk.logprobs))
                if chunk.finish_reason is not None:
                    completion.finish_reason = chunk.finish_reason.value
                    completion.stats.CopyFrom(stats_to_pb(chunk.stats))
        except GenerationError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        finally:
            generation.close()
        for completion, text in zip(completions, texts):
            completion.text = "".join(text)
        first = completions[0]
        return generation_pb2.GenerateResult(
            text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason, stats=first.stats,
            logprobs=first.logprobs, completions=completions)

    async def ModelInfo(self, request, context):
        if not self.scheduler.ready.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the scheduler is starting: it waits for its verifier and proposers; retry shortly")
        return self.scheduler.model_info()

    async def _start(self, request: generation_pb2.GenerateRequest, context):
        try:
            return await start_generation(self.scheduler, request)
        except GenerationError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)


@dataclass
class SchedulerServer:
    """A running scheduler: its gRPC server, bound port, and the Scheduler behind it."""

    server: grpc.aio.Server
    port: int
    scheduler: Scheduler
    health: health.aio.HealthServicer
    connect_task: asyncio.Task
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API, when --http-port is set

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, finish in-flight calls within the grace time, close clients."""
        grace_s = grace_s if grace_s is not None else self.scheduler.config.grace_s
        await self.health.enter_graceful_shutdown()
        self.connect_task.cancel()
        if self.http is not None:
            await asyncio.gather(self.server.stop(grace_s), self.http.stop(grace_s))
        else:
            await self.server.stop(grace_s)
        await self.scheduler.close()


async def start_server(config: SchedulerConfig, tokenizer: Any = None) -> SchedulerServer:
    """Bind and start the gRPC server now; the scheduler connects in the background (health says when)."""
    scheduler = Scheduler(config, tokenizer)
    # The key check comes first: a refused call does no work, traced or otherwise.
    server = grpc.aio.server(interceptors=[*api_key_interceptors(config.accepted_api_keys()), *server_interceptors(),
                                           StatusInterceptor()],
                             options=[("grpc.max_receive_message_length", config.max_request_bytes)])
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(scheduler), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = bind(server, f"{config.host}:{config.port}", config.tls)
    await server.start()
    http = None
    if config.http_port:
        # Imported here: a scheduler without the HTTP API does not load FastAPI.
        from scheduler_svc.http.app import start_http_server

        try:
            http = await start_http_server(scheduler, config.host, config.http_port, config.tls, config.grace_s)
        except BaseException:
            await server.stop(0)
            raise

    async def set_health(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    async def connect() -> None:
        scheduler.on_readiness = set_health
        await scheduler.connect()
        await set_health(scheduler.verifier_up)
        log.info("scheduler ready on %s:%d", config.host, port)

    task = asyncio.create_task(connect(), name="scheduler-connect")
    return SchedulerServer(server, port, scheduler, health_servicer, task, http)

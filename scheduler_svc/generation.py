"""One code path behind both public doors: the gRPC Generation servicer (server.py) and the OpenAI-compatible
HTTP API (http_api.py) each turn their input into a GenerateRequest, then call `start_generation`, which
checks readiness, validates (validation.validate_request), starts the call's n completions in the engine and
hands back a `Generation` to read chunks from. The two doors therefore answer the same input the same way;
only the wire formats differ.

Failures are GenerationError with a grpc.StatusCode name; each door maps it to its own status (gRPC code,
HTTP status + OpenAI error JSON).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from scheduler_svc.engine import QueueFull
from scheduler_svc.request import GenerationParams, Request, RequestFailed, StreamChunk
from scheduler_svc.validation import prompt_chars, validate_request
from specdec.pb import generation_pb2
from specdec.rpc.status import MAX_MESSAGE_CHARS

if TYPE_CHECKING:
    from scheduler_svc.server import Scheduler

# Prompts longer than this are tokenised on a worker thread, so that the event loop (every other request's
# stream) does not wait for them; shorter ones are tokenised in place, which costs less than the hop.
TOKENIZE_IN_THREAD_CHARS = 4096
_SEED_MASK = (1 << 64) - 1


class GenerationError(Exception):
    """The call cannot go on. `code` is a grpc.StatusCode name (INVALID_ARGUMENT, UNAVAILABLE,
    RESOURCE_EXHAUSTED, INTERNAL, ...); the message is meant for a person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message[:MAX_MESSAGE_CHARS]


class Generation:
    """The n engine requests of one call. Read `chunks()` (or `next_chunk()`); `close()` when done, in a
    finally: it cancels whatever is unfinished (freeing its state everywhere) and records the outcomes."""

    def __init__(self, scheduler: Scheduler, params: GenerationParams, requests: list[Request],
                 events: asyncio.Queue) -> None:
        self.scheduler = scheduler
        self.params = params
        self.requests = requests
        self._events = events
        self._unfinished = len(requests)
        self._failed = False
        self._closed = False

    @property
    def n(self) -> int:
        return len(self.requests)

    @property
    def prompt_tokens(self) -> int:
        return len(self.params.prompt_token_ids)

    @property
    def done(self) -> bool:
        """Every completion has sent its last chunk."""
        return self._unfinished == 0

    async def next_chunk(self) -> StreamChunk | None:
        """The next chunk of any completion (chunks carry `index`), None once every completion has ended;
        raises GenerationError when the engine failed one of them (the call fails as a whole)."""
        if self._unfinished == 0:
            return None
        event = await self._events.get()
        if isinstance(event, RequestFailed):
            self._failed = True
            raise GenerationError(event.code, event.message)
        if event.finish_reason is not None:
            self._unfinished -= 1
        return event

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Every chunk until each completion has ended; tokens count as sent once the door takes the next."""
        telemetry = self.scheduler.telemetry
        while (chunk := await self.next_chunk()) is not None:
            yield chunk
            telemetry.tokens_sent(len(chunk.token_ids))  # after the yield: handed to the door's transport

    def close(self) -> None:
        """Cancel the unfinished completions (a no-op for finished ones) and record every outcome; idempotent."""
        if self._closed:
            return
        self._closed = True
        engine, telemetry = self.scheduler.engine, self.scheduler.telemetry
        for request in self.requests:
            engine.cancel(request)
            telemetry.request_ended(request, _outcome(request, self._failed))


async def start_generation(scheduler: Scheduler, request: generation_pb2.GenerateRequest, *,
                           default_max_tokens: bool = False) -> Generation:
    """Validate `request` and start its completions; raises GenerationError (UNAVAILABLE while the scheduler
    is starting or its verifier is unreachable, INVALID_ARGUMENT for bad input, RESOURCE_EXHAUSTED when full).
    default_max_tokens: see validation.validate_request."""
    if not scheduler.ready.is_set():
        raise GenerationError("UNAVAILABLE",
                              "the scheduler is starting: it waits for its verifier and proposers; retry shortly")
    if not scheduler.verifier_up:
        raise GenerationError("UNAVAILABLE",
                              f"the verifier at {scheduler.config.verifier} is unreachable; retry shortly")
    render_chat = scheduler.render_chat if scheduler.has_chat_template else None
    try:
        if prompt_chars(request) > TOKENIZE_IN_THREAD_CHARS:
            params = await asyncio.to_thread(validate_request, request, scheduler.limits, scheduler.tokenize,
                                             render_chat, default_max_tokens=default_max_tokens)
        else:
            params = validate_request(request, scheduler.limits, scheduler.tokenize, render_chat,
                                      default_max_tokens=default_max_tokens)
    except ValueError as exc:
        raise GenerationError("INVALID_ARGUMENT", str(exc)) from None
    events: asyncio.Queue = asyncio.Queue()
    requests = [scheduler.new_request(completion_params(params, i), index=i, events=events) for i in range(params.n)]
    for req in requests:
        scheduler.telemetry.request_started(req)
    try:
        scheduler.engine.submit(*requests)
    except QueueFull as exc:
        for req in requests:
            scheduler.telemetry.request_ended(req, "rejected")
        raise GenerationError("RESOURCE_EXHAUSTED", str(exc)) from None
    return Generation(scheduler, params, requests, events)


def completion_params(params: GenerationParams, index: int) -> GenerationParams:
    """The parameters of completion `index`: with a seed, it samples with seed + index, so that the n
    completions differ and each is reproducible."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) & _SEED_MASK)


def _outcome(request: Request, failed: bool) -> str:
    """The `finish_reason` label of an ended request: length / eos / stop, failed, or cancelled."""
    if request.finish_reason is not None:
        return request.finish_reason.name.lower()
    return "failed" if failed else "cancelled"

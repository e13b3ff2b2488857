"""The OpenAI-compatible HTTP API: FastAPI on uvicorn, inside the scheduler's process and event loop.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events with
`stream: true`), GET /health. A request goes through openai_schema (pydantic: JSON shape, OpenAI fields this
server does not serve) into a GenerateRequest, then through generation.start_generation like a gRPC call: one
validation, one engine, the same answers. Errors are OpenAI's JSON shape, {"error": {"message", "type",
"param", "code"}}, with the status of the gRPC code (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, unknown model
404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503). With API keys configured, every /v1 route needs
`Authorization: Bearer <key>` (the gRPC API's keys); /health stays open. A client that disconnects cancels its
request everywhere (verifier slot, proposer state). docs/http.md is the user's guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler_svc.generation import Generation, GenerationError, start_generation
from scheduler_svc.http.schema import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    InvalidField,
    ModelCard,
    ModelList,
    chat_logprobs,
    chat_to_pb,
    completion_logprobs,
    completion_to_pb,
    finish_reason_name,
    speculation_of,
    usage_of,
)
from scheduler_svc.request import StreamChunk
from specdec.rpc.security import AUTH_METADATA_KEY, ApiKeyInterceptor, ServerTLS
from specdec.rpc.status import MAX_MESSAGE_CHARS

if TYPE_CHECKING:
    from scheduler_svc.server import Scheduler

log = logging.getLogger(__name__)

# Largest request body read (JSON); a longer one gets 413 before it is parsed. Far above any prompt the
# context can hold (validation bounds those in characters), far below what would hurt the process.
MAX_BODY_BYTES = 8 * 1024 * 1024
# A gRPC status code name -> (HTTP status, OpenAI error type).
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
}
SSE_DONE = "data: [DONE]\n\n"


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.param, self.code = status, type_, message, param, code

    @classmethod
    def from_generation(cls, exc: GenerationError) -> ApiError:
        status, type_ = STATUS.get(exc.code, (500, "server_error"))
        return cls(status, type_, exc.message, code=exc.code.lower())

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


def _sse(model) -> str:
    """One server-sent event carrying a JSON object (fields never set are left out)."""
    return f"data: {model.model_dump_json(exclude_unset=True)}\n\n"


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


class BodyLimit:
    """ASGI middleware: reads a request's body first, at most `limit` bytes (a longer one gets 413 before
    anything parses it), then hands it to the app whole; later receives (a disconnect) pass through."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # gone before sending its body
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                error = ApiError(413, "invalid_request_error", f"the request body is larger than {self.limit} bytes")
                return await error.response()(scope, receive, send)
            parts.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(parts), "more_body": False}

        async def replay():
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)


class OpenAIApi:
    """The routes over one Scheduler."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        keys = scheduler.config.accepted_api_keys()
        self._keys = ApiKeyInterceptor(keys) if keys else None
        self.created = int(time.time())

    # -- checks shared by the routes -------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self._keys is None:
            return
        header = request.headers.get(AUTH_METADATA_KEY)
        reason = self._keys.check([] if header is None else [(AUTH_METADATA_KEY, header)])
        if reason is not None:
            if header is None:
                reason = "missing API key: send the header 'Authorization: Bearer <key>'"
            raise ApiError(401, "authentication_error", reason, code="invalid_api_key")

    def check_ready(self) -> None:
        scheduler = self.scheduler
        if not scheduler.ready.is_set():
            raise ApiError(503, "service_unavailable",
                           "the scheduler is starting: it waits for its verifier and proposers; retry shortly",
                           code="unavailable")

    def check_model(self, model: str) -> None:
        if model != self.scheduler.model_name:
            raise ApiError(404, "invalid_request_error",
                           f"the model {model[:64]!r} does not exist: this server serves {self.scheduler.model_name!r}",
                           param="model", code="model_not_found")

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.scheduler.model_name, created=self.created,
                         max_model_len=self.scheduler.verifier_info.max_seq_len)

    # -- routes ----------------------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        scheduler = self.scheduler
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503)
        if not scheduler.verifier_up:
            return JSONResponse({"status": "verifier unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        self.check_ready()
        return _json(ModelList(data=[self.model_card()]))

    async def model(self, model: str, request: Request) -> Response:
        self.check_key(request)
        self.check_ready()
        self.check_model(model)
        return _json(self.model_card())

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        generation = await self._start(request, body, completion_to_pb)
        with_top = bool(body.logprobs)
        reply = Reply("cmpl", self.scheduler.model_name)
        token_text = self.scheduler.token_text
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            offsets = [0] * generation.n

            async def events() -> AsyncIterator[str]:
                async for chunk in _chunks(generation):
                    logprobs = None
                    if chunk.logprobs is not None:
                        logprobs = completion_logprobs(chunk.logprobs, token_text, with_top, offsets[chunk.index])
                    offsets[chunk.index] += len(chunk.text)
                    choice = CompletionChoice(text=chunk.text, index=chunk.index, logprobs=logprobs,
                                              finish_reason=finish_reason_name(chunk.finish_reason))
                    event = CompletionChunk(id=reply.id, created=reply.created, model=reply.model, choices=[choice])
                    if chunk.stats is not None:
                        event.speculation = speculation_of([chunk.stats])
                    yield _sse(event)
                if include_usage:
                    yield _sse(CompletionChunk(id=reply.id, created=reply.created, model=reply.model, choices=[],
                                               usage=_usage(generation)))
                yield SSE_DONE

            return _event_stream(events(), generation)
        pieces = await _collect(request, generation)
        choices = []
        for i, piece in enumerate(pieces):
            logprobs = completion_logprobs(piece.logprobs, token_text, with_top) if body.logprobs is not None else None
            choices.append(CompletionChoice(text=piece.text, index=i, logprobs=logprobs,
                                            finish_reason=finish_reason_name(piece.finish_reason)))
        return _json(Completion(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                                usage=_usage(generation), speculation=speculation_of([p.stats for p in pieces])))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        generation = await self._start(request, body, chat_to_pb)
        reply = Reply("chatcmpl", self.scheduler.model_name)
        token_text = self.scheduler.token_text
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            def event(choice: ChatChunkChoice, **fields) -> str:
                return _sse(ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.model,
                                                choices=[choice], **fields))

            async def events() -> AsyncIterator[str]:
                # OpenAI's first chunk of each choice names the role.
                for i in range(generation.n):
                    yield event(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""),
                                                logprobs=None, finish_reason=None))
                async for chunk in _chunks(generation):
                    logprobs = chat_logprobs(chunk.logprobs, token_text) if chunk.logprobs is not None else None
                    choice = ChatChunkChoice(index=chunk.index, delta=ChatDelta(content=chunk.text), logprobs=logprobs,
                                             finish_reason=finish_reason_name(chunk.finish_reason))
                    if chunk.stats is not None:
                        yield event(choice, speculation=speculation_of([chunk.stats]))
                    else:
                        yield event(choice)
                if include_usage:
                    yield _sse(ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.model, choices=[],
                                                   usage=_usage(generation)))
                yield SSE_DONE

            return _event_stream(events(), generation)
        pieces = await _collect(request, generation)
        choices = [
            ChatChoice(index=i, message=ChatMessageOut(content=piece.text),
                       logprobs=chat_logprobs(piece.logprobs, token_text) if body.logprobs else None,
                       finish_reason=finish_reason_name(piece.finish_reason))
            for i, piece in enumerate(pieces)
        ]
        return _json(ChatCompletion(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                                    usage=_usage(generation), speculation=speculation_of([p.stats for p in pieces])))

    async def _start(self, request: Request, body, to_pb) -> Generation:
        self.check_key(request)
        self.check_ready()
        self.check_model(body.model)
        try:
            generate_request = to_pb(body)
        except InvalidField as exc:
            raise ApiError(400, "invalid_request_error", str(exc), param=exc.param) from None
        try:
            return await start_generation(self.scheduler, generate_request,
                                          default_max_tokens=generate_request.max_tokens == 0
                                          and body.max_tokens is None
                                          and getattr(body, "max_completion_tokens", None) is None)
        except GenerationError as exc:
            raise ApiError.from_generation(exc) from None


class Reply:
    """The id, creation time and model every object of one response repeats."""

    __slots__ = ("id", "created", "model")

    def __init__(self, prefix: str, model: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model


@dataclass
class _Piece:
    """One completion, whole."""

    text: str
    token_ids: list[int]
    logprobs: list
    finish_reason: object
    stats: object


def _usage(generation: Generation):
    completion_tokens = sum(r.num_output for r in generation.requests)
    return usage_of(generation.prompt_tokens, completion_tokens)


async def _chunks(generation: Generation) -> AsyncIterator[StreamChunk]:
    """The generation's chunks; an engine failure mid-stream ends the stream with an error event (the status
    line is sent already), in OpenAI's error shape."""
    try:
        async for chunk in generation.chunks():
            yield chunk
    except GenerationError as exc:
        error = ApiError.from_generation(exc)
        raise _StreamError(ErrorResponse(error=ErrorBody(message=error.message, type=error.type,
                                                         code=error.code))) from None


class _StreamError(Exception):
    def __init__(self, body: ErrorResponse) -> None:
        self.body = body


def _event_stream(events: AsyncIterator[str], generation: Generation) -> StreamingResponse:
    """Server-sent events. The generation is closed when the stream ends, fails or the client disconnects
    (Starlette cancels the stream; the background task covers a disconnect before the first event)."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except _StreamError as exc:
            yield f"data: {exc.body.model_dump_json()}\n\n"
        finally:
            generation.close()

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(generation.close))


async def _collect(request: Request, generation: Generation) -> list[_Piece]:
    """Every completion whole; a client that disconnects meanwhile cancels them (everywhere)."""

    async def collect() -> list[_Piece]:
        texts: list[list[str]] = [[] for _ in range(generation.n)]
        pieces = [_Piece("", [], [], None, None) for _ in range(generation.n)]
        async for chunk in generation.chunks():
            piece = pieces[chunk.index]
            texts[chunk.index].append(chunk.text)
            piece.token_ids.extend(chunk.token_ids)
            if chunk.logprobs:
                piece.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                piece.finish_reason, piece.stats = chunk.finish_reason, chunk.stats
        for piece, text in zip(pieces, texts):
            piece.text = "".join(text)
        return pieces

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            raise ApiError(499, "invalid_request_error", "the client disconnected")
        try:
            return work.result()
        except GenerationError as exc:
            raise ApiError.from_generation(exc) from None
    finally:
        watch.cancel()
        generation.close()


def create_app(scheduler: Scheduler) -> FastAPI:
    """The FastAPI application of the OpenAI-compatible API over `scheduler`."""
    api = OpenAIApi(scheduler)
    app = FastAPI(title="specdec", summary="OpenAI-compatible API of a speculative-decoding server",
                  version="1", redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, "invalid_request_error", str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_json(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    app.add_api_route("/health", api.health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", api.model, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    return app


def validation_error(errors) -> ApiError:
    """The first of pydantic's errors as a 400: the field's path (OpenAI's `param`) and what is wrong with it."""
    error = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if error.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}: this server does not support it"
    elif error.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {error.get('msg')}"
        param = None
    elif error.get("type") == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {error.get('msg')}" if param else str(error.get("msg"))
    return ApiError(400, "invalid_request_error", message[:MAX_MESSAGE_CHARS], param=param)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the scheduler's event loop: the scheduler, not uvicorn, handles SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class HttpServer:
    """The running HTTP API: its uvicorn server, the task that runs it, and the bound port."""

    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop listening, give open responses `grace_s`, then cancel them (their requests are cancelled)."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace_s + 5.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.task.cancel()


async def start_http_server(scheduler: Scheduler, host: str, port: int, tls: ServerTLS | None = None,
                            grace_s: float = 5.0) -> HttpServer:
    """Bind host:port (0 = a free port) now and serve the API on this event loop in a task."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP, and accepted
    # connections inherit it; with proto 0 every response on a kept-alive connection waited ~40 ms for the
    # client's delayed ACK between its header and body writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"--http-port: cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    ssl_args = {}
    if tls is not None:
        ssl_args = dict(ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file)
        if tls.client_ca_file:
            ssl_args.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    # h11, uvicorn's pure-Python HTTP/1.1: httptools (uvicorn[standard]) measured no gain here (bench/http_overhead).
    config = uvicorn.Config(BodyLimit(create_app(scheduler)), http="h11", lifespan="off", access_log=False,
                            log_config=None, timeout_graceful_shutdown=grace_s, server_header=False, **ssl_args)
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-api")
    return HttpServer(server, task, sock.getsockname()[1])

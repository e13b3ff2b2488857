"""Sync and async clients of the public `specdec.v1.Generation` API (served by the scheduler).

Retries: a call that fails with UNAVAILABLE before the first streamed message arrived is retried with
exponential backoff (tenacity), `retries` times at most and never past the call's deadline. Once a message was
received the request is running on the server and its tokens may have been shown to the user, so a failure
after that raises: a stream is never silently restarted (a restart could even produce different tokens when
sampling without a seed).

Deadlines: `timeout` (seconds) bounds the whole call, retries and backoff included; the client's `timeout`
is the default of every call, a call's `timeout` overrides it. None means no deadline.

Security: with `api_key` (or SPECDEC_API_KEY) every call carries `authorization: Bearer <key>`; a refused
key raises Unauthenticated at once (no retry). Any TLS argument (`tls`, `tls_ca`, `root_certificates`,
`tls_cert` + `tls_key`) makes the channel TLS; see specdec_client/credentials.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence

import grpc
import tenacity
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.pb import generation_pb2, generation_pb2_grpc
from specdec_client.credentials import auth_metadata, channel_credentials, resolve_api_key
from specdec_client.errors import DeadlineExceeded, SpecdecError, from_rpc_error
from specdec_client.tracing import CallSpan
from specdec_client.types import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    LogprobCandidate,
    ModelInfo,
    ProposerStats,
    TokenLogprob,
)

# Chat messages: {"role": ..., "content": ...} mappings, or (role, content) pairs.
Messages = Sequence[Mapping[str, str] | tuple[str, str]]

DEFAULT_TARGET = "127.0.0.1:50051"

# gRPC's default reconnect backoff grows to minutes; a client that retries for a few seconds needs the
# channel to actually try to reconnect within that time.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

_FINISH_REASONS = {
    generation_pb2.FINISH_REASON_LENGTH: FINISH_LENGTH,
    generation_pb2.FINISH_REASON_EOS: FINISH_EOS,
    generation_pb2.FINISH_REASON_STOP: FINISH_STOP,
}


# ---------------------------------------------------------------------------------------------------------
# protobuf <-> plain types


def build_request(
    prompt: str | Sequence[int] | None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    proposer: str = "",
    ignore_eos: bool = False,
    n: int = 1,
    logprobs: bool = False,
    top_logprobs: int = 0,
    messages: Messages | None = None,
) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; a prompt given as a sequence of ints is sent as token ids,
    chat `messages` (with prompt None) go through the server's chat template."""
    request = generation_pb2.GenerateRequest(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, proposer=proposer, ignore_eos=ignore_eos,
        n=n, logprobs=logprobs or top_logprobs > 0, top_logprobs=top_logprobs,
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.extend(int(t) for t in prompt)
    for message in messages or ():
        role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message
        request.messages.add(role=role, content=content)
    # Optional fields stay unset (not 0) when not given: unset top_p means 1, unset seed means random.
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    if stop:
        request.stop.extend([stop] if isinstance(stop, str) else list(stop))
    return request


def stats_from_proto(message: generation_pb2.GenerationStats) -> GenerationStats:
    """Plain stats from the protobuf message."""
    return GenerationStats(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        steps=message.steps,
        proposed=message.proposed,
        accepted=message.accepted,
        proposers={
            name: ProposerStats(p.steps, p.proposed, p.accepted) for name, p in sorted(message.proposers.items())
        },
        time_to_first_token_ms=message.time_to_first_token_ms,
        total_ms=message.total_ms,
    )


def logprobs_from_proto(messages) -> list[TokenLogprob]:
    return [TokenLogprob(lp.token_id, lp.token, lp.logprob,
                         [LogprobCandidate(t.token_id, t.token, t.logprob) for t in lp.top_logprobs])
            for lp in messages]


def chunk_from_proto(message: generation_pb2.GenerateResponse) -> GenerationChunk:
    """One streamed message as a chunk; finish_reason and stats only on a completion's last one."""
    finish_reason = _FINISH_REASONS.get(message.finish_reason)
    return GenerationChunk(
        token_ids=list(message.token_ids),
        text=message.text,
        finish_reason=finish_reason,
        stats=stats_from_proto(message.stats) if finish_reason is not None else None,
        index=message.index,
        logprobs=logprobs_from_proto(message.logprobs) if message.logprobs else None,
    )


def _completion_from_proto(message, logprobs: bool) -> Completion:
    finish_reason = _FINISH_REASONS.get(message.finish_reason)
    if finish_reason is None:
        raise SpecdecError(f"the server returned a result without a finish reason ({message.finish_reason})")
    return Completion(text=message.text, token_ids=list(message.token_ids), finish_reason=finish_reason,
                      stats=stats_from_proto(message.stats),
                      logprobs=logprobs_from_proto(message.logprobs) if logprobs else None,
                      index=getattr(message, "index", 0))


def result_from_proto(message: generation_pb2.GenerateResult, logprobs: bool = False) -> GenerationResult:
    """A unary GenerateResult as a plain result (logprobs: whether they were asked for)."""
    # A server from before `completions` sends completion 0's fields only.
    completions = [_completion_from_proto(c, logprobs) for c in message.completions] or [
        _completion_from_proto(message, logprobs)]
    first = completions[0]
    return GenerationResult(first.text, first.token_ids, first.finish_reason, first.stats, first.logprobs, 0,
                            completions)


def model_info_from_proto(message: generation_pb2.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(model=message.model, context_length=message.context_length, vocab_size=message.vocab_size,
                     has_chat_template=message.has_chat_template, max_tokens_limit=message.max_tokens_limit,
                     eos_token_ids=list(message.eos_token_ids), proposers=list(message.proposers))


class _Assembler:
    """Joins streamed chunks into the whole result, which exists once every completion's last chunk arrived."""

    def __init__(self, n: int = 1, logprobs: bool = False) -> None:
        self._text: list[list[str]] = [[] for _ in range(n)]
        self._token_ids: list[list[int]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprob]] | None = [[] for _ in range(n)] if logprobs else None
        self._done: list[Completion | None] = [None] * n
        self.result: GenerationResult | None = None

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self._token_ids)

    def add(self, chunk: GenerationChunk) -> None:
        i = chunk.index
        if not 0 <= i < len(self._done):
            raise SpecdecError(f"the server sent a chunk of completion {i} of {len(self._done)}")
        self._text[i].append(chunk.text)
        self._token_ids[i].extend(chunk.token_ids)
        if self._logprobs is not None and chunk.logprobs:
            self._logprobs[i].extend(chunk.logprobs)
        if chunk.is_last:
            assert chunk.finish_reason is not None and chunk.stats is not None
            self._done[i] = Completion("".join(self._text[i]), list(self._token_ids[i]), chunk.finish_reason,
                                       chunk.stats, None if self._logprobs is None else self._logprobs[i], i)
            if all(c is not None for c in self._done):
                first = self._done[0]
                self.result = GenerationResult(first.text, first.token_ids, first.finish_reason, first.stats,
                                               first.logprobs, 0, list(self._done))

    def finish(self) -> GenerationResult:
        if self.result is None:
            raise SpecdecError("the server ended the stream without the last message of every completion "
                               "(no finish reason)")
        return self.result


# ---------------------------------------------------------------------------------------------------------
# deadlines and retries


class _Deadline:
    """The absolute end of one call, shared by its attempts."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (None: no deadline); raises DeadlineExceeded when none are left."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"deadline of {self.timeout:g} s exceeded")
        return left


def _is_unavailable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def _retry_settings(retries: int, backoff_s: float, backoff_max_s: float, deadline: _Deadline) -> dict:
    stop = tenacity.stop_after_attempt(retries + 1)
    if deadline.timeout is not None:
        # Do not sleep into a deadline that the next attempt could not meet anyway.
        stop = stop | tenacity.stop_before_delay(deadline.timeout)
    return dict(
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=backoff_s, max=backoff_max_s),
        retry=tenacity.retry_if_exception(_is_unavailable),
        reraise=True,
    )


class _Options:
    """What sync and async clients share: target, default deadline, retry settings, and the credentials
    (channel TLS, and the API key's metadata sent with every call)."""

    def __init__(self, target: str, timeout: float | None, retries: int, backoff_s: float, backoff_max_s: float,
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.metadata = auth_metadata(resolve_api_key(api_key))
        self.credentials = credentials

    def call_metadata(self, trace_metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """A call's metadata: its trace context and the API key."""
        return (*trace_metadata, *self.metadata)

    def deadline(self, timeout: float | None) -> _Deadline:
        return _Deadline(self.timeout if timeout is None else timeout)

    def retrying(self, deadline: _Deadline) -> tenacity.Retrying:
        return tenacity.Retrying(**_retry_settings(self.retries, self.backoff_s, self.backoff_max_s, deadline))

    def async_retrying(self, deadline: _Deadline) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            **_retry_settings(self.retries, self.backoff_s, self.backoff_max_s, deadline)
        )


def _not_ready_message(target: str, timeout: float, last: str) -> str:
    return f"{target} did not report SERVING within {timeout:g} s (last health answer: {last})"


# ---------------------------------------------------------------------------------------------------------
# sync client


class GenerationStream:
    """Iterator over the chunks of one streamed generation.

    `.result` is the whole completion once the last chunk arrived (None before); `collect()` reads what is
    left and returns it. Leaving the loop early (or `cancel()`) cancels the call on the server.
    """

    def __init__(self, options: _Options, open_call: Callable[[float | None, Sequence[tuple[str, str]]], grpc.Call],
                 deadline: _Deadline, n: int = 1, logprobs: bool = False):
        self._options = options
        self._open_call = open_call
        self._deadline = deadline
        self._assembler = _Assembler(n, logprobs)
        self._call: grpc.Call | None = None
        self._span = CallSpan("Generate")
        self._chunks = self._iterate()

    @property
    def result(self) -> GenerationResult | None:
        return self._assembler.result

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        return next(self._chunks)

    def collect(self) -> GenerationResult:
        """Read the rest of the stream and return the whole completion."""
        for _ in self._chunks:
            pass
        return self._assembler.finish()

    def cancel(self) -> None:
        """Stop the generation: the server frees the request's state. Safe from another thread, where the
        iterating thread then gets Cancelled."""
        if self._call is not None:
            self._call.cancel()
        try:
            self._chunks.close()
            self._span.end()  # when iteration never started
        except ValueError:  # the generator is running in another thread; the cancelled call ends it
            pass

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()

    def _iterate(self) -> Iterator[GenerationChunk]:
        try:
            yield from self._chunks_of_call()
        except Exception as exc:
            self._span.fail(exc)
            raise
        finally:
            self._span.end(self._assembler.tokens)

    def _chunks_of_call(self) -> Iterator[GenerationChunk]:
        metadata = self._options.call_metadata(self._span.start())
        try:
            for attempt in self._options.retrying(self._deadline):
                with attempt:
                    self._call = call = self._open_call(self._deadline.remaining(), metadata)
                    message = next(call, None)  # the first message: from here on, no retry
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        try:
            while message is not None:
                chunk = chunk_from_proto(message)
                self._assembler.add(chunk)
                yield chunk
                message = next(call, None)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()  # a no-op after a normal end; frees the server's work when the caller stops early
        self._assembler.finish()


class Client:
    """Blocking client of the Generation API. Use as a context manager, or call close()."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        retries: int = 3,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        root_certificates: bytes | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ):
        """`timeout`: default deadline of every call in seconds; `retries`: extra attempts on UNAVAILABLE
        before the first message, spaced by exponential backoff from `backoff_s` up to `backoff_max_s`.

        `api_key`: sent as `authorization: Bearer <key>` on every call (default: SPECDEC_API_KEY, if set).
        TLS: `tls=True` trusts gRPC's default roots; `tls_ca` (a PEM file) or `root_certificates` (PEM
        bytes) trusts that CA instead; `tls_cert` + `tls_key` (PEM files) present a client certificate
        to a server that requires one. Without any of them the channel is plaintext."""
        credentials = channel_credentials(tls=tls, tls_ca=tls_ca, root_certificates=root_certificates,
                                          tls_cert=tls_cert, tls_key=tls_key)
        self._options = _Options(target, timeout, retries, backoff_s, backoff_max_s, api_key, credentials)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def target(self) -> str:
        return self._options.target

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        proposer: str = "",
        ignore_eos: bool = False,
        timeout: float | None = None,
        *,
        n: int = 1,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> GenerationResult:
        """Generate a completion and return it whole. Raises a SpecdecError subclass on failure.

        n: independent completions (result.completions; with a seed, completion i samples with seed + i).
        logprobs: each token's log-probability under the target (result.logprobs); top_logprobs: also the
        most likely tokens at each position, 0..20 (implies logprobs)."""
        request = build_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, proposer, ignore_eos,
                                n, logprobs, top_logprobs)
        return self._unary(request, timeout)

    def chat(self, messages: Messages, max_tokens: int = 64, timeout: float | None = None,
             **options) -> GenerationResult:
        """The assistant's reply to chat `messages` ({"role", "content"} mappings or (role, content) pairs),
        rendered by the server with the model's chat template; options as for generate."""
        request = build_request(None, max_tokens, messages=messages, **options)
        return self._unary(request, timeout)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        proposer: str = "",
        ignore_eos: bool = False,
        timeout: float | None = None,
        *,
        n: int = 1,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> GenerationStream:
        """Generate a completion, yielding the tokens of each engine step as they are accepted.

        The call starts when iteration starts. Each completion's last chunk carries finish_reason and stats
        (with n > 1 chunks interleave, `chunk.index` says whose); the returned stream's `.result` then holds
        the whole generation.
        """
        request = build_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, proposer, ignore_eos,
                                n, logprobs, top_logprobs)
        return self._stream(request, timeout)

    def chat_stream(self, messages: Messages, max_tokens: int = 64, timeout: float | None = None,
                    **options) -> GenerationStream:
        """The assistant's reply to chat `messages`, streamed; see chat and stream."""
        return self._stream(build_request(None, max_tokens, messages=messages, **options), timeout)

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        """The served model: name, context length, vocabulary, whether it has a chat template."""
        deadline = self._options.deadline(timeout)
        try:
            for attempt in self._options.retrying(deadline):
                with attempt:
                    response = self._stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=deadline.remaining(),
                                                    metadata=self._options.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return model_info_from_proto(response)

    def _unary(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> GenerationResult:
        deadline = self._options.deadline(timeout)
        span = CallSpan("GenerateUnary")
        metadata = self._options.call_metadata(span.start())
        tokens = None
        try:
            for attempt in self._options.retrying(deadline):
                with attempt:
                    response = self._stub.GenerateUnary(request, timeout=deadline.remaining(), metadata=metadata)
            result = result_from_proto(response, request.logprobs)
            tokens = sum(len(c.token_ids) for c in result.completions)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            span.fail(error)
            raise error from exc
        except Exception as exc:
            span.fail(exc)
            raise
        finally:
            span.end(tokens)
        return result

    def _stream(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> GenerationStream:
        return GenerationStream(
            self._options, lambda t, md: self._stub.Generate(request, timeout=t, metadata=md),
            self._options.deadline(timeout), max(request.n, 1), request.logprobs,
        )

    def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Block until the server's standard health check says SERVING; DeadlineExceeded after `timeout` s."""
        end = time.monotonic() + timeout
        last = "no answer yet"
        while (left := end - time.monotonic()) > 0:
            try:
                answer = self._health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(left, 1.0), wait_for_ready=True,
                    metadata=self._options.metadata,
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(min(0.1, max(end - time.monotonic(), 0)))
        raise DeadlineExceeded(_not_ready_message(self.target, timeout, last))

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# async client


class AsyncGenerationStream:
    """Async iterator over the chunks of one streamed generation; see GenerationStream."""

    def __init__(self, options: _Options,
                 open_call: Callable[[float | None, Sequence[tuple[str, str]]], grpc.aio.Call], deadline: _Deadline,
                 n: int = 1, logprobs: bool = False):
        self._options = options
        self._open_call = open_call
        self._deadline = deadline
        self._assembler = _Assembler(n, logprobs)
        self._call: grpc.aio.Call | None = None
        self._span = CallSpan("Generate")
        self._chunks = self._iterate()

    @property
    def result(self) -> GenerationResult | None:
        return self._assembler.result

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        return await self._chunks.__anext__()

    async def collect(self) -> GenerationResult:
        """Read the rest of the stream and return the whole completion."""
        async for _ in self._chunks:
            pass
        return self._assembler.finish()

    async def cancel(self) -> None:
        """Stop the generation: the server frees the request's state."""
        if self._call is not None:
            self._call.cancel()
        await self._chunks.aclose()
        self._span.end()  # when iteration never started

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.cancel()

    async def _iterate(self) -> AsyncIterator[GenerationChunk]:
        try:
            async for chunk in self._chunks_of_call():
                yield chunk
        except Exception as exc:
            self._span.fail(exc)
            raise
        finally:
            self._span.end(self._assembler.tokens)

    async def _chunks_of_call(self) -> AsyncIterator[GenerationChunk]:
        metadata = self._options.call_metadata(self._span.start())
        try:
            async for attempt in self._options.async_retrying(self._deadline):
                with attempt:
                    self._call = call = self._open_call(self._deadline.remaining(), metadata)
                    message = await call.read()  # the first message: from here on, no retry
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        try:
            while message is not grpc.aio.EOF:
                chunk = chunk_from_proto(message)
                self._assembler.add(chunk)
                yield chunk
                message = await call.read()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()
        self._assembler.finish()


class AsyncClient:
    """asyncio client of the Generation API, same arguments (API key and TLS included) and behaviour as Client.

    The channel is created on first use, inside the running event loop. Use `async with`, or await close().
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        retries: int = 3,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        root_certificates: bytes | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ):
        credentials = channel_credentials(tls=tls, tls_ca=tls_ca, root_certificates=root_certificates,
                                          tls_cert=tls_cert, tls_key=tls_key)
        self._options = _Options(target, timeout, retries, backoff_s, backoff_max_s, api_key, credentials)
        self._channel: grpc.aio.Channel | None = None

    @property
    def target(self) -> str:
        return self._options.target

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            credentials = self._options.credentials
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(self.target, credentials, options=CHANNEL_OPTIONS)
        return self._channel

    async def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        proposer: str = "",
        ignore_eos: bool = False,
        timeout: float | None = None,
        *,
        n: int = 1,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> GenerationResult:
        """Generate a completion and return it whole; see Client.generate."""
        request = build_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, proposer, ignore_eos,
                                n, logprobs, top_logprobs)
        return await self._unary(request, timeout)

    async def chat(self, messages: Messages, max_tokens: int = 64, timeout: float | None = None,
                   **options) -> GenerationResult:
        """The assistant's reply to chat `messages`; see Client.chat."""
        return await self._unary(build_request(None, max_tokens, messages=messages, **options), timeout)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        proposer: str = "",
        ignore_eos: bool = False,
        timeout: float | None = None,
        *,
        n: int = 1,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> AsyncGenerationStream:
        """Generate a completion as an async iterator of chunks (`async for chunk in client.stream(...)`)."""
        request = build_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, proposer, ignore_eos,
                                n, logprobs, top_logprobs)
        return self._stream(request, timeout)

    def chat_stream(self, messages: Messages, max_tokens: int = 64, timeout: float | None = None,
                    **options) -> AsyncGenerationStream:
        """The assistant's reply to chat `messages`, as an async iterator of chunks."""
        return self._stream(build_request(None, max_tokens, messages=messages, **options), timeout)

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        """The served model; see Client.model_info."""
        stub = generation_pb2_grpc.GenerationStub(self._open())
        deadline = self._options.deadline(timeout)
        try:
            async for attempt in self._options.async_retrying(deadline):
                with attempt:
                    response = await stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=deadline.remaining(),
                                                    metadata=self._options.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return model_info_from_proto(response)

    async def _unary(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> GenerationResult:
        stub = generation_pb2_grpc.GenerationStub(self._open())
        deadline = self._options.deadline(timeout)
        span = CallSpan("GenerateUnary")
        metadata = self._options.call_metadata(span.start())
        tokens = None
        try:
            async for attempt in self._options.async_retrying(deadline):
                with attempt:
                    response = await stub.GenerateUnary(request, timeout=deadline.remaining(), metadata=metadata)
            result = result_from_proto(response, request.logprobs)
            tokens = sum(len(c.token_ids) for c in result.completions)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            span.fail(error)
            raise error from exc
        except Exception as exc:
            span.fail(exc)
            raise
        finally:
            span.end(tokens)
        return result

    def _stream(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> AsyncGenerationStream:
        def open_call(t: float | None, metadata: Sequence[tuple[str, str]]) -> grpc.aio.Call:
            return generation_pb2_grpc.GenerationStub(self._open()).Generate(request, timeout=t, metadata=metadata)

        return AsyncGenerationStream(self._options, open_call, self._options.deadline(timeout), max(request.n, 1),
                                     request.logprobs)

    async def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Wait until the server's standard health check says SERVING; DeadlineExceeded after `timeout` s."""
        health = health_pb2_grpc.HealthStub(self._open())
        end = time.monotonic() + timeout
        last = "no answer yet"
        while (left := end - time.monotonic()) > 0:
            try:
                answer = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(left, 1.0), wait_for_ready=True,
                    metadata=self._options.metadata,
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(min(0.1, max(end - time.monotonic(), 0)))
        raise DeadlineExceeded(_not_ready_message(self.target, timeout, last))

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


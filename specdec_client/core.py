"""What the sync and async clients share, written once: the public call signatures, deadlines, the retry
policy, error mapping, the bookkeeping of a streamed generation and of a health poll. client.py only adds
the I/O of each flavour (a blocking call, or an awaited one).

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

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import grpc
import tenacity
from grpc_health.v1 import health_pb2

from specdec_client._pb import generation_pb2
from specdec_client.credentials import auth_metadata, channel_credentials, resolve_api_key
from specdec_client.errors import DeadlineExceeded, from_rpc_error
from specdec_client.messages import Assembler, Messages, build_request, chunk_from_proto
from specdec_client.tracing import CallSpan
from specdec_client.types import GenerationChunk, GenerationResult

DEFAULT_TARGET = "127.0.0.1:50051"

# gRPC's default reconnect backoff grows to minutes; a client that retries for a few seconds needs the
# channel to actually try to reconnect within that time.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

Metadata = tuple[tuple[str, str], ...]


# ---------------------------------------------------------------------------------------------------------
# deadlines, retries, errors


class Deadline:
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


@contextmanager
def call_errors(span: CallSpan | None = None, tokens: Callable[[], int | None] = lambda: None) -> Iterator[None]:
    """Around a call: a failed RPC is raised as its SpecdecError; with a span, every error is recorded on it
    (as the caller sees it) and the span ends once, with `tokens()` completion tokens."""
    try:
        yield
    except grpc.RpcError as exc:
        error = from_rpc_error(exc)
        if span is not None:
            span.fail(error)
        raise error from exc
    except Exception as exc:
        if span is not None:
            span.fail(exc)
        raise
    finally:
        if span is not None:
            span.end(tokens())


class Options:
    """A client's settings: target, default deadline, retry policy, and the credentials (channel TLS, and
    the API key's metadata sent with every call)."""

    def __init__(self, target: str, timeout: float | None, retries: int, backoff_s: float, backoff_max_s: float,
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.metadata: Metadata = auth_metadata(resolve_api_key(api_key))
        self.credentials = credentials

    def call_metadata(self, trace_metadata: Sequence[tuple[str, str]]) -> Metadata:
        """A call's metadata: its trace context and the API key."""
        return (*trace_metadata, *self.metadata)

    def deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout if timeout is None else timeout)

    def _retry_settings(self, deadline: Deadline) -> dict[str, Any]:
        stop = tenacity.stop_after_attempt(self.retries + 1)
        if deadline.timeout is not None:
            # Do not sleep into a deadline that the next attempt could not meet anyway.
            stop = stop | tenacity.stop_before_delay(deadline.timeout)
        return dict(
            stop=stop,
            wait=tenacity.wait_exponential(multiplier=self.backoff_s, max=self.backoff_max_s),
            retry=tenacity.retry_if_exception(_is_unavailable),
            reraise=True,
        )

    def open_channel(self, channels: Any) -> Any:
        """A channel to the target with these credentials; `channels` is the grpc or the grpc.aio module."""
        if self.credentials is None:
            return channels.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        return channels.secure_channel(self.target, self.credentials, options=CHANNEL_OPTIONS)

    def retrying(self, deadline: Deadline) -> tenacity.Retrying:
        """The retry policy of one blocking call: `retrying(deadline)(attempt)` runs `attempt` until it
        succeeds or the policy gives up (then its last error is raised)."""
        return tenacity.Retrying(**self._retry_settings(deadline))

    def async_retrying(self, deadline: Deadline) -> tenacity.AsyncRetrying:
        """The same policy for an awaited call: `await async_retrying(deadline)(attempt)`."""
        return tenacity.AsyncRetrying(**self._retry_settings(deadline))


# ---------------------------------------------------------------------------------------------------------
# the public calls, one signature each

UnaryT = TypeVar("UnaryT")  # what a whole generation returns: the result, or an awaitable of it
StreamT = TypeVar("StreamT")  # what a streamed generation returns: an iterator, or an async iterator


class GenerationApi(ABC, Generic[UnaryT, StreamT]):
    """The Generation API's calls with their arguments, shared by Client and AsyncClient: each builds the
    request here and hands it to the subclass's `_unary` (a result, or for AsyncClient a coroutine to await)
    or `_stream`."""

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
        self._options = Options(target, timeout, retries, backoff_s, backoff_max_s, api_key, credentials)
        self._connect()

    @abstractmethod
    def _connect(self) -> None:
        """Set up the channel (Client), or get ready to on first use (AsyncClient: inside the event loop)."""

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
    ) -> UnaryT:
        """Generate a completion and return it whole (AsyncClient: await it). Raises a SpecdecError subclass
        on failure.

        n: independent completions (result.completions; with a seed, completion i samples with seed + i).
        logprobs: each token's log-probability under the target (result.logprobs); top_logprobs: also the
        most likely tokens at each position, 0..20 (implies logprobs)."""
        request = build_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, proposer, ignore_eos,
                                n, logprobs, top_logprobs)
        return self._unary(request, timeout)

    def chat(self, messages: Messages, max_tokens: int = 64, timeout: float | None = None, **options) -> UnaryT:
        """The assistant's reply to chat `messages` ({"role", "content"} mappings or (role, content) pairs),
        rendered by the server with the model's chat template; options as for generate."""
        return self._unary(build_request(None, max_tokens, messages=messages, **options), timeout)

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
    ) -> StreamT:
        """Generate a completion, yielding the tokens of each engine step as they are accepted (AsyncClient:
        `async for chunk in client.stream(...)`).

        The call starts when iteration starts. Each completion's last chunk carries finish_reason and stats
        (with n > 1 chunks interleave, `chunk.index` says whose); the returned stream's `.result` then holds
        the whole generation."""
        request = build_request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, proposer, ignore_eos,
                                n, logprobs, top_logprobs)
        return self._stream(request, timeout)

    def chat_stream(self, messages: Messages, max_tokens: int = 64, timeout: float | None = None,
                    **options) -> StreamT:
        """The assistant's reply to chat `messages`, streamed; see chat and stream."""
        return self._stream(build_request(None, max_tokens, messages=messages, **options), timeout)

    @abstractmethod
    def _unary(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> UnaryT:
        """Run the call: its result (Client), or a coroutine that returns it (AsyncClient)."""

    @abstractmethod
    def _stream(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> StreamT:
        """The stream of the call, which starts when iteration does."""


# ---------------------------------------------------------------------------------------------------------
# the two kinds of call


class UnaryCall:
    """One unary call's deadline (shared by its attempts), metadata, and span (None: untraced). A client
    runs it as `with call.scope(): response = call.run(stub.Method, request)` (or `await call.run_async`)."""

    def __init__(self, options: Options, timeout: float | None, method: str | None = None):
        self._options = options
        self._deadline = options.deadline(timeout)
        self._span = CallSpan(method) if method else None
        self._metadata = options.call_metadata(self._span.start()) if self._span else options.metadata
        self._tokens: int | None = None

    def _attempt(self) -> dict[str, Any]:
        """The arguments of one attempt: what is left of the deadline, and the metadata."""
        return {"timeout": self._deadline.remaining(), "metadata": self._metadata}

    def run(self, method: Callable[..., Any], request: Any) -> Any:
        """`method(request)` on a blocking stub, retried by the client's policy."""
        return self._options.retrying(self._deadline)(lambda: method(request, **self._attempt()))

    async def run_async(self, method: Callable[..., Any], request: Any) -> Any:
        """`await method(request)` on a grpc.aio stub, retried by the client's policy."""

        async def attempt() -> Any:
            return await method(request, **self._attempt())

        return await self._options.async_retrying(self._deadline)(attempt)

    def scope(self):
        """Errors mapped to SpecdecError and recorded on the span, which ends when the block does."""
        return call_errors(self._span, lambda: self._tokens)

    def generated(self, result: GenerationResult) -> GenerationResult:
        """Note a whole generation's completion tokens (all completions) for the span; returns `result`."""
        self._tokens = sum(len(c.token_ids) for c in result.completions)
        return result


class StreamCall(ABC):
    """The state of one streamed generation, shared by GenerationStream and AsyncGenerationStream: its
    deadline (set when the stream is made), span, live call, and the chunks joined so far.

    `open_call(timeout, metadata)` starts one attempt's gRPC call; the subclass's `_iterate()` reads its
    messages (a generator, or an async generator)."""

    def __init__(self, options: Options, open_call: Callable[[float | None, Metadata], Any], timeout: float | None,
                 n: int = 1, logprobs: bool = False):
        self._options = options
        self._open_call = open_call
        self._deadline = options.deadline(timeout)
        self._assembler = Assembler(n, logprobs)
        self._span = CallSpan("Generate")
        self._metadata: Metadata = ()
        self._call: Any = None  # the current attempt's call, for cancel()
        self._chunks = self._iterate()

    @property
    def result(self) -> GenerationResult | None:
        """The whole generation once every completion's last chunk arrived, else None."""
        return self._assembler.result

    @abstractmethod
    def _iterate(self) -> Any:
        """The call's messages as chunks: a generator (GenerationStream) or an async generator."""

    def _scope(self):
        """Around the whole iteration: errors mapped and recorded on the span, which ends with the tokens."""
        return call_errors(self._span, lambda: self._assembler.tokens)

    def _begin(self) -> None:
        self._metadata = self._options.call_metadata(self._span.start())

    def _open(self) -> Any:
        """Start one attempt (within what is left of the deadline) and keep its call."""
        self._call = self._open_call(self._deadline.remaining(), self._metadata)
        return self._call

    def _chunk(self, message: generation_pb2.GenerateResponse) -> GenerationChunk:
        chunk = chunk_from_proto(message)
        self._assembler.add(chunk)
        return chunk


# ---------------------------------------------------------------------------------------------------------
# readiness


class ReadinessPoll:
    """The loop of wait_ready: ask the standard health service until it says SERVING, for `timeout` s."""

    PAUSE_S = 0.1  # between answers that were not SERVING
    ATTEMPT_S = 1.0  # longest wait for one answer

    def __init__(self, target: str, timeout: float, service: str = ""):
        self.request = health_pb2.HealthCheckRequest(service=service)
        self._target = target
        self._timeout = timeout
        self._end = time.monotonic() + timeout
        self._last = "no answer yet"

    def attempts(self) -> Iterator[float]:
        """The timeout of each attempt, while time is left."""
        while (left := self._end - time.monotonic()) > 0:
            yield min(left, self.ATTEMPT_S)

    def serving(self, answer: health_pb2.HealthCheckResponse) -> bool:
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            return True
        self._last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        return False

    def failed(self, error: grpc.RpcError) -> None:
        self._last = f"{error.code().name}: {error.details()}"

    def pause_s(self) -> float:
        return min(self.PAUSE_S, max(self._end - time.monotonic(), 0))

    def timed_out(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"{self._target} did not report SERVING within {self._timeout:g} s "
                                f"(last health answer: {self._last})")

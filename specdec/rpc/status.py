"""Errors -> gRPC status codes, the same way in every service (a grpc.aio server interceptor).

Two things gRPC itself answers badly: a request whose bytes do not parse as its message (grpc.aio says
UNKNOWN, as for any exception) and an exception a handler did not expect (UNKNOWN, with a bare repr). Here the
first gets INVALID_ARGUMENT naming the message type, the second INTERNAL with a short message, logged once with
its traceback; the service goes on serving. Aborts the handlers make themselves pass through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 200  # of an exception's text quoted in an INTERNAL status
# Longest status message a service sends: it travels in metadata, whose size gRPC limits, and messages quote
# request ids and other input.
MAX_MESSAGE_CHARS = 1024
OWN_SERVICES = "/specdec."  # method names of the services this interceptor answers for


class _Malformed:
    """What the deserializer gives for bytes that do not parse: the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Malformed(exc)

    return parse


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the request is not a valid protobuf message ({request.error})")


async def _internal(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    log.error("%s failed on an unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"{method} failed inside the service: {type(exc).__name__}: {str(exc)[:MAX_DETAIL_CHARS]}")


def _passes(exc: BaseException) -> bool:
    """Aborts and cancellations are the handler's own answers: let them through."""
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError, grpc.RpcError))


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Malformed requests -> INVALID_ARGUMENT, unexpected exceptions -> INTERNAL (logged), for the methods of
    specdec's own services (async handlers; the standard health and reflection services keep theirs)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(OWN_SERVICES):
            return handler
        parse, dump = _safe(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_unary_unary(handler.unary_unary, method), parse, dump)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_unary_stream(handler.unary_stream, method), parse, dump)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_stream_unary(handler.stream_unary, method), parse, dump)
        return grpc.stream_stream_rpc_method_handler(_stream_stream(handler.stream_stream, method), parse, dump)


def _unary_unary(behavior, method: str):
    async def handle(request, context):
        await _reject_malformed(request, context, method)
        try:
            return await behavior(request, context)
        except Exception as exc:
            if _passes(exc):
                raise
            await _internal(context, method, exc)

    return handle


def _unary_stream(behavior, method: str):
    async def handle(request, context):
        await _reject_malformed(request, context, method)
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            if _passes(exc):
                raise
            await _internal(context, method, exc)

    return handle


def _checked(requests: AsyncIterator, context, method: str) -> AsyncIterator:
    async def each():
        async for request in requests:
            await _reject_malformed(request, context, method)
            yield request

    return each()


def _stream_unary(behavior, method: str):
    async def handle(requests, context):
        try:
            return await behavior(_checked(requests, context, method), context)
        except Exception as exc:
            if _passes(exc):
                raise
            await _internal(context, method, exc)

    return handle


def _stream_stream(behavior, method: str):
    async def handle(requests, context):
        try:
            async for response in behavior(_checked(requests, context, method), context):
                yield response
        except Exception as exc:
            if _passes(exc):
                raise
            await _internal(context, method, exc)

    return handle

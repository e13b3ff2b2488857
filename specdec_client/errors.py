"""Typed errors of the client SDK, one class per gRPC status a caller is expected to handle.

Every error keeps the server's message (`.message`) and the gRPC status (`.code`), so callers can branch on
the class and show the message as it is: the services write messages meant for a person.
"""

from __future__ import annotations

import grpc


class SpecdecError(Exception):
    """Base of every error the client raises; `.code` is the gRPC status, `.message` the server's text."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgument(SpecdecError):
    """The request is malformed (bad sampling parameters, empty prompt, too many tokens, unknown proposer)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(SpecdecError):
    """The server is full and refused the request instead of queueing it without bound; try again later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SpecdecError):
    """The server could not be reached, or the connection broke (after retries, or mid-stream)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SpecdecError):
    """The call did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(SpecdecError):
    """The server wants an API key and got none or a wrong one (never retried: retrying cannot fix it)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(SpecdecError):
    """The call was cancelled (by the caller or the server)."""

    code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[SpecdecError]] = {
    cls.code: cls
    for cls in (InvalidArgument, ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled, Unauthenticated)
}


def from_rpc_error(error: grpc.RpcError) -> SpecdecError:
    """The typed error for a failed gRPC call (sync or grpc.aio), message and status kept."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    message = details or (f"gRPC call failed with {code.name}" if code is not None else str(error))
    cls = _BY_CODE.get(code, SpecdecError)
    return cls(message, code)

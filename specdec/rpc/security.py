"""Transport security and API keys of the services: TLS settings, credentials, binding, channels, key check.

Every port is plaintext unless it is given a certificate: TLS is opt-in per service, so `specdec up` on one
machine needs nothing, and an exposed deployment turns it on with flags. A server given a client CA as
well requires every client to present a certificate that CA signed (mutual TLS), which is how the internal
services (verifier, proposers) can admit the scheduler and nobody else.

API keys guard the public Generation API: a call must carry the metadata `authorization: Bearer <key>`
with one of the configured keys. The health and reflection services stay open, because orchestrators
probe them without credentials and they reveal nothing but readiness and the schema.

This module imports no service: the services, the launcher and the health-check probe all use it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc

log = logging.getLogger(__name__)

API_KEYS_ENV = "SPECDEC_API_KEYS"  # comma-separated keys, accepted besides those of --api-keys-file
AUTH_METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
AUTH_SCHEME = "bearer"
# Services callable without a key: readiness probes (health) and schema discovery (reflection).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


# -- TLS settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    """TLS of a server port: its certificate and key; with `client_ca_file`, mutual TLS (clients must
    present a certificate signed by that CA)."""

    cert_file: str  # PEM certificate chain the server presents (its own certificate first)
    key_file: str  # PEM private key of that certificate
    client_ca_file: str | None = None  # PEM CA(s) client certificates must chain to; None = no client certs
    # The flags these came from, so that an error names what the operator typed (e.g. "--tls-cert").
    flag_prefix: str = field(default="--tls", compare=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


@dataclass(frozen=True)
class ClientTLS:
    """TLS of a client's channel: the CA it trusts; with a certificate and key, it can pass mutual TLS."""

    ca_file: str | None = None  # PEM CA(s) the server's certificate must chain to; None = gRPC's default roots
    cert_file: str | None = None  # PEM client certificate chain, for servers that require one
    key_file: str | None = None
    # The name the server's certificate must carry when it is not the host dialled (e.g. a probe that
    # dials 127.0.0.1 inside a container whose certificate names the service).
    server_name: str | None = None
    flag_prefix: str = field(default="--tls", compare=False)


def read_pem(path: str, flag: str) -> bytes:
    """The bytes of a PEM file; a ValueError naming `flag` and the file when it is missing, unreadable or
    holds no PEM block (gRPC itself would only fail later, at the handshake, with a vaguer message)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (expected a -----BEGIN ...----- block)")
    return data


def server_tls(cert_file: str | None, key_file: str | None, client_ca_file: str | None = None, *,
               flag_prefix: str = "--tls") -> ServerTLS | None:
    """Validated server TLS from the `<prefix>-cert`, `-key` and `-client-ca` settings (empty = unset);
    None when no certificate is given (plaintext). Raises a one-line ValueError naming the flag."""
    cert_file, key_file, client_ca_file = cert_file or None, key_file or None, client_ca_file or None
    if (cert_file is None) != (key_file is None):
        given, missing = ("cert", "key") if cert_file else ("key", "cert")
        raise ValueError(f"{flag_prefix}-{given} needs {flag_prefix}-{missing} too (a certificate and its key)")
    if cert_file is None:
        if client_ca_file is not None:
            raise ValueError(f"{flag_prefix}-client-ca needs {flag_prefix}-cert and {flag_prefix}-key: "
                             "client certificates are checked only on a TLS port")
        return None
    tls = ServerTLS(cert_file, key_file, client_ca_file, flag_prefix)
    _server_pems(tls)  # read now: a bad file is reported before anything starts
    return tls


def client_tls(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None, *,
               server_name: str | None = None, flag_prefix: str = "--tls") -> ClientTLS | None:
    """Validated client TLS from the `<prefix>-ca`, `-cert` and `-key` settings (empty = unset); None when
    none is given (plaintext). A certificate needs its key and vice versa."""
    ca_file, cert_file, key_file = ca_file or None, cert_file or None, key_file or None
    if (cert_file is None) != (key_file is None):
        given, missing = ("cert", "key") if cert_file else ("key", "cert")
        raise ValueError(f"{flag_prefix}-{given} needs {flag_prefix}-{missing} too (a client certificate and "
                         "its key)")
    if ca_file is None and cert_file is None:
        return None
    tls = ClientTLS(ca_file, cert_file, key_file, server_name or None, flag_prefix)
    _client_pems(tls)
    return tls


def _server_pems(tls: ServerTLS) -> tuple[bytes, bytes, bytes | None]:
    p = tls.flag_prefix
    ca = read_pem(tls.client_ca_file, f"{p}-client-ca") if tls.client_ca_file else None
    return read_pem(tls.cert_file, f"{p}-cert"), read_pem(tls.key_file, f"{p}-key"), ca


def _client_pems(tls: ClientTLS) -> tuple[bytes | None, bytes | None, bytes | None]:
    p = tls.flag_prefix
    ca = read_pem(tls.ca_file, f"{p}-ca") if tls.ca_file else None
    cert = read_pem(tls.cert_file, f"{p}-cert") if tls.cert_file else None
    key = read_pem(tls.key_file, f"{p}-key") if tls.key_file else None
    return ca, cert, key


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """gRPC server credentials for `tls` (files read now)."""
    cert, key, client_ca = _server_pems(tls)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    """gRPC channel credentials for `tls` (files read now)."""
    ca, cert, key = _client_pems(tls)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def transport(tls: ServerTLS | None) -> str:
    """How a port is secured, for start-up logs: plaintext, TLS or mutual TLS."""
    return "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS"


# -- servers and channels ------------------------------------------------------------------------------


def bind(server: grpc.aio.Server | grpc.Server, address: str, tls: ServerTLS | None) -> int:
    """Listen on `address` (HOST:PORT, port 0 = any free one) with TLS when given; returns the bound port.
    OSError when the address cannot be bound."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as exc:  # gRPC's way of saying the address is taken or invalid
        raise OSError(f"cannot listen on {address} (in use, or not an address of this machine)") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use, or not an address of this machine)")
    return port


def _tls_options(tls: ClientTLS, options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    if tls.server_name:
        return [*options, ("grpc.ssl_target_name_override", tls.server_name)]
    return list(options)


def aio_channel(target: str, tls: ClientTLS | None = None, *, options: Sequence[tuple[str, object]] = (),
                interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=_tls_options(tls, options),
                                   interceptors=interceptors)


def sync_channel(target: str, tls: ClientTLS | None = None, *,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A blocking channel to `target` (probes, tools): TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, channel_credentials(tls), options=_tls_options(tls, options))


# -- API keys ------------------------------------------------------------------------------------------


def parse_api_keys(text: str, source: str) -> list[str]:
    """The keys of a key file's text: one per line; blank lines and lines starting with # are skipped.
    A line with whitespace inside is refused (most likely a trailing comment, which would silently
    become part of the key)."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(ch.isspace() for ch in line):
            raise ValueError(f"{source} line {number}: a key may not contain spaces (comments go on lines "
                             "of their own, starting with #)")
        keys.append(line)
    return keys


def load_api_keys(keys_file: str | None, env_keys: str | None = None, *,
                  flag: str = "--api-keys-file") -> frozenset[str]:
    """The accepted keys: those of `keys_file` plus those of `env_keys` (the comma-separated value of
    SPECDEC_API_KEYS). Empty means the API is open. A key file given but holding no key is an error:
    it would leave the API open when the operator meant to close it."""
    keys: set[str] = set()
    if keys_file:
        try:
            with open(keys_file, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"{flag} {keys_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{flag} {keys_file}: cannot read it ({exc})") from None
        from_file = parse_api_keys(text, f"{flag} {keys_file}")
        if not from_file:
            raise ValueError(f"{flag} {keys_file} holds no key (one key per line; # starts a comment line)")
        keys.update(from_file)
    if env_keys:
        keys.update(key.strip() for key in env_keys.split(",") if key.strip())
    return frozenset(keys)


def bearer_metadata(api_key: str) -> tuple[str, str]:
    """The metadata entry that presents `api_key`."""
    return (AUTH_METADATA_KEY, f"Bearer {api_key}")


def _presented_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == AUTH_SCHEME else ""
    return None


def _service_of(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").split("/", 1)[0]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without a configured API key, except to OPEN_SERVICES.

    Closed by default: a service added to the server later is guarded without anyone remembering to.
    Keys are compared in constant time, and the refusal never repeats the key that was presented.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode("utf-8") for key in keys)
        if not self._keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """None when the metadata carries an accepted key, else the reason to refuse."""
        presented = _presented_key(metadata)
        if presented is None:
            return f"missing API key: send the metadata '{AUTH_METADATA_KEY}: Bearer <key>'"
        if not presented:
            return f"malformed '{AUTH_METADATA_KEY}' metadata: expected 'Bearer <key>'"
        candidate = presented.encode("utf-8")
        # Every key is compared (no early exit), each in constant time.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(key, candidate)
        return None if matched else "invalid API key"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if _service_of(method) in OPEN_SERVICES:
            return await continuation(handler_call_details)
        reason = self.check(handler_call_details.invocation_metadata)
        if reason is None:
            return await continuation(handler_call_details)
        log.info("refused %s: %s", method, reason)
        return _refusal(await continuation(handler_call_details), reason)


def _refusal(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED. The request is not
    deserialised: nothing of an unauthenticated call is parsed."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    # Unary, or a method the server does not have: refused the same way, so that which methods exist is
    # not revealed to a caller without a key.
    return grpc.unary_unary_rpc_method_handler(refuse)


def api_key_interceptors(keys: Iterable[str]) -> list[grpc.aio.ServerInterceptor]:
    """[ApiKeyInterceptor] when there are keys, [] (an open API) when there are none."""
    keys = list(keys)
    return [ApiKeyInterceptor(keys)] if keys else []


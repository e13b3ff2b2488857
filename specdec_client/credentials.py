"""How the SDK presents itself to a server that asks for it: TLS channel credentials and the API key.

Kept inside the SDK (grpcio only), so that a client installs without the services. The server side of
the same conventions is specdec/rpc/security.py: the key travels as the metadata `authorization: Bearer <key>`
on every call.
"""

from __future__ import annotations

import os

import grpc

API_KEY_ENV = "SPECDEC_API_KEY"  # the key used when none is passed explicitly


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else SPECDEC_API_KEY, else None (send no key). ValueError for a key gRPC cannot send."""
    key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    key = (key or "").strip()
    if not key:
        return None
    # Metadata values must be printable ASCII; say so now rather than fail inside the first call.
    if not key.isascii() or not key.isprintable() or " " in key:
        raise ValueError("the API key must be printable ASCII without spaces")
    return key


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that presents `api_key` (none without a key)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path}: not a PEM file")
    return data


def channel_credentials(
    *,
    tls: bool = False,
    tls_ca: str | None = None,
    root_certificates: bytes | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS setting is given, else None (plaintext).

    tls: use TLS even with no other setting (the server's certificate chains to gRPC's default roots);
    tls_ca / root_certificates: a PEM file / PEM bytes of the CA(s) to trust instead (not both);
    tls_cert + tls_key: a client certificate and its key, for servers that require one (mutual TLS).
    Files are read now: a wrong path is a ValueError here, not a failed call later.
    """
    if tls_ca and root_certificates:
        raise ValueError("give tls_ca (a file) or root_certificates (PEM bytes), not both")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a TLS client certificate needs its key, and a key its certificate")
    if not (tls or tls_ca or root_certificates or tls_cert):
        return None
    roots = _read(tls_ca, "TLS CA file") if tls_ca else root_certificates
    cert = _read(tls_cert, "TLS client certificate") if tls_cert else None
    key = _read(tls_key, "TLS client key") if tls_key else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)

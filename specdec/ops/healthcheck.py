"""`python -m specdec.ops.healthcheck HOST:PORT [SERVICE]`: exit 0 when the gRPC health service says SERVING.

The container health check of every specdec service (compose.yaml), so images need no separate probe
binary. Exit 1 with one line on stderr otherwise (not serving, unreachable, or no answer in time).

A service on a TLS port is probed over TLS: the --tls-* flags, or in a container the variables
SPECDEC_HEALTHCHECK_TLS_CA, _CERT, _KEY and _SERVER_NAME (the compose file's probe command is fixed, so
an override file turns TLS on for the probe by setting these next to the service's SPECDEC_TLS_*).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.rpc.security import ClientTLS, client_tls, sync_channel

ENV_PREFIX = "SPECDEC_HEALTHCHECK_"


def check(address: str, service: str = "", timeout_s: float = 2.0, tls: ClientTLS | None = None) -> str:
    """The health status name of `service` at `address` ("SERVING", "NOT_SERVING", ...); raises
    grpc.RpcError when there is no answer."""
    with sync_channel(address, tls) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.ops.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("service", nargs="?", default="", help="service name (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    for name, help_text in (("ca", "PEM CA the server's certificate chains to (turns TLS on)"),
                            ("cert", "PEM client certificate, for a server that requires one (mutual TLS)"),
                            ("key", "PEM private key of --tls-cert"),
                            ("server-name", "name the server's certificate carries, when not the address's host")):
        variable = ENV_PREFIX + "TLS_" + name.replace("-", "_").upper()
        parser.add_argument(f"--tls-{name}", default=os.environ.get(variable), help=f"{help_text} (env {variable})")
    args = parser.parse_args(argv)
    try:
        tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key, server_name=args.tls_server_name)
    except ValueError as exc:
        print(f"{args.address}: {exc}", file=sys.stderr)
        return 1
    try:
        status = check(args.address, args.service, args.timeout, tls)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{args.address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

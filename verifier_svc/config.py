"""Verifier configuration: one typed object, filled from flags with SPECDEC_<NAME> environment fallbacks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Mapping, Sequence

from specdec.model.checkpoint import DEFAULT_TARGET
from specdec.rpc import security, settings
from specdec.rpc.settings import setting


@dataclass(frozen=True)
class VerifierConfig:
    model: str = setting(str(DEFAULT_TARGET), "target checkpoint folder")
    port: int = setting(50052, "port, 0 = any free one")
    host: str = setting("127.0.0.1", "address to bind")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = setting("auto", "auto | float32 | bfloat16 | float16")
    max_slots: int = setting(32, "KV-cache slots = requests held at once")
    max_seq_len: int = setting(1024, "tokens per request (capped by the model's max_position_embeddings)")
    max_batch_size: int = setting(32, "requests in one Verify call")
    torch_threads: int = setting(0, "intra-op CPU threads, 0 = torch default")
    # ModelRunner.warm_up: one forward per batch token count.
    warmup_tokens: int = setting(64, "before serving, compile the kernels of batches of 1..N tokens, 0 = none")
    metrics_port: int = setting(0, "Prometheus metrics port, 0 = none")
    log_level: str = setting("INFO")
    tls_cert: str | None = setting(None, "PEM certificate (chain) of the gRPC port; with --tls-key turns TLS on")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(
        None, "PEM CA: callers must present a certificate it signed, i.e. mutual TLS")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0..65535)")
        for name in ("max_slots", "max_seq_len", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port {self.metrics_port} is not a TCP port (0 = none)")
        if self.torch_threads < 0:
            raise ValueError(f"--torch-threads must be >= 0, got {self.torch_threads}")
        if self.warmup_tokens < 0:
            raise ValueError(f"--warmup-tokens must be >= 0, got {self.warmup_tokens}")
        _ = self.tls  # reads the files: a wrong path is reported before the model loads
        from specdec.model.runner import check_device  # torch: only once the flags are read

        check_device(self.device)

    @property
    def tls(self) -> security.ServerTLS | None:
        """TLS of the gRPC port; None = plaintext."""
        return security.server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)

    def describe(self) -> str:
        """One line per setting, for the start-up log."""
        return settings.describe(self)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    return settings.build_parser(VerifierConfig, env, prog="python -m verifier_svc",
                                 description="Speculative-decoding verifier service")


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> VerifierConfig:
    """Flags override SPECDEC_<NAME> environment variables, which override the defaults; exits 2 on a bad one."""
    return settings.parse_args(VerifierConfig, build_parser(env), argv, env)

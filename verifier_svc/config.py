"""Verifier configuration: one typed object, filled from flags with SPECDEC_<NAME> environment fallbacks."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from specdec.rpc import security
from specdec.model.checkpoint import DEFAULT_TARGET

ENV_PREFIX = "SPECDEC_"


@dataclass(frozen=True)
class VerifierConfig:
    model: str = str(DEFAULT_TARGET)  # local checkpoint folder of the target model
    port: int = 50052  # 0 = any free port (the bound port is logged)
    host: str = "127.0.0.1"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_slots: int = 32  # KV-cache slots = requests held at once
    max_seq_len: int = 1024  # tokens per request (capped by the model's max_position_embeddings)
    max_batch_size: int = 32  # requests in one Verify call
    torch_threads: int = 0  # intra-op CPU threads; 0 = torch's default
    warmup_tokens: int = 64  # before serving, one forward per batch token count 1..this (ModelRunner.warm_up)
    metrics_port: int = 0  # Prometheus /metrics on this port (same host); 0 = none
    log_level: str = "INFO"
    # TLS of the gRPC port (PEM files); with tls_client_ca, callers must present a certificate (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    @property
    def tls(self) -> security.ServerTLS | None:
        """TLS of the gRPC port; None = plaintext."""
        return security.server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)

    def validate(self) -> None:
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

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = VerifierConfig()

    def default(name: str):
        # Environment first, then the dataclass default; argparse applies `type` to string defaults.
        return env.get(ENV_PREFIX + name.upper(), getattr(defaults, name))

    p = argparse.ArgumentParser(prog="python -m verifier_svc", description="Speculative-decoding verifier service")
    p.add_argument("--model", default=default("model"), help="target checkpoint folder (env SPECDEC_MODEL)")
    p.add_argument("--port", type=int, default=default("port"), help="port, 0 = any free one (env SPECDEC_PORT)")
    p.add_argument("--host", default=default("host"), help="address to bind (env SPECDEC_HOST)")
    p.add_argument("--device", default=default("device"), help="auto | cpu | cuda (env SPECDEC_DEVICE)")
    p.add_argument("--dtype", default=default("dtype"), help="auto | float32 | bfloat16 (env SPECDEC_DTYPE)")
    p.add_argument("--max-slots", type=int, default=default("max_slots"), help="env SPECDEC_MAX_SLOTS")
    p.add_argument("--max-seq-len", type=int, default=default("max_seq_len"), help="env SPECDEC_MAX_SEQ_LEN")
    p.add_argument("--max-batch-size", type=int, default=default("max_batch_size"), help="env SPECDEC_MAX_BATCH_SIZE")
    p.add_argument("--torch-threads", type=int, default=default("torch_threads"),
                   help="intra-op CPU threads, 0 = torch default (env SPECDEC_TORCH_THREADS)")
    p.add_argument("--warmup-tokens", type=int, default=default("warmup_tokens"),
                   help="before serving, compile the kernels of batches of 1..N tokens, 0 = none "
                        "(env SPECDEC_WARMUP_TOKENS)")
    p.add_argument("--metrics-port", type=int, default=default("metrics_port"),
                   help="Prometheus metrics port, 0 = none (env SPECDEC_METRICS_PORT)")
    p.add_argument("--log-level", default=default("log_level"), help="env SPECDEC_LOG_LEVEL")
    p.add_argument("--tls-cert", default=default("tls_cert"),
                   help="PEM certificate (chain) of the gRPC port; with --tls-key turns TLS on (env SPECDEC_TLS_CERT)")
    p.add_argument("--tls-key", default=default("tls_key"), help="PEM private key of --tls-cert (env SPECDEC_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=default("tls_client_ca"),
                   help="PEM CA: callers must present a certificate it signed, i.e. mutual TLS "
                        "(env SPECDEC_TLS_CLIENT_CA)")
    return p


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> VerifierConfig:
    """Flags override SPECDEC_<NAME> environment variables, which override the defaults."""
    args = _parser(os.environ if env is None else env).parse_args(argv)
    config = VerifierConfig(**vars(args))
    config.validate()
    return config

"""Configuration of the proposer service: one typed object, filled from flags with SPECDEC_<NAME> env fallbacks."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from specdec import security
from specdec.checkpoint import DEFAULT_DRAFT, DEFAULT_MEDUSA

KINDS = ("ngram", "draft", "medusa")
# A draft model's passes run over a few tokens per request: more threads gain next to nothing there, and
# their spinning takes the cores the verifier computes on (on the 2-core development machine a light-load
# draft step was 1.2x faster with one draft thread than with two; docs/bench/README.md in git history).
DRAFT_TORCH_THREADS = 1


@dataclass
class ProposerConfig:
    kind: str = "ngram"
    port: int = 0  # 0: any free port (logged at start)
    host: str = "127.0.0.1"
    model: Path | None = None  # draft checkpoint / medusa heads folder (defaults: models/code-draft, models/code-medusa)
    target_model: Path | None = None  # medusa: the target checkpoint, for heads that read through its lm_head
    min_n: int = 1  # ngram: shortest suffix looked up
    max_n: int = 4  # ngram: longest suffix looked up (tried first)
    max_budget: int = 8  # most candidate nodes per request per step; larger budgets are capped
    top_k: int = 4  # medusa: candidates per head a tree node may branch into
    max_slots: int = 64  # draft: KV-cache slots, i.e. requests with a draft cache at once
    max_seq_len: int = 1024  # draft: tokens one slot holds
    device: str = "auto"  # draft: auto | cpu | cuda[:i]
    dtype: str = "auto"  # draft: auto | float32 | bfloat16 | float16
    vocab_size: int | None = None  # ngram: token ids >= this are rejected (default: from --model, else unchecked)
    torch_threads: int = 0  # torch (and NumPy BLAS) intra-op threads; 0 = the kind's default (intra_op_threads())
    grace_s: float = 5.0  # graceful-shutdown wait for in-flight calls
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

    def intra_op_threads(self) -> int:
        """Torch intra-op threads to run with: --torch-threads, else DRAFT_TORCH_THREADS for a draft, else 0
        (torch's default)."""
        if self.torch_threads > 0:
            return self.torch_threads
        return DRAFT_TORCH_THREADS if self.kind == "draft" else 0

    def validate(self) -> "ProposerConfig":
        """Raise ValueError with an actionable message when the configuration cannot work."""
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be in 0..65535 (0 = none), got {self.metrics_port}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= --min-n <= --max-n, got {self.min_n} and {self.max_n}")
        for name in ("max_budget", "max_slots", "max_seq_len", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"--vocab-size must be >= 1, got {self.vocab_size}")
        _ = self.tls  # reads the files: a wrong path is reported before a model loads
        if self.kind == "draft":
            from specdec.runner import check_device  # torch: only once the flags are read

            check_device(self.device)
        if self.kind == "draft" and self.model is None:
            self.model = DEFAULT_DRAFT
        if self.kind == "medusa" and self.model is None:
            self.model = DEFAULT_MEDUSA
        return self

    def describe(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()})


def _env(name: str, default):
    return os.environ.get(f"SPECDEC_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    d = ProposerConfig()
    p = argparse.ArgumentParser(
        prog="python -m proposer_svc",
        description="Speculative-candidate proposer service (gRPC specdec.v1.Proposer). "
        "Every flag falls back to the environment variable SPECDEC_<FLAG_NAME>, e.g. SPECDEC_MAX_N.",
    )
    # argparse runs `type` over string defaults, so env values are parsed like flags.
    p.add_argument("--kind", choices=KINDS, default=_env("kind", d.kind))
    p.add_argument("--port", type=int, default=_env("port", d.port), help="0 = any free port (logged)")
    p.add_argument("--host", default=_env("host", d.host))
    p.add_argument("--model", type=Path, default=_env("model", None),
                   help=f"draft checkpoint folder (default {DEFAULT_DRAFT}), or medusa heads folder (default "
                   f"{DEFAULT_MEDUSA}); for ngram, only its vocab size is read")
    p.add_argument("--target-model", type=Path, default=_env("target_model", None),
                   help="medusa: the target checkpoint folder, read for heads that share the target's lm_head")
    p.add_argument("--min-n", type=int, default=_env("min_n", d.min_n))
    p.add_argument("--max-n", type=int, default=_env("max_n", d.max_n))
    p.add_argument("--max-budget", type=int, default=_env("max_budget", d.max_budget))
    p.add_argument("--top-k", type=int, default=_env("top_k", d.top_k),
                   help="medusa: candidates per head a tree node may branch into")
    p.add_argument("--max-slots", type=int, default=_env("max_slots", d.max_slots))
    p.add_argument("--max-seq-len", type=int, default=_env("max_seq_len", d.max_seq_len))
    p.add_argument("--device", default=_env("device", d.device))
    p.add_argument("--dtype", default=_env("dtype", d.dtype))
    p.add_argument("--vocab-size", type=int, default=_env("vocab_size", None))
    p.add_argument("--torch-threads", type=int, default=_env("torch_threads", d.torch_threads),
                   help=f"torch (and NumPy BLAS) intra-op threads; 0 = {DRAFT_TORCH_THREADS} for a draft, "
                        "torch's default otherwise")
    p.add_argument("--grace-s", type=float, default=_env("grace_s", d.grace_s))
    p.add_argument("--metrics-port", type=int, default=_env("metrics_port", d.metrics_port),
                   help="Prometheus metrics port, 0 = none")
    p.add_argument("--log-level", default=_env("log_level", d.log_level))
    p.add_argument("--tls-cert", default=_env("tls_cert", None),
                   help="PEM certificate (chain) of the gRPC port; with --tls-key turns TLS on")
    p.add_argument("--tls-key", default=_env("tls_key", None), help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=_env("tls_client_ca", None),
                   help="PEM CA: callers must present a certificate it signed (mutual TLS)")
    return p


def parse_config(argv: Sequence[str] | None = None) -> ProposerConfig:
    """Flags (then SPECDEC_* env vars, then defaults) -> a validated ProposerConfig; exits with usage on error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = ProposerConfig(**vars(args))
    try:
        return config.validate()
    except ValueError as exc:
        parser.error(str(exc))

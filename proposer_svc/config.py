"""Configuration of the proposer service: one typed object, filled from flags with SPECDEC_<NAME> env fallbacks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from specdec.model.checkpoint import DEFAULT_DRAFT, DEFAULT_MEDUSA
from specdec.rpc import security, settings
from specdec.rpc.settings import setting

KINDS = ("ngram", "draft", "medusa")
# A draft model's passes run over a few tokens per request: more threads gain next to nothing there, and
# their spinning takes the cores the verifier computes on (on the 2-core development machine a light-load
# draft step was 1.2x faster with one draft thread than with two; docs/bench/README.md in git history).
DRAFT_TORCH_THREADS = 1


@dataclass
class ProposerConfig:
    kind: str = setting("ngram", choices=KINDS)
    port: int = setting(0, "0 = any free port (logged)")
    host: str = setting("127.0.0.1")
    model: Path | None = setting(
        None, f"draft checkpoint folder (default {DEFAULT_DRAFT}), or medusa heads folder (default {DEFAULT_MEDUSA}); "
              "for ngram, only its vocab size is read")
    target_model: Path | None = setting(
        None, "medusa: the target checkpoint folder, read for heads that share the target's lm_head")
    min_n: int = setting(1, "ngram: shortest suffix looked up")
    max_n: int = setting(4, "ngram: longest suffix looked up (tried first)")
    max_budget: int = setting(8, "most candidate nodes per request per step; larger budgets are capped")
    top_k: int = setting(4, "medusa: candidates per head a tree node may branch into")
    free: str = setting("auto", "medusa: propose a tree for every request before each plan (yes), or only where "
                                "the plan asks for one (no); auto: yes when the heads' vocabulary projections are "
                                "small (proposer_svc/medusa.py)", choices=("auto", "yes", "no"))
    max_slots: int = setting(64, "draft: KV-cache slots, i.e. requests with a draft cache at once")
    max_seq_len: int = setting(1024, "draft: tokens one slot holds")
    device: str = setting("auto", "draft: auto | cpu | cuda[:i]")
    dtype: str = setting("auto", "draft: auto | float32 | bfloat16 | float16")
    vocab_size: int | None = setting(
        None, "ngram: token ids >= this are rejected (default: from --model, else unchecked)")
    torch_threads: int = setting(0, f"torch (and NumPy BLAS) intra-op threads; 0 = {DRAFT_TORCH_THREADS} for a "
                                    "draft, torch's default otherwise")
    grace_s: float = setting(5.0, "graceful-shutdown wait for in-flight calls")
    metrics_port: int = setting(0, "Prometheus metrics port, 0 = none")
    log_level: str = setting("INFO")
    tls_cert: str | None = setting(None, "PEM certificate (chain) of the gRPC port; with --tls-key turns TLS on")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(None, "PEM CA: callers must present a certificate it signed (mutual TLS)")

    def __post_init__(self) -> None:
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
            from specdec.model.runner import check_device  # torch: only once the flags are read

            check_device(self.device)
        if self.model is None:
            self.model = {"draft": DEFAULT_DRAFT, "medusa": DEFAULT_MEDUSA}.get(self.kind)

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

    def describe(self) -> str:
        """One line per setting, for the start-up log."""
        return settings.describe(self)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    return settings.build_parser(
        ProposerConfig, env, prog="python -m proposer_svc",
        description="Speculative-candidate proposer service (gRPC specdec.v1.Proposer).")


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ProposerConfig:
    """Flags (then SPECDEC_* env vars, then defaults) -> a validated ProposerConfig; exits with usage on error."""
    return settings.parse_args(ProposerConfig, build_parser(env), argv, env)

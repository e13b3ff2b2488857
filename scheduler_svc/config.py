"""The scheduler's configuration: one typed object, filled from flags with SPECDEC_<NAME> env fallbacks.

It imports nothing of the policies or the engine (they import it): the batch-size table's format is read
and checked here, where the flag is, and batch_size_policies.py looks k up in the parsed table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Mapping, Sequence

from scheduler_svc.types import DEFAULT_BATCH_SIZE_TABLE, NO_PROPOSER, parse_batch_size_table
from specdec.rpc import security, settings
from specdec.rpc.settings import setting

POLICIES = ("smartspec", "none", "fixed", "batch-uniform", "disable-by-batch-size", "batch-size-table")
DEFAULT_POLICY = "smartspec"


@dataclass(frozen=True)
class ProposerAddress:
    """One configured proposer service: the name requests use, and where it listens."""

    name: str
    address: str  # HOST:PORT


def parse_proposer(spec: str) -> ProposerAddress:
    """`NAME=HOST:PORT` -> ProposerAddress, with a message naming the expected form on error."""
    name, sep, address = spec.partition("=")
    name, address = name.strip(), address.strip()
    if not sep or not name or ":" not in address:
        raise ValueError(f"--proposer {spec!r}: expected NAME=HOST:PORT, e.g. ngram=127.0.0.1:50061")
    return ProposerAddress(name, address)


_FOR_GOODPUT = "(smartspec, batch-uniform)"  # the policies the goodput settings tune


@dataclass(frozen=True)
class SchedulerConfig:
    verifier: str = setting(help="HOST:PORT of the verifier service", metavar="HOST:PORT")
    proposers: tuple[ProposerAddress, ...] = setting(
        (), "a proposer service (repeatable)", flag="--proposer", metavar="NAME=HOST:PORT", parse=parse_proposer)
    host: str = setting("127.0.0.1")
    port: int = setting(50051)
    policy: str = setting(DEFAULT_POLICY, "speculation policy (default smartspec: per-request k maximising goodput)",
                          choices=POLICIES)
    k: int = setting(3, "speculated tokens per step (fixed and disable-by-batch-size policies)")
    max_k: int = setting(8, f"most tokens speculated per request and step {_FOR_GOODPUT}")
    max_tree_nodes: int = setting(
        16, f"most candidate-tree nodes verified per request and step, for tree proposers (medusa) {_FOR_GOODPUT}")
    ema_alpha: float = setting(0.3, f"weight of one step in a request's acceptance estimate {_FOR_GOODPUT}")
    cost_window: int = setting(256, f"recent steps the step-time model is fitted over {_FOR_GOODPUT}")
    profile_s: float = setting(2.0, f"time budget of the start-up cost profile, 0 = none {_FOR_GOODPUT}")
    disable_batch_size: int = setting(8, "disable-by-batch-size: no speculation above this many running requests")
    batch_size_table: str = setting(DEFAULT_BATCH_SIZE_TABLE,
                                    "batch-size-table: k per range of running requests, LO-HI:K,...,LO-:K")
    tokenizer: str | None = setting(None, "tokenizer folder (default: the verifier's model folder)")
    max_tokens_limit: int = setting(1024, "largest max_tokens a request may ask for")
    max_waiting: int = setting(256, "queued (not yet admitted) requests before RESOURCE_EXHAUSTED")
    # gRPC refuses a larger request before Python parses it (a megabyte message holds the event loop for
    # milliseconds). 1 MiB is 16x a 1024-token context of 64-byte tokens.
    max_request_bytes: int = setting(
        1 << 20, "largest public gRPC request; larger ones get RESOURCE_EXHAUSTED unread (default 1 MiB)")
    proposer_timeout_s: float = setting(5.0, "one Propose step; a late proposer only loses its speculation")
    proposer_backoff_s: float = setting(1.0, "how long a proposer that failed a step is left out")
    verifier_timeout_s: float = setting(120.0, "one Prefill/Verify call")
    verifier_backoff_max_s: float = setting(2.0, "cap of the retry backoff after verifier errors")
    step_record_limit: int = setting(10_000, "engine step records kept in memory for benchmarks")
    grace_s: float = setting(5.0, "graceful-shutdown time for in-flight calls")
    metrics_port: int = setting(0, "Prometheus metrics port, 0 = none")
    # One code path with the gRPC API, in this process.
    http_port: int = setting(0, "serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                                "/v1/chat/completions, /health) on this port of --host, 0 = none (default)")
    model_name: str | None = setting(
        None, "the model's name in requests and /v1/models (default: the checkpoint folder's name)")
    log_level: str = setting("INFO")
    tls_cert: str | None = setting(
        None, "PEM certificate (chain) of the public port; with --tls-key turns TLS on", group="security")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert", group="security")
    tls_client_ca: str | None = setting(
        None, "PEM CA: public clients must present a certificate it signed (mutual TLS)", group="security")
    api_keys_file: str | None = setting(
        None, "file of accepted API keys, one per line, # comment lines; public calls must send 'authorization: "
              "Bearer <key>'. Keys in SPECDEC_API_KEYS (comma-separated) are accepted too; with neither, the API "
              "is open", group="security")
    api_keys: tuple[str, ...] = setting((), env_only=True, secret=True)
    # The scheduler's own calls to the verifier and the proposers.
    internal_tls_ca: str | None = setting(
        None, "PEM CA the verifier's and proposers' certificates chain to; turns TLS on for the scheduler's calls "
              "to them", group="security")
    internal_tls_cert: str | None = setting(
        None, "PEM client certificate presented to the verifier and proposers (for their --tls-client-ca)",
        group="security")
    internal_tls_key: str | None = setting(None, "PEM private key of --internal-tls-cert", group="security")

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.k < 0:
            raise ValueError(f"--k must be >= 0, got {self.k}")
        if self.max_k < 0:
            raise ValueError(f"--max-k must be >= 0, got {self.max_k}")
        if self.max_tree_nodes < 0:
            raise ValueError(f"--max-tree-nodes must be >= 0, got {self.max_tree_nodes}")
        if not 0 < self.ema_alpha <= 1:
            raise ValueError(f"--ema-alpha must be in (0, 1], got {self.ema_alpha}")
        if self.cost_window < 1 or self.profile_s < 0 or self.disable_batch_size < 0:
            raise ValueError("--cost-window must be >= 1, --profile-s and --disable-batch-size >= 0")
        parse_batch_size_table(self.batch_size_table)
        if self.max_tokens_limit < 1:
            raise ValueError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}")
        if self.max_waiting < 0:
            raise ValueError(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be a port number (0 = no HTTP API), got {self.http_port}")
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"--http-port {self.http_port} is the gRPC port (--port) too; give it a port of its own")
        for flag, value in (("--proposer-timeout-s", self.proposer_timeout_s),
                            ("--verifier-timeout-s", self.verifier_timeout_s),
                            ("--step-record-limit", self.step_record_limit)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        names = [p.name for p in self.proposers]
        if NO_PROPOSER in names:
            raise ValueError(f"a proposer may not be named {NO_PROPOSER!r}: requests use it to turn speculation off")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"proposer names must be unique; repeated: {', '.join(dupes)}")
        # Files are read now, so that a wrong path is one line at start, not a failure at the first call.
        _ = self.tls, self.internal_tls, self.accepted_api_keys()

    @property
    def tls(self) -> security.ServerTLS | None:
        """TLS of the public port; None = plaintext."""
        return security.server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def internal_tls(self) -> security.ClientTLS | None:
        """TLS of the channels to the verifier and the proposers; None = plaintext."""
        return security.client_tls(self.internal_tls_ca, self.internal_tls_cert, self.internal_tls_key,
                                   flag_prefix="--internal-tls")

    def accepted_api_keys(self) -> frozenset[str]:
        """The keys a public call may present (read from the key file now); empty = no key needed."""
        return security.load_api_keys(self.api_keys_file, ",".join(self.api_keys))

    @property
    def proposer_names(self) -> list[str]:
        return [p.name for p in self.proposers]

    def describe(self) -> str:
        """One line per setting, for the start-up log (API keys only counted)."""
        return settings.describe(self)


def build_arg_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    return settings.build_parser(
        SchedulerConfig, env, prog="python -m scheduler_svc",
        description="The specdec scheduler: public Generation API, admission, speculation policy and the step loop.",
        groups={"security": "TLS and API keys; every setting is off unless given"})


def config_from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> SchedulerConfig:
    """Parse flags (falling back to SPECDEC_* env vars) into a SchedulerConfig; exits on bad flags."""
    return settings.parse_args(SchedulerConfig, build_arg_parser(env), argv, env)

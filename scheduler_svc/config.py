"""The scheduler's configuration: one typed object, filled from flags with SPECDEC_<NAME> env fallbacks.

It imports nothing of the policies or the engine (they import it): the batch-size table's format is read
and checked here, where the flag is, and batch_size_policies.py looks k up in the parsed table.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

from specdec import security

POLICIES = ("smartspec", "none", "fixed", "batch-uniform", "disable-by-batch-size", "batch-size-table")
DEFAULT_POLICY = "smartspec"
# A request's `proposer` field uses this name to turn speculation off, so no proposer may be called so.
NO_PROPOSER = "none"
DEFAULT_BATCH_SIZE_TABLE = "1-4:5,5-16:3,17-:0"


@dataclass(frozen=True)
class ProposerAddress:
    """One configured proposer service: the name requests use, and where it listens."""

    name: str
    address: str  # HOST:PORT


@dataclass(frozen=True)
class BatchSizeRange:
    """Batch sizes lo..hi (hi None: no upper end) speculate k tokens per request."""

    lo: int
    hi: int | None
    k: int

    def __contains__(self, batch_size: int) -> bool:
        return self.lo <= batch_size and (self.hi is None or batch_size <= self.hi)


def parse_batch_size_table(spec: str) -> tuple[BatchSizeRange, ...]:
    """'1-8:4,9-32:2,33-:0' -> ranges; a single size 'N:k' is allowed. Raises ValueError naming the bad part.

    Sizes not covered by any range get k = 0; ranges may not overlap.
    """
    ranges = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            sizes, k_text = part.split(":")
            lo_text, dash, hi_text = sizes.partition("-")
            lo = int(lo_text)
            hi = (int(hi_text) if hi_text.strip() else None) if dash else lo
            k = int(k_text)
        except ValueError:
            raise ValueError(f"--batch-size-table part {part!r}: expected LO-HI:K, LO-:K or N:K, "
                             f"e.g. {DEFAULT_BATCH_SIZE_TABLE!r}") from None
        if lo < 1 or (hi is not None and hi < lo) or k < 0:
            raise ValueError(f"--batch-size-table part {part!r}: need 1 <= LO <= HI and K >= 0")
        ranges.append(BatchSizeRange(lo, hi, k))
    if not ranges:
        raise ValueError(f"--batch-size-table is empty; e.g. {DEFAULT_BATCH_SIZE_TABLE!r}")
    ranges.sort(key=lambda r: r.lo)
    for a, b in zip(ranges, ranges[1:]):
        if a.hi is None or a.hi >= b.lo:
            raise ValueError(f"--batch-size-table ranges overlap: {a.lo}-{a.hi or ''} and {b.lo}-{b.hi or ''}")
    return tuple(ranges)


@dataclass(frozen=True)
class SchedulerConfig:
    verifier: str  # HOST:PORT of the verifier service
    proposers: tuple[ProposerAddress, ...] = ()
    host: str = "127.0.0.1"
    port: int = 50051
    policy: str = DEFAULT_POLICY
    k: int = 3  # speculated tokens per request and step under `fixed` and `disable-by-batch-size`
    max_k: int = 8  # most tokens the goodput policies (smartspec, batch-uniform) speculate per request
    max_tree_nodes: int = 16  # most tree nodes (tree proposers) the goodput policies verify per request
    ema_alpha: float = 0.3  # weight of one step in a request's acceptance-rate estimate (goodput policies)
    cost_window: int = 256  # recent steps the cost model is fitted over (goodput policies)
    # Seconds of arrivals the goodput policies estimate the arrival rate over (0 = ignore arrivals).
    arrival_window_s: float = 0.5
    profile_s: float = 2.0  # time budget of the start-up cost profile (goodput policies); 0 = none
    # smartspec: scale the draft's acceptance rates per position by how its chains did (rate_calibration.py)
    rate_calibration: bool = True
    disable_batch_size: int = 8  # disable-by-batch-size: no speculation above this many running requests
    batch_size_table: str = DEFAULT_BATCH_SIZE_TABLE  # batch-size-table: LO-HI:K ranges of running requests
    tokenizer: str | None = None  # default: the verifier's model folder, from its Info
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask for
    max_waiting: int = 256  # queued (not yet admitted) requests before RESOURCE_EXHAUSTED
    # Largest public request in bytes: gRPC refuses a larger one before Python parses it (a megabyte message
    # holds the event loop for milliseconds). 1 MiB is 16x a 1024-token context of 64-byte tokens.
    max_request_bytes: int = 1 << 20
    proposer_timeout_s: float = 5.0  # one Propose step; a late proposer only loses its speculation
    proposer_backoff_s: float = 1.0  # how long a failed proposer is left out before it is tried again
    verifier_timeout_s: float = 120.0  # one Prefill/Verify call
    verifier_backoff_max_s: float = 2.0  # cap of the retry backoff after verifier errors
    step_record_limit: int = 10_000  # StepRecords kept in memory (a ring buffer) for benchmarks
    grace_s: float = 5.0  # graceful-shutdown time for in-flight calls
    metrics_port: int = 0  # Prometheus /metrics on this port (same host); 0 = none
    # The OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) on this port of the
    # same host, in this process (one code path with the gRPC API); 0 = none.
    http_port: int = 0
    model_name: str | None = None  # the name requests use for the model; default: the checkpoint folder's name
    log_level: str = "INFO"
    # TLS of the public port (PEM files); with tls_client_ca, clients must present a certificate (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # API keys of the public API: this file's (one per line) plus api_keys; none at all = an open API.
    api_keys_file: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # from SPECDEC_API_KEYS; never printed
    # TLS of the scheduler's own calls to the verifier and the proposers: the CA their certificates
    # chain to, and a client certificate for services that require one (mTLS).
    internal_tls_ca: str | None = None
    internal_tls_cert: str | None = None
    internal_tls_key: str | None = None

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
        if self.arrival_window_s < 0:
            raise ValueError(f"--arrival-window-s must be >= 0, got {self.arrival_window_s}")
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
        settings = asdict(self) | {"api_keys": f"<{len(self.api_keys)} from {security.API_KEYS_ENV}>"}
        return "\n".join(f"  {key} = {value}" for key, value in settings.items())


def parse_proposer(spec: str) -> ProposerAddress:
    """`NAME=HOST:PORT` -> ProposerAddress, with a message naming the expected form on error."""
    name, sep, address = spec.partition("=")
    name, address = name.strip(), address.strip()
    if not sep or not name or ":" not in address:
        raise ValueError(f"--proposer {spec!r}: expected NAME=HOST:PORT, e.g. ngram=127.0.0.1:50061")
    return ProposerAddress(name, address)


def _env(name: str, default):
    return os.environ.get(f"SPECDEC_{name}", default)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler_svc",
        description="The specdec scheduler: public Generation API, admission, speculation policy and the step loop.",
    )
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(_env("PORT", 50051)))
    parser.add_argument("--verifier", default=_env("VERIFIER", None), help="HOST:PORT of the verifier service")
    parser.add_argument(
        "--proposer",
        action="append",
        default=None,
        metavar="NAME=HOST:PORT",
        help="a proposer service (repeatable); env SPECDEC_PROPOSER takes a comma-separated list",
    )
    parser.add_argument("--policy", choices=POLICIES, default=_env("POLICY", DEFAULT_POLICY),
                        help="speculation policy (default smartspec: per-request k maximising goodput)")
    parser.add_argument("--k", type=int, default=int(_env("K", 3)),
                        help="speculated tokens per step (fixed and disable-by-batch-size policies)")
    parser.add_argument("--max-k", type=int, default=int(_env("MAX_K", 8)),
                        help="most tokens speculated per request and step (smartspec, batch-uniform)")
    parser.add_argument("--max-tree-nodes", type=int, default=int(_env("MAX_TREE_NODES", 16)),
                        help="most candidate-tree nodes verified per request and step, for tree proposers "
                             "(medusa) (smartspec, batch-uniform)")
    parser.add_argument("--ema-alpha", type=float, default=float(_env("EMA_ALPHA", 0.3)),
                        help="weight of one step in a request's acceptance estimate (smartspec, batch-uniform)")
    parser.add_argument("--cost-window", type=int, default=int(_env("COST_WINDOW", 256)),
                        help="recent steps the step-time model is fitted over (smartspec, batch-uniform)")
    parser.add_argument("--arrival-window-s", type=float, default=float(_env("ARRIVAL_WINDOW_S", 0.5)),
                        help="seconds over which the arrival rate is measured; a step's length is also "
                             "weighed by the wait it imposes on arrivals, 0 = ignore them (smartspec, "
                             "batch-uniform)")
    parser.add_argument("--profile-s", type=float, default=float(_env("PROFILE_S", 2.0)),
                        help="time budget of the start-up cost profile, 0 = none (smartspec, batch-uniform)")
    parser.add_argument("--rate-calibration", type=int, choices=(0, 1),
                        default=int(_env("RATE_CALIBRATION", 1)),
                        help="1: scale the draft's acceptance rates per position by how its chains did, "
                             "0: use them as estimated (smartspec)")
    parser.add_argument("--disable-batch-size", type=int, default=int(_env("DISABLE_BATCH_SIZE", 8)),
                        help="disable-by-batch-size: no speculation above this many running requests")
    parser.add_argument("--batch-size-table", default=_env("BATCH_SIZE_TABLE", DEFAULT_BATCH_SIZE_TABLE),
                        help="batch-size-table: k per range of running requests, LO-HI:K,...,LO-:K")
    parser.add_argument("--tokenizer", default=_env("TOKENIZER", None),
                        help="tokenizer folder (default: the verifier's model folder)")
    parser.add_argument("--max-tokens-limit", type=int, default=int(_env("MAX_TOKENS_LIMIT", 1024)))
    parser.add_argument("--max-waiting", type=int, default=int(_env("MAX_WAITING", 256)))
    parser.add_argument("--max-request-bytes", type=int, default=int(_env("MAX_REQUEST_BYTES", 1 << 20)),
                        help="largest public gRPC request; larger ones get RESOURCE_EXHAUSTED unread (default 1 MiB)")
    parser.add_argument("--proposer-timeout-s", type=float, default=float(_env("PROPOSER_TIMEOUT_S", 5.0)))
    parser.add_argument("--proposer-backoff-s", type=float, default=float(_env("PROPOSER_BACKOFF_S", 1.0)),
                        help="how long a proposer that failed a step is left out")
    parser.add_argument("--verifier-timeout-s", type=float, default=float(_env("VERIFIER_TIMEOUT_S", 120.0)))
    parser.add_argument("--verifier-backoff-max-s", type=float, default=float(_env("VERIFIER_BACKOFF_MAX_S", 2.0)),
                        help="cap of the retry backoff after verifier errors")
    parser.add_argument("--step-record-limit", type=int, default=int(_env("STEP_RECORD_LIMIT", 10_000)),
                        help="engine step records kept in memory for benchmarks")
    parser.add_argument("--grace-s", type=float, default=float(_env("GRACE_S", 5.0)),
                        help="graceful-shutdown time for in-flight calls")
    parser.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", 0)),
                        help="Prometheus metrics port, 0 = none")
    parser.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 0)),
                        help="serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                             "/v1/chat/completions, /health) on this port of --host, 0 = none (default)")
    parser.add_argument("--model-name", default=_env("MODEL_NAME", None),
                        help="the model's name in requests and /v1/models (default: the checkpoint folder's name)")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    tls = parser.add_argument_group("security", "TLS and API keys; every setting is off unless given")
    tls.add_argument("--tls-cert", default=_env("TLS_CERT", None),
                     help="PEM certificate (chain) of the public port; with --tls-key turns TLS on")
    tls.add_argument("--tls-key", default=_env("TLS_KEY", None), help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA", None),
                     help="PEM CA: public clients must present a certificate it signed (mutual TLS)")
    tls.add_argument("--api-keys-file", default=_env("API_KEYS_FILE", None),
                     help="file of accepted API keys, one per line, # comment lines; public calls must send "
                          "'authorization: Bearer <key>'. Keys in SPECDEC_API_KEYS (comma-separated) are "
                          "accepted too; with neither, the API is open")
    tls.add_argument("--internal-tls-ca", default=_env("INTERNAL_TLS_CA", None),
                     help="PEM CA the verifier's and proposers' certificates chain to; turns TLS on for the "
                          "scheduler's calls to them")
    tls.add_argument("--internal-tls-cert", default=_env("INTERNAL_TLS_CERT", None),
                     help="PEM client certificate presented to the verifier and proposers (for their "
                          "--tls-client-ca)")
    tls.add_argument("--internal-tls-key", default=_env("INTERNAL_TLS_KEY", None),
                     help="PEM private key of --internal-tls-cert")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> SchedulerConfig:
    """Parse flags (falling back to SPECDEC_* env vars) into a SchedulerConfig; exits on bad flags."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if not args.verifier:
        parser.error("--verifier HOST:PORT is required (or set SPECDEC_VERIFIER)")
    specs = args.proposer
    if specs is None:
        env = _env("PROPOSER", "")
        specs = [s for s in env.split(",") if s.strip()]
    try:
        return SchedulerConfig(
            verifier=args.verifier,
            proposers=tuple(parse_proposer(s) for s in specs),
            host=args.host,
            port=args.port,
            policy=args.policy,
            k=args.k,
            max_k=args.max_k,
            max_tree_nodes=args.max_tree_nodes,
            ema_alpha=args.ema_alpha,
            cost_window=args.cost_window,
            rate_calibration=bool(args.rate_calibration),
            arrival_window_s=args.arrival_window_s,
            profile_s=args.profile_s,
            disable_batch_size=args.disable_batch_size,
            batch_size_table=args.batch_size_table,
            tokenizer=args.tokenizer,
            max_tokens_limit=args.max_tokens_limit,
            max_waiting=args.max_waiting,
            max_request_bytes=args.max_request_bytes,
            proposer_timeout_s=args.proposer_timeout_s,
            proposer_backoff_s=args.proposer_backoff_s,
            verifier_timeout_s=args.verifier_timeout_s,
            verifier_backoff_max_s=args.verifier_backoff_max_s,
            step_record_limit=args.step_record_limit,
            grace_s=args.grace_s,
            metrics_port=args.metrics_port,
            http_port=args.http_port,
            model_name=args.model_name,
            log_level=args.log_level,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            api_keys_file=args.api_keys_file,
            api_keys=tuple(k.strip() for k in _env("API_KEYS", "").split(",") if k.strip()),
            internal_tls_ca=args.internal_tls_ca,
            internal_tls_cert=args.internal_tls_cert,
            internal_tls_key=args.internal_tls_key,
        )
    except ValueError as exc:
        parser.error(str(exc))

"""The `specdec` command: `specdec up` runs the stack locally, `specdec generate` streams a completion,
`specdec chat` talks to a chat model (one message, or a conversation on stdin).

Expected failures (bad arguments, server unreachable, deadline, server full) print one clear line to stderr
and exit with 2 (the request or the flags are wrong) or 1 (anything else), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import asdict, fields, replace
from typing import TYPE_CHECKING

from specdec_client.types import GenerationResult

if TYPE_CHECKING:
    from specdec.rpc.security import ClientTLS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _error(message: str) -> None:
    print(f"specdec: error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# specdec up


def _split_proposers(value: str) -> list[str]:
    kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
    return [] if kinds == ["none"] else kinds


def cmd_up(args: argparse.Namespace) -> int:
    """Start the stack, report where it serves, run until SIGINT/SIGTERM, then stop every process."""
    from specdec.model.checkpoint import DEFAULT_DRAFT, DEFAULT_MEDUSA, DEFAULT_TARGET, CheckpointError, validate_checkpoint
    from specdec.ops.launcher import PROPOSER_KINDS, Stack, StackError, local_specs, metrics_port, port_is_free
    from scheduler_svc.config import POLICIES
    from specdec.model.medusa import MedusaError, load_medusa_heads
    from specdec.model.runner import check_device

    proposers = _split_proposers(args.proposers)
    # Every flag is checked before anything starts: a service that refuses one would only say so in its log,
    # after the others spent their start-up loading models.
    unknown = [kind for kind in proposers if kind not in PROPOSER_KINDS]
    if unknown:
        _error(f"--proposers: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(PROPOSER_KINDS)} or none")
        return EXIT_USAGE
    if args.policy not in POLICIES:
        _error(f"--policy {args.policy!r} is not a policy; choose from {', '.join(POLICIES)}")
        return EXIT_USAGE
    if args.k < 0:
        _error(f"--k must be >= 0, got {args.k}")
        return EXIT_USAGE
    if args.max_restarts < 0:
        _error(f"--max-restarts must be >= 0, got {args.max_restarts}")
        return EXIT_USAGE
    try:
        check_device(args.device or "auto")
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    model = args.model or str(DEFAULT_TARGET)
    draft_model = args.draft_model or str(DEFAULT_DRAFT)
    medusa_model = args.medusa_model or str(DEFAULT_MEDUSA)
    try:
        # Checked here because a service that fails on its model only says so in its log.
        validate_checkpoint(model)
        if any(PROPOSER_KINDS.get(kind) == "draft" for kind in proposers):
            validate_checkpoint(draft_model, need_tokenizer=False)  # the draft shares the target's tokenizer
        if any(PROPOSER_KINDS.get(kind) == "medusa" for kind in proposers):
            load_medusa_heads(medusa_model, target=model)  # heads may read through the target's lm_head
    except (CheckpointError, MedusaError) as exc:
        _error(f"{exc} (pass --model / --draft-model / --medusa-model)")
        return EXIT_USAGE
    if args.port and not port_is_free(args.host, args.port):
        _error(f"port {args.port} on {args.host} is in use (another `specdec up`?); pick one with --port")
        return EXIT_USAGE
    if args.http_port and (args.http_port == args.port or not port_is_free(args.host, args.http_port)):
        _error(f"--http-port {args.http_port} on {args.host} is in use; pick another")
        return EXIT_USAGE
    try:
        scheduler_args, probe_tls, keys_required = _public_security(args)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        specs = local_specs(args.port, proposers, policy=args.policy, k=args.k, model=model,
                            draft_model=draft_model, medusa_model=medusa_model, host=args.host, device=args.device,
                            dtype=args.dtype, log_level=args.log_level, metrics=not args.no_metrics,
                            extra_args={"scheduler": scheduler_args}, http_port=args.http_port)
        # The launcher's readiness probe must speak TLS to a TLS port.
        specs = [replace(spec, tls=probe_tls) if spec.name == "scheduler" else spec for spec in specs]
        stack = Stack(specs, log_dir=args.log_dir, startup_timeout_s=args.startup_timeout, grace_s=args.grace,
                      max_restarts=args.max_restarts)
    except StackError as exc:
        _error(str(exc))
        return EXIT_USAGE

    stop_requested = threading.Event()

    def on_signal(signum, frame):
        stop_requested.set()
        raise KeyboardInterrupt  # interrupts a start in progress; start() stops what it started

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start()
        scheduler = stack.spec("scheduler")
        others = ", ".join(f"{spec.name} {spec.address}" for spec in stack.specs if spec.name != "scheduler")
        print(f"specdec stack ready on {scheduler.address} (policy {args.policy}, k={args.k}, "
              f"proposers: {', '.join(proposers) or 'none'}; {others}); logs in {stack.log_dir}; "
              f"Ctrl-C to stop", flush=True)
        print(f"public port: {'TLS' if probe_tls else 'plaintext'}, API key "
              f"{'required' if keys_required else 'not required'}", flush=True)
        if args.http_port:
            host = scheduler.address.rsplit(":", 1)[0]
            print(f"OpenAI-compatible HTTP API: {'https' if probe_tls else 'http'}://{host}:{args.http_port}/v1",
                  flush=True)
        endpoints = [f"{s.name} http://{s.address.rsplit(':', 1)[0]}:{metrics_port(s)}/metrics"
                     for s in stack.specs if metrics_port(s)]
        if endpoints:
            print(f"metrics: {', '.join(endpoints)}", flush=True)
        while not stop_requested.wait(0.5):
            stack.supervise()  # restarts a crashed service; raises StackError once one crashes too often
    except KeyboardInterrupt:
        pass
    except StackError as exc:
        _error(str(exc))
        return EXIT_FAILED
    finally:
        # A second Ctrl-C must not abandon half-stopped services; stop() is bounded by the grace period.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        print("specdec: stopping the stack", file=sys.stderr, flush=True)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _public_security(args: argparse.Namespace) -> tuple[list[str], ClientTLS | None, bool]:
    """For `specdec up --tls-cert/--tls-key/--api-keys-file`: the scheduler's flags (absolute paths, as
    the services may run from another folder), checked now so that a wrong file is one line before
    anything starts; the TLS of the launcher's readiness probe (it trusts --tls-ca, else the certificate
    itself, right for a self-signed one); and whether calls need a key (SPECDEC_API_KEYS, when set,
    reaches the scheduler through the environment)."""
    import os
    from pathlib import Path

    from specdec.rpc.security import API_KEYS_ENV, client_tls, load_api_keys, server_tls

    tls = server_tls(args.tls_cert, args.tls_key)
    flags: list[str] = []
    probe = None
    if tls is not None:
        flags += ["--tls-cert", str(Path(tls.cert_file).resolve()), "--tls-key", str(Path(tls.key_file).resolve())]
        probe = client_tls(args.tls_ca or tls.cert_file, flag_prefix="--tls")
    elif args.tls_ca:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key (it is the CA of that certificate)")
    keys = load_api_keys(args.api_keys_file, os.environ.get(API_KEYS_ENV))
    if args.api_keys_file:
        flags += ["--api-keys-file", str(Path(args.api_keys_file).resolve())]
    return flags, probe, bool(keys)


# ---------------------------------------------------------------------------------------------------------
# specdec compose


def cmd_compose(args: argparse.Namespace) -> int:
    """Write compose.yaml for the stack (from the launcher's definitions), with its GPU override
    (compose.gpu.yaml) and Prometheus's scrape configuration (deploy/prometheus.yml) beside it; `-o -`
    prints compose.yaml alone."""
    from pathlib import Path

    from specdec.ops.compose import compose_specs, deployment_files
    from specdec.ops.launcher import StackError

    try:
        files = deployment_files(compose_specs(_split_proposers(args.proposers), args.policy, args.k, args.device))
    except StackError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.output == "-":
        sys.stdout.write(files["compose.yaml"])
        return EXIT_OK
    folder = Path(args.output).parent
    for name, text in files.items():
        path = Path(args.output) if name == "compose.yaml" else folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"specdec: wrote {path}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# specdec generate


def format_stats(result: GenerationResult) -> str:
    """The stats of a completion as a few human-readable lines."""
    s = result.stats
    lines = [
        f"finish: {result.finish_reason}; prompt {s.prompt_tokens} tokens, completion {s.completion_tokens} tokens",
        f"steps {s.steps}, proposed {s.proposed}, accepted {s.accepted}, "
        f"acceptance rate {s.acceptance_rate:.1%}",
    ]
    for name, p in s.proposers.items():
        lines.append(f"  {name}: steps {p.steps}, proposed {p.proposed}, accepted {p.accepted}, "
                     f"acceptance rate {p.acceptance_rate:.1%}")
    lines.append(f"time to first token {s.time_to_first_token_ms:.1f} ms, total {s.total_ms:.1f} ms")
    return "\n".join(lines)


def result_to_dict(result: GenerationResult) -> dict:
    """A generation as JSON-ready data, acceptance rates included: completion 0's fields, and every completion
    in `completions`."""
    data = _completion_to_dict(result)
    data["completions"] = [_completion_to_dict(c) for c in result.completions]
    return data


def _completion_to_dict(completion) -> dict:
    data = {f.name: getattr(completion, f.name) for f in fields(completion) if f.name != "completions"}
    data["stats"] = asdict(completion.stats)
    data["stats"]["acceptance_rate"] = completion.stats.acceptance_rate
    data["stats"]["proposers"] = {
        name: p._asdict() | {"acceptance_rate": p.acceptance_rate} for name, p in completion.stats.proposers.items()
    }
    if completion.logprobs is not None:
        data["logprobs"] = [asdict(lp) | {"top_logprobs": [t._asdict() for t in lp.top_logprobs]}
                            for lp in completion.logprobs]
    return data


def _client(args: argparse.Namespace):
    """The SDK client of `specdec generate` / `specdec chat`'s connection flags; ValueError for a bad TLS file."""
    from specdec_client import Client

    return Client(args.target, timeout=args.timeout, retries=args.retries, api_key=args.api_key, tls=args.tls,
                  tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _client_error(exc: Exception, args: argparse.Namespace, wrote_text: bool) -> int:
    """One line for an SDK error, and the exit code."""
    from specdec_client import (
        Cancelled,
        DeadlineExceeded,
        InvalidArgument,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )

    if isinstance(exc, InvalidArgument):
        _error(f"invalid request: {exc}")
        return EXIT_USAGE
    if isinstance(exc, Unauthenticated):
        _error(f"the server at {args.target} refused the call: {exc} (pass --api-key or set SPECDEC_API_KEY)")
        return EXIT_USAGE
    _end_line(wrote_text)
    if isinstance(exc, Unavailable):
        hint = "" if (args.tls or args.tls_ca) else "; if it serves TLS, pass --tls-ca or --tls"
        _error(f"the server at {args.target} is unavailable: {exc} (is `specdec up` running there{hint}?)")
    elif isinstance(exc, DeadlineExceeded):
        _error(f"deadline exceeded: {exc}")
    elif isinstance(exc, ResourceExhausted):
        _error(f"the server is full, try again later: {exc}")
    elif isinstance(exc, Cancelled):
        _error(f"cancelled: {exc}")
    else:
        _error(f"{exc.code.name}: {exc}")
    return EXIT_FAILED


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a completion to stdout as it arrives, then its stats to stderr."""
    from specdec_client import SpecdecError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop, proposer=args.proposer, ignore_eos=args.ignore_eos)
    wrote_text = False
    try:
        client = _client(args)
    except ValueError as exc:  # a TLS file that cannot be read, a malformed key
        _error(str(exc))
        return EXIT_USAGE
    try:
        with client:
            if args.json:
                result = client.generate(prompt, **params, n=args.n, top_logprobs=args.top_logprobs,
                                         logprobs=args.logprobs)
                print(json.dumps(result_to_dict(result)))
                return EXIT_OK
            if args.n != 1:
                _error("--n needs --json (the completions would interleave on stdout)")
                return EXIT_USAGE
            stream = client.stream(prompt, **params)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                wrote_text = wrote_text or bool(chunk.text)
            result = stream.collect()
    except SpecdecError as exc:
        return _client_error(exc, args, wrote_text)
    _end_line(wrote_text and not result.text.endswith("\n"))
    if not args.no_stats:
        print("---", file=sys.stderr)
        print(format_stats(result), file=sys.stderr, flush=True)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# specdec chat


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with the model through its chat template: one reply to MESSAGE, or, without one, a conversation
    read from stdin line by line (each line a user turn; the history goes with every turn) until end of input."""
    from specdec_client import SpecdecError

    params = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                  stop=args.stop, proposer=args.proposer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.message is None
    tty = sys.stdin.isatty()
    try:
        client = _client(args)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    with client:
        try:
            info = client.model_info()
        except SpecdecError as exc:
            return _client_error(exc, args, False)
        if not info.has_chat_template:
            _error(f"the model {info.model} has no chat template: use `specdec generate` for plain completions")
            return EXIT_USAGE
        if interactive and tty:
            print(f"chatting with {info.model}; an empty line is skipped, Ctrl-D ends", file=sys.stderr, flush=True)
        while True:
            if interactive:
                if tty:
                    print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    _end_line(tty)
                    return EXIT_OK
                text = line.rstrip("\n")
                if not text.strip():
                    continue
            else:
                text = args.message
            messages.append({"role": "user", "content": text})
            wrote_text = False
            try:
                stream = client.chat_stream(messages, max_tokens=args.max_tokens, **params)
                for chunk in stream:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    wrote_text = wrote_text or bool(chunk.text)
                result = stream.collect()
            except SpecdecError as exc:
                code = _client_error(exc, args, wrote_text)
                if not interactive:
                    return code
                messages.pop()  # the turn did not happen: the user may try again
                continue
            _end_line(True)
            if args.stats:
                print(format_stats(result), file=sys.stderr, flush=True)
            messages.append({"role": "assistant", "content": result.text})
            if not interactive:
                return EXIT_OK


def _end_line(needed: bool) -> None:
    if needed:
        sys.stdout.write("\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative decoding served as gRPC services.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole stack as local processes until Ctrl-C")
    up.add_argument("--port", type=int, default=50051, help="public port of the scheduler (default 50051)")
    up.add_argument("--host", default="127.0.0.1", help="address the scheduler binds (default 127.0.0.1)")
    up.add_argument("--http-port", type=int, default=0,
                    help="also serve the OpenAI-compatible HTTP API (/v1/...) on this port (default 0: none)")
    up.add_argument("--proposers", default="ngram,draft",
                    help="comma-separated proposer kinds (ngram, draft, medusa), or 'none' (default ngram,draft)")
    up.add_argument("--policy", default="smartspec", help="speculation policy of the scheduler (default smartspec)")
    up.add_argument("--k", type=int, default=3, help="tokens to speculate per step for the fixed policy")
    up.add_argument("--model", help="target checkpoint folder (default: models/smollm2-135m-instruct, "
                        "installed by make default-model)")
    up.add_argument("--draft-model", help="draft checkpoint folder (default: the embedded models/smollm2-draft)")
    up.add_argument("--medusa-model", help="Medusa heads folder (default: the embedded models/smollm2-medusa)")
    up.add_argument("--device", help="verifier device: auto, cpu or cuda (default: the verifier's)")
    up.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                    help="dtype of the verifier and the draft and Medusa proposers (default: theirs, auto = float32 "
                         "but for Medusa heads on a GPU; bfloat16 can change greedy tokens)")
    up.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                    help="log level of every service (default INFO)")
    up.add_argument("--log-dir", help="folder for the services' logs (default: a new temporary folder)")
    up.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the stack")
    up.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL at stop")
    up.add_argument("--no-metrics", action="store_true", help="serve no Prometheus metrics endpoints")
    up.add_argument("--max-restarts", type=int, default=5,
                    help="times a crashed service is restarted within 10 minutes before the stack stops (default 5)")
    up.add_argument("--tls-cert", help="PEM certificate (chain) of the public port; with --tls-key turns TLS on "
                                       "(the internal services stay plaintext on loopback)")
    up.add_argument("--tls-key", help="PEM private key of --tls-cert")
    up.add_argument("--tls-ca", help="PEM CA that signed --tls-cert, trusted by the launcher's readiness probe "
                                     "(default: --tls-cert itself, right for a self-signed certificate)")
    up.add_argument("--api-keys-file", help="file of accepted API keys, one per line (# comment lines); "
                                            "keys in SPECDEC_API_KEYS (comma-separated) are accepted too")
    up.set_defaults(run=cmd_up)

    compose = commands.add_parser("compose", help="write compose.yaml (and compose.gpu.yaml, deploy/prometheus.yml "
                                                  "beside it) from the stack's service definitions")
    compose.add_argument("-o", "--output", default="compose.yaml",
                         help="compose file to write (the others go to its folder), - for compose.yaml on stdout")
    compose.add_argument("--proposers", default="ngram,draft,medusa",
                         help="comma-separated proposer kinds, or 'none' (default: every kind)")
    compose.add_argument("--policy", default="smartspec", help="default speculation policy (SPECDEC_POLICY overrides)")
    compose.add_argument("--k", type=int, default=3, help="default k of the fixed policy (SPECDEC_K overrides)")
    compose.add_argument("--device", default="auto", help="default verifier device (SPECDEC_DEVICE overrides)")
    compose.set_defaults(run=cmd_compose)

    gen = commands.add_parser("generate", help="stream a completion from a running stack")
    gen.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    gen.add_argument("--target", default="127.0.0.1:50051", help="scheduler address (default 127.0.0.1:50051)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--proposer", default="", help="proposer name, 'none', or empty for the server's choice")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--timeout", type=float, help="deadline of the whole call in seconds")
    gen.add_argument("--retries", type=int, default=3, help="retries while the server is unavailable")
    gen.add_argument("--no-stats", action="store_true", help="do not print the stats")
    gen.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    gen.add_argument("--api-key", help="API key, sent as 'authorization: Bearer <key>' (default: SPECDEC_API_KEY)")
    gen.add_argument("--tls", action="store_true", help="use TLS, trusting the system's default CAs")
    gen.add_argument("--tls-ca", help="use TLS, trusting this PEM CA (a private CA or a self-signed certificate)")
    gen.add_argument("--tls-cert", help="PEM client certificate, for a server that requires one (mutual TLS)")
    gen.add_argument("--tls-key", help="PEM private key of --tls-cert")
    gen.add_argument("--n", type=int, default=1, help="completions of the prompt (with --json)")
    gen.add_argument("--logprobs", action="store_true", help="with --json: each token's log-probability")
    gen.add_argument("--top-logprobs", type=int, default=0,
                     help="with --json: the most likely tokens at each position, 0..20")
    gen.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="chat with the model (its chat template): one reply, or a conversation "
                                            "on stdin")
    chat.add_argument("message", nargs="?", help="one user message: print the reply and exit (without it: read "
                                                 "user turns from stdin, one a line, until end of input)")
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument("--target", default="127.0.0.1:50051", help="scheduler address (default 127.0.0.1:50051)")
    chat.add_argument("--max-tokens", type=int, default=256, help="most tokens of one reply (default 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--stop", action="append", help="stop string (repeatable)")
    chat.add_argument("--proposer", default="", help="proposer name, 'none', or empty for the server's choice")
    chat.add_argument("--stats", action="store_true", help="print each reply's stats to stderr")
    chat.add_argument("--timeout", type=float, help="deadline of each reply in seconds")
    chat.add_argument("--retries", type=int, default=3, help="retries while the server is unavailable")
    chat.add_argument("--api-key", help="API key (default: SPECDEC_API_KEY)")
    chat.add_argument("--tls", action="store_true", help="use TLS, trusting the system's default CAs")
    chat.add_argument("--tls-ca", help="use TLS, trusting this PEM CA")
    chat.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    chat.add_argument("--tls-key", help="PEM private key of --tls-cert")
    chat.set_defaults(run=cmd_chat)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `specdec` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""The whole specdec stack as local processes, for machines without a container engine.

`stack_specs()` is the one definition of the services (what runs, with which flags and environment, in
which order); the local `Stack` runs it here, and a compose file can be generated from (or checked against)
the same list. `Stack` starts each service once the services it depends on answer the standard gRPC health
check with SERVING, so the scheduler starts last, and stops every process it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.rpc.security import ClientTLS, sync_channel

# What each proposer kind needs besides its port: the flag value of its checkpoint, or None.
PROPOSER_KINDS: dict[str, str | None] = {"ngram": None, "draft": "draft", "medusa": "medusa"}
# Most candidate nodes a Medusa proposer builds per request: trees are wider than chains are long.
MEDUSA_MAX_BUDGET = 16
SERVICE_MODULES = {"verifier": "verifier_svc", "proposer": "proposer_svc", "scheduler": "scheduler_svc"}
# Every service's stderr goes to a log file: flush each line so a crash leaves its last words there.
BASE_ENV = {"PYTHONUNBUFFERED": "1"}
_LOG_TAIL_BYTES = 4000
# A service that crashed is restarted by Stack.supervise, at most max_restarts times within this window.
RESTART_WINDOW_S = 600.0


class StackError(RuntimeError):
    """A service of the stack failed to start (or the stack was misconfigured); the message says which."""


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the stack: run as `python -m <module> <args>` with `env` added to the environment."""

    name: str  # "verifier", "proposer-ngram", "scheduler", ...
    module: str  # Python module run with -m
    args: list[str]
    env: dict[str, str]
    port: int  # the gRPC port it serves on (also in args)
    host: str = "127.0.0.1"  # the address it binds (also in args)
    depends_on: list[str] = field(default_factory=list)  # services that must be SERVING before it starts
    tls: ClientTLS | None = None  # how a local client (the readiness probe) reaches a TLS port; None = plaintext

    def command(self, python: str = sys.executable) -> list[str]:
        """The argv that runs this service."""
        return [python, "-m", self.module, *self.args]

    @property
    def address(self) -> str:
        """Where a local client reaches it (a wildcard bind is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"{host}:{self.port}"


def proposer_service_name(kind: str) -> str:
    return f"proposer-{kind}"


def service_names(proposers: Sequence[str]) -> list[str]:
    """The names stack_specs gives its services, in start order."""
    return ["verifier", *(proposer_service_name(kind) for kind in proposers), "scheduler"]


def stack_specs(
    port: int = 50051,
    proposers: Sequence[str] = ("ngram", "draft"),
    policy: str = "smartspec",
    k: int = 3,
    models_dir: str | Path | None = None,
    *,
    model: str | Path | None = None,
    draft_model: str | Path | None = None,
    medusa_model: str | Path | None = None,
    host: str = "127.0.0.1",
    ports: Mapping[str, int] | None = None,
    peer_host: str | None = "127.0.0.1",
    device: str | None = None,
    dtype: str | None = None,
    log_level: str | None = None,
    extra_args: Mapping[str, Sequence[str]] | None = None,
    env: Mapping[str, str] | None = None,
    metrics_ports: Mapping[str, int] | None = None,
    http_port: int = 0,
) -> list[ServiceSpec]:
    """The services of a stack whose scheduler serves the public API on `host:port`.

    proposers: proposer kinds, one service each, registered with the scheduler under the kind's name.
    models_dir: folder holding smollm2-135m-instruct, smollm2-draft and smollm2-medusa (default: models/);
        `model`, `draft_model` and `medusa_model` override the target, draft and Medusa heads folders.
    ports: port of each internal service by name (see service_names); default port+1, port+2, ...
    peer_host: the host the scheduler reaches the internal services on, which bind it too; None means
        "each service is reached by its name and binds 0.0.0.0" (one container per service, as in compose).
    device: the verifier's --device; dtype: --dtype of the verifier and of the proposers that run a model (draft,
        medusa); log_level: every service's --log-level (None: the services' defaults).
    extra_args: more flags per service name; env: more environment for every service.
    metrics_ports: the Prometheus metrics port of each service by name (--metrics-port); services not
        named serve no metrics.
    http_port: the scheduler also serves the OpenAI-compatible HTTP API on host:http_port (0 = no HTTP API).
    """
    from specdec.model.checkpoint import DEFAULT_DRAFT, DEFAULT_MEDUSA, DEFAULT_TARGET  # imports torch: only when needed

    proposers = list(proposers)
    unknown = [kind for kind in proposers if kind not in PROPOSER_KINDS]
    if unknown:
        raise StackError(f"unknown proposer kind(s) {', '.join(unknown)}; known: {', '.join(PROPOSER_KINDS)}")
    if len(set(proposers)) != len(proposers):
        raise StackError(f"proposer kinds listed twice: {', '.join(proposers)}")
    if k < 0:
        raise StackError(f"k must be >= 0, got {k}")
    names = service_names(proposers)
    internal = names[:-1]
    ports = dict(ports) if ports is not None else {name: port + 1 + i for i, name in enumerate(internal)}
    missing = [name for name in internal if name not in ports]
    if missing:
        raise StackError(f"no port given for {', '.join(missing)}")
    all_ports = [port, *(ports[name] for name in internal)]
    if len(set(all_ports)) != len(all_ports):
        raise StackError(f"services need distinct ports, got {dict(zip(names[-1:] + internal, all_ports))}")

    target = Path(model) if model else (Path(models_dir) / DEFAULT_TARGET.name if models_dir else DEFAULT_TARGET)
    draft = Path(draft_model) if draft_model else (Path(models_dir) / DEFAULT_DRAFT.name if models_dir
                                                   else DEFAULT_DRAFT)
    medusa = Path(medusa_model) if medusa_model else (Path(models_dir) / DEFAULT_MEDUSA.name if models_dir
                                                      else DEFAULT_MEDUSA)
    unknown_metrics = sorted(set(metrics_ports or {}) - set(names))
    if unknown_metrics:
        raise StackError(f"metrics port for unknown service(s) {', '.join(unknown_metrics)}; services: "
                         f"{', '.join(names)}")
    bind = peer_host if peer_host is not None else "0.0.0.0"
    extra_args = extra_args or {}
    metrics_ports = metrics_ports or {}
    service_env = {**BASE_ENV, **(env or {})}

    def reach(name: str) -> str:
        return f"{peer_host if peer_host is not None else name}:{ports[name]}"

    def spec(name: str, module: str, args: list[str], the_port: int, the_host: str, after: list[str]):
        if log_level:
            args = [*args, "--log-level", log_level]
        if metrics_ports.get(name):
            args = [*args, "--metrics-port", str(metrics_ports[name])]
        args = [*args, *extra_args.get(name, ())]
        return ServiceSpec(name, module, args, dict(service_env), the_port, the_host, after)

    verifier_args = ["--port", str(ports["verifier"]), "--host", bind, "--model", str(target)]
    if device:
        verifier_args += ["--device", device]
    if dtype:
        verifier_args += ["--dtype", dtype]
    specs = [spec("verifier", SERVICE_MODULES["verifier"], verifier_args, ports["verifier"], bind, [])]
    for kind in proposers:
        name = proposer_service_name(kind)
        args = ["--kind", kind, "--port", str(ports[name]), "--host", bind]
        if PROPOSER_KINDS[kind] == "draft":
            args += ["--model", str(draft)]
        elif PROPOSER_KINDS[kind] == "medusa":
            # The target too: heads may read through its lm_head (MedusaConfig.lm_head "target").
            args += ["--model", str(medusa), "--target-model", str(target), "--max-budget", str(MEDUSA_MAX_BUDGET)]
        if PROPOSER_KINDS[kind] and dtype:
            args += ["--dtype", dtype]
        specs.append(spec(name, SERVICE_MODULES["proposer"], args, ports[name], bind, []))
    scheduler_args = ["--port", str(port), "--host", host, "--verifier", reach("verifier"),
                      "--policy", policy, "--k", str(k)]
    for kind in proposers:
        scheduler_args += ["--proposer", f"{kind}={reach(proposer_service_name(kind))}"]
    if http_port:
        scheduler_args += ["--http-port", str(http_port)]
    specs.append(spec("scheduler", SERVICE_MODULES["scheduler"], scheduler_args, port, host, internal))
    return specs


def free_ports(count: int, host: str = "127.0.0.1", exclude: Sequence[int] = ()) -> list[int]:
    """`count` distinct ports the OS says are free on `host` now (all sockets held open while choosing)."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
            if sock.getsockname()[1] not in exclude:
                ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def local_specs(port: int = 50051, proposers: Sequence[str] = ("ngram", "draft"), *, metrics: bool = False,
                **kwargs) -> list[ServiceSpec]:
    """stack_specs with every internal service on a free loopback port (port 0: the scheduler's too);
    with `metrics`, every service also serves Prometheus metrics on a free port of its own."""
    names = service_names(proposers)
    internal = names[:-1]
    chosen = free_ports(len(internal) + (port == 0) + (len(names) if metrics else 0), exclude=(port,))
    if port == 0:
        port = chosen.pop()
    metrics_ports = {name: chosen.pop() for name in names} if metrics else None
    return stack_specs(port, proposers, ports=dict(zip(internal, chosen)), metrics_ports=metrics_ports, **kwargs)


def metrics_port(spec: ServiceSpec) -> int | None:
    """The port a spec's service serves Prometheus metrics on, if any."""
    args = spec.args
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--metrics-port"]
    return int(values[-1]) if values and int(values[-1]) else None


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def log_tail(path: Path, max_bytes: int = _LOG_TAIL_BYTES) -> str:
    """The last `max_bytes` of a log file (whole lines), or a note when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as exc:
        return f"(no log: {exc})"
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]
    return text.rstrip() or "(log is empty)"


class _Health:
    """Non-blocking health probe of one service."""

    def __init__(self, address: str, tls: ClientTLS | None = None):
        # Short reconnect backoff: the default grows past a second and would delay noticing readiness.
        self._channel = sync_channel(
            address, tls,
            options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)],
        )
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.last = "no answer yet"

    def serving(self) -> bool:
        try:
            answer = self._stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
        except grpc.RpcError as exc:
            self.last = f"{exc.code().name}: {exc.details()}"
            return False
        self.last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()


class Stack:
    """Runs services as local processes: start() in dependency order, waiting for each to be SERVING;
    stop() in reverse dependency order sends SIGTERM, then SIGKILL after `grace_s`, to every process it
    started. A context manager."""

    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        *,
        log_dir: str | Path | None = None,
        startup_timeout_s: float = 300.0,
        grace_s: float = 10.0,
        python: str = sys.executable,
        cwd: str | Path | None = None,
        echo: Callable[[str], None] | None = _print_stderr,
        max_restarts: int = 5,
        restart_window_s: float = RESTART_WINDOW_S,
    ):
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise StackError(f"service names must be distinct: {names}")
        for spec in specs:
            unknown = [dep for dep in spec.depends_on if dep not in names]
            if unknown:
                raise StackError(f"{spec.name} depends on unknown service(s) {unknown}")
        self.specs = list(specs)
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="specdec-logs-"))
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.python = python
        self.cwd = cwd
        self._echo = echo or (lambda line: None)
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, list[float]] = {}  # service -> monotonic times of its restarts
        self._logs: dict[str, object] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def spec(self, name: str) -> ServiceSpec:
        return next(spec for spec in self.specs if spec.name == name)

    def start(self) -> Stack:
        """Start every service and wait until all are SERVING; on any failure stop what started and raise
        StackError naming the service, with the tail of its log."""
        if self.processes:
            raise StackError("this stack was already started; make a new Stack to start again")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._echo(f"specdec: logs in {self.log_dir}")
        waiting = list(self.specs)
        starting: dict[str, _Health] = {}
        ready: set[str] = set()
        began = time.monotonic()
        try:
            while waiting or starting:
                for spec in [s for s in waiting if set(s.depends_on) <= ready]:
                    waiting.remove(spec)
                    self._launch(spec)
                    starting[spec.name] = _Health(spec.address, spec.tls)
                if waiting and not starting:
                    raise StackError(f"dependency cycle among {', '.join(s.name for s in waiting)}")
                for name in self.processes:  # a service that is already up may die too
                    self._raise_if_exited(name)
                for name, health in list(starting.items()):
                    if health.serving():
                        health.close()
                        del starting[name]
                        ready.add(name)
                        self._echo(f"specdec: {name} SERVING on {self.spec(name).address} "
                                   f"after {time.monotonic() - began:.1f} s")
                if starting and time.monotonic() - began > self.startup_timeout_s:
                    name, health = next(iter(starting.items()))
                    raise StackError(
                        f"{name} was not SERVING within {self.startup_timeout_s:g} s (last health answer: "
                        f"{health.last}); last lines of {self.log_path(name)}:\n{log_tail(self.log_path(name))}"
                    )
                if starting:
                    time.sleep(0.1)
        except BaseException:
            for health in starting.values():
                health.close()
            self.stop()
            raise
        return self

    def _launch(self, spec: ServiceSpec) -> None:
        log = open(self.log_path(spec.name), "ab")
        self._logs[spec.name] = log
        command = spec.command(self.python)
        # Own session: a Ctrl-C in the launcher's terminal must not hit the services directly, the
        # launcher stops them in order; it also lets stop() signal anything a service spawned.
        self.processes[spec.name] = subprocess.Popen(
            command, cwd=self.cwd, env={**os.environ, **spec.env}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._echo(f"specdec: started {spec.name} (pid {self.processes[spec.name].pid}): {' '.join(command[1:])}")

    def _raise_if_exited(self, name: str) -> None:
        code = self.processes[name].poll()
        if code is not None:
            raise StackError(
                f"{name} exited with code {code} while the stack was starting; last lines of {self.log_path(name)}:\n"
                f"{log_tail(self.log_path(name))}"
            )

    def supervise(self) -> list[str]:
        """Restart every service that has exited since it started (its dependents reconnect by themselves: the
        scheduler re-prefills from the tokens it holds). Returns the names restarted; raises StackError when a
        service has already been restarted max_restarts times within restart_window_s (a crash loop)."""
        restarted = []
        now = time.monotonic()
        for name, code in self.exited().items():
            recent = [t for t in self.restarts.get(name, []) if now - t < self.restart_window_s]
            tail = log_tail(self.log_path(name))
            if len(recent) >= self.max_restarts:
                raise StackError(
                    f"{name} exited with code {code} after {len(recent)} restarts in {self.restart_window_s:g} s; "
                    f"last lines of {self.log_path(name)}:\n{tail}")
            self._echo(f"specdec: {name} exited with code {code}; restarting it ({len(recent) + 1} of at most "
                       f"{self.max_restarts} in {self.restart_window_s:g} s); last lines of its log:\n{tail}")
            self._logs[name].close()
            self.restarts[name] = [*recent, now]
            self._launch(self.spec(name))
            restarted.append(name)
        return restarted

    def exited(self) -> dict[str, int]:
        """Services that have exited since start, with their exit codes."""
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def stop(self) -> None:
        """Stop every started process, dependents first (the scheduler drains before its verifier goes):
        SIGTERM one wave, SIGKILL what is left of it after `grace_s`, reap, then the next wave."""
        left = [name for name in self.processes]
        while left:
            # A service stops once nothing still running depends on it.
            needed = {dep for name in left for dep in self.spec(name).depends_on}
            wave = [name for name in left if name not in needed] or left
            left = [name for name in left if name not in wave]
            self._stop_wave(wave)
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def _stop_wave(self, names: list[str]) -> None:
        running = [(name, self.processes[name]) for name in names if self.processes[name].poll() is None]
        for _, process in running:
            _signal_group(process, signal.SIGTERM)
        end = time.monotonic() + self.grace_s
        for name, process in running:
            try:
                process.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._echo(f"specdec: {name} did not stop within {self.grace_s:g} s, killing it")
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    # The process leads its own group (start_new_session), so its group id is its pid.
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

"""specdec.ops.launcher: the declarative service list, and process management against stand-in services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.ops import cli
from specdec.ops.launcher import (
    SERVICE_MODULES,
    ServiceSpec,
    Stack,
    StackError,
    free_ports,
    local_specs,
    service_names,
    stack_specs,
)

pytestmark = pytest.mark.timeout(60)

# A stand-in service: serves only the standard health service, SERVING after --delay seconds. Flags it does
# not know (those of the real services) are ignored, so it can stand in for any of them.
STANDIN = r'''
import argparse, signal, sys, threading, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--delay", type=float, default=0.0)
parser.add_argument("--fail", action="store_true")
parser.add_argument("--ignore-term", action="store_true")
parser.add_argument("--require", type=int, action="append", default=[])
parser.add_argument("--linger", type=float, default=0.0)  # seconds between SIGTERM and exit
args, _ = parser.parse_known_args()
print("standin", " ".join(sys.argv[1:]), file=sys.stderr, flush=True)
if args.fail:
    print("boom: cannot load the model", file=sys.stderr, flush=True)
    sys.exit(3)
for port in args.require:  # the services it depends on must already be SERVING
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            sys.exit(4)
stop = threading.Event()
if args.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
server = grpc.server(futures.ThreadPoolExecutor(2))
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # the standard servicer starts SERVING
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(f"{args.host}:{args.port}")
server.start()
stop.wait(args.delay)  # a SIGTERM ends the wait
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
stop.wait()
print("stopping", time.time(), file=sys.stderr, flush=True)
time.sleep(args.linger)
server.stop(0)
print("stopped", time.time(), file=sys.stderr, flush=True)
'''


@pytest.fixture
def standin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "standins"
    folder.mkdir()
    (folder / "standin.py").write_text(STANDIN)
    return folder


def standin(name: str, folder: Path, port: int, *flags: str, depends_on=()) -> ServiceSpec:
    return ServiceSpec(name, "standin", ["--port", str(port), *flags], {"PYTHONPATH": str(folder)}, port,
                       depends_on=list(depends_on))


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def logged_time(log: Path, event: str) -> float:
    return next(float(line.split()[1]) for line in log.read_text().splitlines() if line.startswith(event + " "))


def assert_all_gone(stack: Stack) -> None:
    assert stack.processes
    for name, process in stack.processes.items():
        assert process.poll() is not None, f"{name} still running"
        with pytest.raises(ProcessLookupError):  # reaped, not a zombie
            os.kill(process.pid, 0)


# ---------------------------------------------------------------------------------------------------------
# stack_specs


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_stack_specs_defines_every_service_with_its_flags(tmp_path):
    specs = stack_specs(50051, ["ngram", "draft"], "fixed", 4, models_dir=tmp_path)
    by_name = {spec.name: spec for spec in specs}
    assert [spec.name for spec in specs] == service_names(["ngram", "draft"]) == [
        "verifier", "proposer-ngram", "proposer-draft", "scheduler"]
    assert [spec.module for spec in specs] == ["verifier_svc", "proposer_svc", "proposer_svc", "scheduler_svc"]
    ports = [spec.port for spec in specs]
    assert len(set(ports)) == 4 and by_name["scheduler"].port == 50051
    for spec in specs:
        assert flag_values(spec.args, "--port") == [str(spec.port)]
        assert spec.env["PYTHONUNBUFFERED"] == "1"
        assert spec.command("py")[:3] == ["py", "-m", spec.module]

    assert flag_values(by_name["verifier"].args, "--model") == [str(tmp_path / "smollm2-135m-instruct")]
    assert flag_values(by_name["proposer-draft"].args, "--model") == [str(tmp_path / "smollm2-draft")]
    assert flag_values(by_name["proposer-draft"].args, "--kind") == ["draft"]
    assert flag_values(by_name["proposer-ngram"].args, "--kind") == ["ngram"]
    assert "--model" not in by_name["proposer-ngram"].args

    scheduler = by_name["scheduler"]
    assert flag_values(scheduler.args, "--verifier") == [f"127.0.0.1:{by_name['verifier'].port}"]
    assert flag_values(scheduler.args, "--proposer") == [
        f"ngram=127.0.0.1:{by_name['proposer-ngram'].port}", f"draft=127.0.0.1:{by_name['proposer-draft'].port}"]
    assert flag_values(scheduler.args, "--policy") == ["fixed"]
    assert flag_values(scheduler.args, "--k") == ["4"]
    assert sorted(scheduler.depends_on) == ["proposer-draft", "proposer-ngram", "verifier"]
    assert all(not spec.depends_on for spec in specs[:-1])


def test_stack_specs_options(tmp_path):
    specs = stack_specs(7000, ["ngram"], "none", 0, model=tmp_path / "t", host="0.0.0.0", device="cpu",
                        ports={"verifier": 7100, "proposer-ngram": 7200}, extra_args={"verifier": ["--max-slots", "4"]},
                        env={"SPECDEC_X": "1"})
    verifier, ngram, scheduler = specs
    assert (verifier.port, ngram.port, scheduler.port) == (7100, 7200, 7000)
    assert flag_values(verifier.args, "--model") == [str(tmp_path / "t")]
    assert flag_values(verifier.args, "--device") == ["cpu"]
    assert flag_values(verifier.args, "--max-slots") == ["4"]
    assert flag_values(scheduler.args, "--host") == ["0.0.0.0"] and scheduler.address == "127.0.0.1:7000"
    assert flag_values(scheduler.args, "--proposer") == ["ngram=127.0.0.1:7200"]
    assert all(spec.env["SPECDEC_X"] == "1" for spec in specs)

    # One container per service: peers are reached by service name and bind every interface.
    compose = {s.name: s for s in stack_specs(50051, ["ngram"], peer_host=None)}
    assert flag_values(compose["scheduler"].args, "--verifier") == ["verifier:50052"]
    assert flag_values(compose["scheduler"].args, "--proposer") == ["ngram=proposer-ngram:50053"]
    assert flag_values(compose["verifier"].args, "--host") == ["0.0.0.0"]

    assert [s.name for s in stack_specs(50051, [])] == ["verifier", "scheduler"]
    assert "--proposer" not in stack_specs(50051, [])[-1].args

    # --dtype reaches the services that run a model, --log-level every service.
    specs = {s.name: s for s in stack_specs(50051, ["ngram", "draft", "medusa"], dtype="bfloat16", log_level="DEBUG")}
    assert {name for name, s in specs.items() if flag_values(s.args, "--dtype") == ["bfloat16"]} == {
        "verifier", "proposer-draft", "proposer-medusa"}
    assert all(flag_values(s.args, "--log-level") == ["DEBUG"] for s in specs.values())
    assert not any("--dtype" in s.args or "--log-level" in s.args for s in stack_specs(50051, ["draft"]))


def test_stack_specs_rejects_bad_configurations():
    with pytest.raises(StackError, match="unknown proposer kind.*medusa2"):
        stack_specs(50051, ["ngram", "medusa2"])
    with pytest.raises(StackError, match="twice"):
        stack_specs(50051, ["ngram", "ngram"])
    with pytest.raises(StackError, match="distinct ports"):
        stack_specs(50051, ["ngram"], ports={"verifier": 50051, "proposer-ngram": 6000})
    with pytest.raises(StackError, match="no port given for proposer-ngram"):
        stack_specs(50051, ["ngram"], ports={"verifier": 6000})


def test_local_specs_pick_distinct_free_ports():
    specs = local_specs(0, ["ngram", "draft"])
    ports = [spec.port for spec in specs]
    assert len(set(ports)) == len(ports) and all(p > 0 for p in ports)
    assert local_specs(50051, ["ngram"])[-1].port == 50051
    assert set(SERVICE_MODULES) == {"verifier", "proposer", "scheduler"}


# ---------------------------------------------------------------------------------------------------------
# Stack


def test_stack_starts_in_dependency_order_and_stops_everything(standin_dir, tmp_path):
    a, b, c = free_ports(3)
    specs = [
        standin("slow", standin_dir, a, "--delay", "0.5"),
        standin("fast", standin_dir, b),
        # Exits with code 4 unless both are SERVING when it starts.
        standin("last", standin_dir, c, "--require", str(a), "--require", str(b), "--linger", "0.3",
                depends_on=["slow", "fast"]),
    ]
    lines: list[str] = []
    stack = Stack(specs, log_dir=tmp_path / "logs", startup_timeout_s=30, grace_s=5, echo=lines.append)
    with stack:
        assert all(serving(p) for p in (a, b, c))
        assert stack.exited() == {}
        assert (tmp_path / "logs" / "last.log").read_text().startswith("standin --port")
    assert_all_gone(stack)
    assert not any(serving(p) for p in (a, b, c))
    assert any(str(tmp_path / "logs") in line for line in lines)
    assert all(stack.processes[name].returncode == 0 for name in ("slow", "fast", "last"))  # SIGTERM, not KILL
    # Dependents stop first: "last" had exited before its dependencies were asked to stop.
    assert logged_time(tmp_path / "logs" / "last.log", "stopped") < min(
        logged_time(tmp_path / "logs" / f"{name}.log", "stopping") for name in ("slow", "fast"))


def test_early_exit_raises_with_the_log_tail_and_stops_the_rest(standin_dir, tmp_path):
    a, b = free_ports(2)
    specs = [standin("ok", standin_dir, a, "--delay", "0.2"), standin("broken", standin_dir, b, "--fail")]
    stack = Stack(specs, log_dir=tmp_path / "logs", startup_timeout_s=30, grace_s=5, echo=None)
    with pytest.raises(StackError) as error:
        stack.start()
    message = str(error.value)
    assert "broken exited with code 3" in message
    assert "boom: cannot load the model" in message
    assert_all_gone(stack)


def test_startup_timeout_names_the_service(standin_dir, tmp_path):
    (a,) = free_ports(1)
    stack = Stack([standin("sleepy", standin_dir, a, "--delay", "60")], log_dir=tmp_path / "logs",
                  startup_timeout_s=1.5, grace_s=5, echo=None)
    began = time.monotonic()
    with pytest.raises(StackError, match=r"sleepy was not SERVING within 1.5 s \(last health answer: NOT_SERVING"):
        stack.start()
    assert time.monotonic() - began < 10
    assert_all_gone(stack)


def test_stop_kills_a_process_that_ignores_sigterm(standin_dir, tmp_path):
    (a,) = free_ports(1)
    stack = Stack([standin("stubborn", standin_dir, a, "--ignore-term")], log_dir=tmp_path / "logs",
                  startup_timeout_s=30, grace_s=0.5, echo=None)
    stack.start()
    began = time.monotonic()
    stack.stop()
    assert time.monotonic() - began < 5
    assert stack.processes["stubborn"].returncode == -signal.SIGKILL
    assert_all_gone(stack)


def test_stack_rejects_bad_dependencies(standin_dir, tmp_path):
    with pytest.raises(StackError, match="unknown service"):
        Stack([standin("a", standin_dir, 1, depends_on=["nope"])])
    cycle = Stack([standin("a", standin_dir, 1, depends_on=["b"]), standin("b", standin_dir, 2, depends_on=["a"])],
                  log_dir=tmp_path / "logs", echo=None)
    with pytest.raises(StackError, match="dependency cycle among a, b"):
        cycle.start()
    assert cycle.processes == {}


def test_supervise_restarts_a_crashed_service_and_stops_a_crash_loop(standin_dir, tmp_path):
    a, b = free_ports(2)
    specs = [standin("base", standin_dir, a), standin("top", standin_dir, b, depends_on=["base"])]
    lines: list[str] = []
    stack = Stack(specs, log_dir=tmp_path / "logs", startup_timeout_s=30, grace_s=5, echo=lines.append,
                  max_restarts=2)
    with stack:
        assert stack.supervise() == []
        for attempt in (1, 2):
            first = stack.processes["base"]
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            assert stack.supervise() == ["base"]
            assert stack.processes["base"].pid != first.pid
            deadline = time.monotonic() + 20
            while not serving(a) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert serving(a) and serving(b)  # back, and its dependent never went away
            assert any(f"base exited with code -9; restarting it ({attempt} of at most 2" in line for line in lines)
        os.kill(stack.processes["base"].pid, signal.SIGKILL)
        stack.processes["base"].wait(timeout=10)
        with pytest.raises(StackError, match="base exited with code -9 after 2 restarts in 600 s"):
            stack.supervise()
    assert_all_gone(stack)
    assert (tmp_path / "logs" / "base.log").read_text().count("standin --port") == 3  # one log, appended


@pytest.mark.parametrize("flags, message", [
    (["--policy", "nonsense"], "--policy 'nonsense' is not a policy; choose from smartspec"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--proposers", "ngram,bogus"], "--proposers: unknown kind(s) bogus"),
    (["--k", "-1"], "--k must be >= 0"),
    (["--max-restarts", "-2"], "--max-restarts must be >= 0"),
])
def test_cli_up_rejects_bad_flags_in_one_line_before_starting_anything(flags, message, tmp_path, capsys):
    began = time.monotonic()
    assert cli.main(["up", "--log-dir", str(tmp_path / "logs"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "logs").exists()  # nothing started
    assert time.monotonic() - began < 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_up_rejects_cuda_without_cuda(tmp_path, capsys):
    assert cli.main(["up", "--device", "cuda", "--log-dir", str(tmp_path / "logs")]) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# specdec up


def fake_checkpoint(folder: Path) -> Path:
    """Enough of a checkpoint folder to pass validation (the stand-ins never read it)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_cli_up_rejects_a_missing_model(tmp_path, capsys):
    assert cli.main(["up", "--model", str(tmp_path / "nope"), "--proposers", "ngram"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_cli_up_checks_heads_that_read_the_targets_lm_head_against_that_target(tmp_path, capsys):
    """Heads without their own projection load only with the target's lm_head: `specdec up` checks them with
    --model. A port in use stops it right after the model checks, before anything starts."""
    import socket

    from specdec.model.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
    from specdec.testing import make_tiny_checkpoint

    target = make_tiny_checkpoint(tmp_path / "target", "llama")
    (target / "tokenizer.json").write_text("{}")
    config = json.loads((target / "config.json").read_text())
    save_medusa_heads(MedusaHeads(MedusaConfig(hidden_size=config["hidden_size"], vocab_size=config["vocab_size"],
                                               num_heads=2, lm_head="target")), tmp_path / "heads")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["up", "--model", str(target), "--medusa-model", str(tmp_path / "heads"),
                         "--proposers", "medusa", "--port", str(port), "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 2 and f"port {port} on 127.0.0.1 is in use" in err, err
    assert "Medusa" not in err


def test_cli_up_runs_until_sigterm_then_stops_the_stack(standin_dir, tmp_path):
    """`specdec up` with the three service modules replaced by the stand-in."""
    model = fake_checkpoint(tmp_path / "model")
    (port,) = free_ports(1)
    program = (
        "import sys; import specdec.ops.launcher as launcher; "
        "launcher.SERVICE_MODULES.update(verifier='standin', proposer='standin', scheduler='standin'); "
        "from specdec.ops.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", program, "up", "--port", str(port), "--proposers", "ngram,draft",
               "--model", str(model), "--draft-model", str(model), "--log-dir", str(tmp_path / "logs"),
               "--startup-timeout", "30", "--grace", "5"]
    env = {**os.environ, "PYTHONPATH": str(standin_dir)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline()
        assert ready.startswith(f"specdec stack ready on 127.0.0.1:{port}"), process.stderr.read()
        assert serving(port)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    pids = [int(line.split("(pid ")[1].split(")")[0]) for line in err.splitlines() if "(pid " in line]
    assert len(pids) == 4
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "proposer-draft.log", "proposer-ngram.log", "scheduler.log", "verifier.log"]
    scheduler_log = (tmp_path / "logs" / "scheduler.log").read_text()
    assert "--proposer ngram=127.0.0.1:" in scheduler_log and "--proposer draft=127.0.0.1:" in scheduler_log

"""compose.yaml stays true without a container engine: it is generated from the launcher's service
definitions (specdec.compose over launcher.stack_specs), and everything checkable statically is checked:
the committed file is exactly the generated one and parses; it runs every service the launcher runs,
with the same module and the same configuration (the environment form parses to the same config as the
launcher's flags); every entrypoint and the health-check module exist; the health check works.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specdec.compose import (
    HEALTHCHECK_MODULE,
    compose_specs,
    compose_yaml,
    flags_as_env,
    resolve_defaults,
    service_environment,
)
from specdec.launcher import local_specs, service_names

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def specs():
    return {spec.name: spec for spec in compose_specs()}


def test_committed_compose_is_the_generated_one():
    assert COMPOSE.read_text() == compose_yaml(), "compose.yaml is stale: run `specdec compose` and commit it"


def test_runs_every_service_of_the_launcher(compose, specs):
    launcher_names = service_names(("ngram", "draft"))
    assert list(specs) == launcher_names
    assert set(compose["services"]) == {*launcher_names, "jaeger"}
    # `specdec up` runs the same services from the same definitions, with the same modules and flags.
    local = {spec.name: spec for spec in local_specs(0, ("ngram", "draft"), metrics=True, device="auto")}
    assert list(local) == launcher_names
    for name, spec in specs.items():
        assert local[name].module == spec.module
        assert local[name].args[::2] == spec.args[::2], name  # flag names, in order
        assert local[name].depends_on == spec.depends_on


def test_same_commands_and_environment(compose, specs):
    for name, spec in specs.items():
        service = compose["services"][name]
        assert service["command"] == ["python", "-m", spec.module]
        environment = {key: resolve_defaults(str(value)) for key, value in service["environment"].items()}
        assert environment == service_environment(spec), name
        assert spec.env.items() <= environment.items()
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        depends = {dep for dep, cond in service["depends_on"].items() if cond == {"condition": "service_healthy"}}
        assert depends == set(spec.depends_on)


def _parse(module: str, argv: list[str], env: dict[str, str], monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("SPECDEC_")]:
        monkeypatch.delenv(key)
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    config = importlib.import_module(f"{module}.config")
    if module == "verifier_svc":
        return config.parse_config(argv, env=env)
    if module == "proposer_svc":
        return config.parse_config(argv)
    return config.config_from_args(argv)


def test_environment_configures_each_service_as_its_flags_do(specs, monkeypatch):
    """The containers get their configuration as SPECDEC_* variables, the launcher as flags: both must
    give each service the same configuration object."""
    for name, spec in specs.items():
        from_flags = _parse(spec.module, list(spec.args), {}, monkeypatch)
        from_env = _parse(spec.module, [], flags_as_env(spec.args), monkeypatch)
        assert from_env == from_flags, name
        assert from_flags.metrics_port == 9464


def test_flags_as_env():
    assert flags_as_env(["--max-slots", "4", "--proposer", "a=x:1", "--proposer", "b=y:2"]) == {
        "SPECDEC_MAX_SLOTS": "4", "SPECDEC_PROPOSER": "a=x:1,b=y:2"}
    with pytest.raises(Exception):
        flags_as_env(["--dangling"])


def test_entrypoints_exist_in_the_package(compose):
    modules = {service["command"][2] for name, service in compose["services"].items() if name != "jaeger"}
    modules.add(HEALTHCHECK_MODULE)
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r'^CMD \["python", "-m", "([\w.]+)"\]', dockerfile, re.M)
    assert cmd, "the Dockerfile's CMD runs no module"
    modules.add(cmd.group(1))
    for module in modules:
        main = module if module == HEALTHCHECK_MODULE else f"{module}.__main__"
        assert importlib.util.find_spec(main) is not None, f"{main} is not in the package"
        package = module.split(".")[0]
        assert re.search(rf"^COPY {package} ", dockerfile, re.M), f"the image does not copy {package}"


def test_deployment_shape(compose, specs):
    services = compose["services"]
    assert services["verifier"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"scheduler", "jaeger"}  # the API, and Jaeger's UI
    # Published on the host's loopback unless SPECDEC_PUBLISH_HOST / JAEGER_UI_HOST say otherwise.
    assert services["scheduler"]["ports"] == ["${SPECDEC_PUBLISH_HOST:-127.0.0.1}:${SPECDEC_PUBLISH_PORT:-50051}:50051"]
    assert [resolve_defaults(p) for p in services["scheduler"]["ports"]] == ["127.0.0.1:50051:50051"]
    assert [resolve_defaults(p) for p in services["jaeger"]["ports"]] == ["127.0.0.1:16686:16686"]
    assert compose["networks"]["backend"]["internal"] is True
    for name, spec in specs.items():
        service = services[name]
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", HEALTHCHECK_MODULE, f"127.0.0.1:{spec.port}"]
        assert "backend" in service["networks"]
        assert service["image"] == services["verifier"]["image"]  # one image for all
    assert "frontend" not in services["verifier"]["networks"]
    # Checkpoints come from mounted folders, where the services look for them.
    assert any(v.endswith(":/models/target:ro") for v in services["verifier"]["volumes"])
    assert any(v.endswith(":/models/target:ro") for v in services["scheduler"]["volumes"])
    assert any(v.endswith(":/models/draft:ro") for v in services["proposer-draft"]["volumes"])
    assert services["verifier"]["environment"]["SPECDEC_MODEL"] == "/models/target"


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def run_healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", HEALTHCHECK_MODULE, *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)


def test_healthcheck_module(health_server):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_healthcheck(address).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_healthcheck(address)
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr


def test_healthcheck_without_server():
    from specdec.launcher import free_ports

    result = run_healthcheck(f"127.0.0.1:{free_ports(1)[0]}", "--timeout", "1")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr

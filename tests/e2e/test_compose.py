"""The compose deployment stays true without a container engine: compose.yaml, its GPU override
(compose.gpu.yaml) and Prometheus's scrape configuration (deploy/prometheus.yml) are generated from the
launcher's service definitions (specdec.ops.compose over launcher.stack_specs), and everything checkable
statically is checked as an operator's tools would: the committed files are exactly the generated ones;
compose.yaml, the override and their merge validate against the compose-spec schema (check-jsonschema);
they run every service `specdec up` runs, every proposer kind among them, with the same module and the
same settings (the environment form parses to the same configuration as the launcher's flags); the CPU
variant reserves no device, the GPU variant reserves the GPUs for the verifier on `cuda`; Prometheus
scrapes every service; every knob docs/deploy.md names reaches a service; every entrypoint and the
health-check module exist; the health check works. The image itself: tests/e2e/test_image.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specdec.ops.compose import (
    GPU_OVERRIDE,
    HEALTHCHECK_MODULE,
    HTTP_PORT,
    METRICS_PORT,
    PROMETHEUS_CONFIG,
    PROPOSERS,
    compose_specs,
    deployment_files,
    flags_as_env,
    gpu_specs,
    merge,
    overlay,
    render_compose,
    resolve_defaults,
    service_environment,
)
from specdec.ops.launcher import PROPOSER_KINDS, StackError, local_specs, service_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SPECDEC_SERVICES = service_names(PROPOSERS)
# Where a service is and what it is called: these differ between containers and local processes by design.
LOCATION_ENV = {"SPECDEC_PORT", "SPECDEC_HOST", "SPECDEC_MODEL", "SPECDEC_TARGET_MODEL", "SPECDEC_VERIFIER",
                "SPECDEC_METRICS_PORT"}
# Environment only the containers get: where spans go, the HTTP API's port.
CONTAINER_ENV = {"PYTHONUNBUFFERED", "OTEL_EXPORTER_OTLP_ENDPOINT", "SPECDEC_HTTP_PORT"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def gpu_compose(compose) -> dict:
    """compose.yaml with compose.gpu.yaml merged over it, as `docker compose -f ... -f ...` does."""
    return merge(compose, yaml.safe_load((ROOT / GPU_OVERRIDE).read_text()))


@pytest.fixture(scope="module")
def specs():
    return {spec.name: spec for spec in compose_specs()}


def test_committed_files_are_the_generated_ones():
    files = deployment_files()
    assert set(files) == {"compose.yaml", GPU_OVERRIDE, PROMETHEUS_CONFIG}
    for name, text in files.items():
        assert (ROOT / name).read_text() == text, f"{name} is stale: run `specdec compose` and commit it"
        assert yaml.safe_load(text)


def test_cli_writes_every_file(tmp_path):
    from specdec.ops.cli import main

    assert main(["compose", "-o", str(tmp_path / "compose.yaml")]) == 0
    for name, text in deployment_files().items():
        assert (tmp_path / name).read_text() == text


def check_jsonschema(*paths: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install '.[test]')")
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", *map(str, paths)], capture_output=True,
                          text=True, timeout=120)


def test_compose_files_validate_against_the_compose_spec(gpu_compose, tmp_path):
    merged = tmp_path / "merged-gpu.yaml"
    merged.write_text(yaml.safe_dump(gpu_compose))
    result = check_jsonschema(COMPOSE, ROOT / GPU_OVERRIDE, merged)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator bites: a device reservation whose capabilities are not a list is refused.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["verifier"]["deploy"] = {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": "all", "capabilities": "gpu"}]}}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert check_jsonschema(tmp_path / "broken.yaml").returncode != 0


def test_the_override_makes_the_gpu_variant(gpu_compose, specs):
    assert gpu_compose == render_compose(gpu_specs(list(specs.values())), gpu=True)
    with pytest.raises(StackError, match="cannot remove"):
        overlay({"a": 1, "b": 2}, {"a": 1})
    with pytest.raises(StackError, match="cannot replace the list ports"):
        overlay({"ports": ["1:1"]}, {"ports": ["2:2"]})
    assert overlay({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1]}, "d": 3}) == {"a": {"b": 2}, "d": 3}


def test_runs_every_service_and_proposer_kind(compose, gpu_compose, specs):
    assert set(PROPOSERS) == set(PROPOSER_KINDS)  # ngram, draft, medusa: every kind of the product
    assert list(specs) == SPECDEC_SERVICES
    for document in (compose, gpu_compose):
        assert set(document["services"]) == {*SPECDEC_SERVICES, "jaeger", "prometheus"}
    proposers = resolve_defaults(compose["services"]["scheduler"]["environment"]["SPECDEC_PROPOSER"])
    assert proposers == ",".join(f"{kind}=proposer-{kind}:{specs[f'proposer-{kind}'].port}" for kind in PROPOSERS)


def settings(environment: dict[str, str]) -> dict[str, str]:
    """A service's settings without where it runs (ports, addresses, model folders) and without the
    environment only containers get; the proposers the scheduler knows by their names only."""
    out = {k: v for k, v in environment.items() if k not in LOCATION_ENV | CONTAINER_ENV}
    if "SPECDEC_PROPOSER" in out:
        out["SPECDEC_PROPOSER"] = ",".join(p.split("=")[0] for p in out["SPECDEC_PROPOSER"].split(","))
    return out


def resolved_environment(service: dict) -> dict[str, str]:
    return {key: resolve_defaults(str(value)) for key, value in service["environment"].items()}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_compose_and_specdec_up_run_the_same_services_with_the_same_settings(variant, compose, gpu_compose):
    """`specdec up --proposers ngram,draft,medusa` (with --device cuda for the GPU variant) and the compose
    files: same services, modules, start order, and settings flag for flag."""
    document = gpu_compose if variant == "gpu" else compose
    device = "cuda" if variant == "gpu" else "auto"
    local = {s.name: s for s in local_specs(0, PROPOSERS, metrics=True, device=device, dtype="auto", log_level="INFO")}
    assert list(local) == SPECDEC_SERVICES
    for name, spec in local.items():
        service = document["services"][name]
        assert service["command"] == ["python", "-m", spec.module]
        depends = {dep for dep, cond in service["depends_on"].items() if cond == {"condition": "service_healthy"}}
        assert depends == set(spec.depends_on), name
        assert settings(resolved_environment(service)) == settings(flags_as_env(spec.args)), name
        assert resolved_environment(service)["SPECDEC_METRICS_PORT"] == str(METRICS_PORT)
    assert resolved_environment(document["services"]["verifier"])["SPECDEC_DEVICE"] == device


def test_same_commands_and_environment(compose, specs):
    for name, spec in specs.items():
        service = compose["services"][name]
        assert service["command"] == ["python", "-m", spec.module]
        environment = resolved_environment(service)
        assert environment == service_environment(spec), name
        assert spec.env.items() <= environment.items()
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        depends = {dep for dep, cond in service["depends_on"].items() if cond == {"condition": "service_healthy"}}
        assert depends == set(spec.depends_on)
    assert compose["services"]["scheduler"]["environment"]["SPECDEC_HTTP_PORT"] == str(HTTP_PORT)


def _parse(module: str, argv: list[str], env: dict[str, str]):
    config = importlib.import_module(f"{module}.config")
    return (getattr(config, "parse_config", None) or config.config_from_args)(argv, env=env)


def test_environment_configures_each_service_as_its_flags_do(specs):
    """The containers get their configuration as SPECDEC_* variables, the launcher as flags: both must
    give each service the same configuration object."""
    for name, spec in specs.items():
        from_flags = _parse(spec.module, list(spec.args), {})
        from_env = _parse(spec.module, [], flags_as_env(spec.args))
        assert from_env == from_flags, name
        assert from_flags.metrics_port == 9464


def _without_location(config) -> dict:
    values = dataclasses.asdict(config)
    for key in ("port", "host", "model", "target_model", "metrics_port", "http_port", "verifier"):
        values.pop(key, None)
    if "proposers" in values:
        values["proposers"] = [p["name"] for p in values["proposers"]]
    return values


def test_specdec_up_defaults_configure_each_service_as_compose_does(compose):
    """Plain `specdec up --proposers ngram,draft,medusa` passes no --device/--dtype/--log-level: each
    service's own defaults must then be what compose.yaml sets by default."""
    from specdec.ops.cli import build_parser

    args = build_parser().parse_args(["up", "--proposers", "ngram,draft,medusa"])
    local = local_specs(0, PROPOSERS, metrics=True, device=args.device, dtype=args.dtype, log_level=args.log_level)
    for spec in local:
        from_up = _parse(spec.module, list(spec.args), {})
        from_compose = _parse(spec.module, [], resolved_environment(compose["services"][spec.name]))
        assert _without_location(from_up) == _without_location(from_compose), spec.name


def test_flags_as_env():
    assert flags_as_env(["--max-slots", "4", "--proposer", "a=x:1", "--proposer", "b=y:2"]) == {
        "SPECDEC_MAX_SLOTS": "4", "SPECDEC_PROPOSER": "a=x:1,b=y:2"}
    with pytest.raises(Exception):
        flags_as_env(["--dangling"])


def test_entrypoints_exist_in_the_package(compose):
    modules = {service["command"][2] for name, service in compose["services"].items() if name in SPECDEC_SERVICES}
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


def test_cpu_default_and_gpu_switch(compose, gpu_compose):
    cpu, gpu = compose["services"], gpu_compose["services"]
    # A CPU host: nothing reserves a device, torch comes from the CPU index, the verifier picks its device.
    assert not any("deploy" in service for service in cpu.values())
    assert {resolve_defaults(cpu[name]["build"]["args"]["TORCH_INDEX_URL"]) for name in SPECDEC_SERVICES} == {
        "https://download.pytorch.org/whl/cpu"}
    # The GPU variant: CUDA torch in its own image tag, the host's GPUs reserved for the verifier, on cuda.
    assert gpu["verifier"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert [name for name, service in gpu.items() if "deploy" in service] == ["verifier"]
    assert {gpu[name]["image"] for name in SPECDEC_SERVICES} == {"specdec:cuda"}
    assert {cpu[name]["image"] for name in SPECDEC_SERVICES} == {"specdec:latest"}
    assert {resolve_defaults(gpu[name]["build"]["args"]["TORCH_INDEX_URL"]) for name in SPECDEC_SERVICES} == {
        "https://download.pytorch.org/whl/cu128"}
    assert gpu["verifier"]["environment"]["SPECDEC_DEVICE"] == "${SPECDEC_DEVICE:-cuda}"


def test_deployment_shape(compose, specs):
    services = compose["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"scheduler", "jaeger", "prometheus"}  # the APIs, Jaeger's and Prometheus's UIs
    # Published on the host's loopback unless SPECDEC_PUBLISH_HOST / JAEGER_UI_HOST / PROMETHEUS_UI_HOST say
    # otherwise.
    assert services["scheduler"]["ports"] == [
        "${SPECDEC_PUBLISH_HOST:-127.0.0.1}:${SPECDEC_PUBLISH_PORT:-50051}:50051",
        "${SPECDEC_PUBLISH_HOST:-127.0.0.1}:${SPECDEC_HTTP_PUBLISH_PORT:-8000}:8000"]
    assert [resolve_defaults(p) for p in services["scheduler"]["ports"]] == ["127.0.0.1:50051:50051",
                                                                           "127.0.0.1:8000:8000"]
    assert [resolve_defaults(p) for p in services["jaeger"]["ports"]] == ["127.0.0.1:16686:16686"]
    assert [resolve_defaults(p) for p in services["prometheus"]["ports"]] == ["127.0.0.1:9090:9090"]
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
    assert any(v.endswith(":/models/medusa:ro") for v in services["proposer-medusa"]["volumes"])
    assert any(v.endswith(":/models/target:ro") for v in services["proposer-medusa"]["volumes"])  # its lm_head
    assert services["verifier"]["environment"]["SPECDEC_MODEL"] == "/models/target"
    # Third-party images are pinned to a version; Jaeger keeps a bounded in-memory trace store.
    for name in ("jaeger", "prometheus"):
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", services[name]["image"]), services[name]["image"]
    jaeger = services["jaeger"]["environment"]
    assert jaeger["SPAN_STORAGE_TYPE"] == "memory" and int(resolve_defaults(jaeger["MEMORY_MAX_TRACES"])) > 0


def test_prometheus_scrapes_every_service(compose):
    config = yaml.safe_load((ROOT / PROMETHEUS_CONFIG).read_text())
    prometheus = compose["services"]["prometheus"]
    assert f"./{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "backend" in prometheus["networks"]  # where the metrics ports are
    targets = {target: group["labels"]["service"] for job in config["scrape_configs"]
               for group in job["static_configs"] for target in group["targets"]}
    for name in SPECDEC_SERVICES:
        assert targets[f"{name}:{METRICS_PORT}"] == name
        assert compose["services"][name]["environment"]["SPECDEC_METRICS_PORT"] == str(METRICS_PORT)
    assert targets["jaeger:14269"] == "jaeger" and targets["localhost:9090"] == "prometheus"
    assert {host.split(":")[0] for host in targets} - {"localhost"} <= set(compose["services"])


def env_names_read_by_the_services() -> set[str]:
    """Every SPECDEC_* variable some part of the product reads: each service's flags (each flag falls back to
    SPECDEC_<FLAG>), the health check's, and the variables read directly."""
    from proposer_svc.config import build_parser as proposer_parser
    from scheduler_svc.config import build_arg_parser as scheduler_parser
    from specdec.ops import healthcheck
    from specdec.rpc import security
    from specdec_client import credentials
    from verifier_svc.config import build_parser as verifier_parser

    names = {security.API_KEYS_ENV, credentials.API_KEY_ENV}
    for parser in (verifier_parser({}), proposer_parser(), scheduler_parser()):
        for action in parser._actions:
            names.update("SPECDEC_" + o[2:].replace("-", "_").upper() for o in action.option_strings
                         if o.startswith("--") and o != "--help")
    help_text = subprocess.run([sys.executable, "-m", HEALTHCHECK_MODULE, "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=60).stdout
    names.update(re.findall(rf"{healthcheck.ENV_PREFIX}[A-Z_]+", help_text))
    return names


def test_every_documented_knob_reaches_the_services():
    """Each variable docs/deploy.md names is read by a service (or the health check, or the client), or is
    a variable of the compose files; and every variable the compose files take is documented there."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    documented = set(re.findall(r"\b((?:SPECDEC|JAEGER|PROMETHEUS)_[A-Z0-9_]*[A-Z0-9]|TORCH_INDEX_URL)\b", docs))
    files = deployment_files()
    interpolated = {name for text in files.values() for name in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text)}
    assert interpolated - documented == set(), "compose variables missing from docs/deploy.md"
    read = env_names_read_by_the_services()
    assert {"SPECDEC_DTYPE", "SPECDEC_MAX_SLOTS", "SPECDEC_HEALTHCHECK_TLS_CA"} <= read  # the check can see
    assert documented - read - interpolated == set(), "documented variables nothing reads"
    # Every knob of the environment tables reaches its services by default, as a variable of the files.
    assert {"SPECDEC_POLICY", "SPECDEC_K", "SPECDEC_DEVICE", "SPECDEC_DTYPE", "SPECDEC_LOG_LEVEL"} <= interpolated


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
    from specdec.ops.launcher import free_ports

    result = run_healthcheck(f"127.0.0.1:{free_ports(1)[0]}", "--timeout", "1")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr

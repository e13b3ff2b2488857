"""The image, checked as an operator would without a container engine: hadolint finds nothing in the
Dockerfile; both stages start from python:3.11-slim pinned by digest; the runtime stage installs torch and
the wheel the build stage made, and nothing else (no compiler, no grpcio-tools, no test or benchmark
package); the build stage's steps, replayed here on the files it copies, give a wheel with the generated
stubs and every service's entrypoint whose runtime dependencies are exactly pyproject's; and the services
import nothing of the build, test or benchmark tools.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BASE = re.compile(r"^FROM (python:3\.11-slim@sha256:[0-9a-f]{64}) AS (\w+)$", re.M)
NOT_AT_RUNTIME = ("grpcio-tools", "grpc_tools", "matplotlib", "pytest", "check-jsonschema", "hadolint")
SERVICE_MODULES = ("verifier_svc", "proposer_svc", "scheduler_svc")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def stages() -> dict[str, str]:
    """The Dockerfile's text per stage name."""
    text = DOCKERFILE.read_text()
    starts = list(BASE.finditer(text))
    assert starts, "no FROM python:3.11-slim@sha256:... AS <stage>"
    return {m.group(2): text[m.start():(starts[i + 1].start() if i + 1 < len(starts) else len(text))]
            for i, m in enumerate(starts)}


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install '.[test]' brings it)")
    return found


def run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    # Every level fails (style included) and inline `# hadolint ignore` pragmas do not count.
    return subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma",
                           str(dockerfile)], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_hadolint_finds_nothing(tmp_path):
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # It does find things: an unpinned base and an unpinned pip install.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = run_hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def test_base_pinned_by_digest_and_two_stages():
    found = BASE.findall(DOCKERFILE.read_text())
    assert [stage for _, stage in found] == ["build", "runtime"]  # the last stage is the image
    assert len({image for image, _ in found}) == 1, "both stages must start from the same base"
    assert len(re.findall(r"^FROM ", DOCKERFILE.read_text(), re.M)) == 2


def test_runtime_stage_installs_torch_and_the_wheel_only():
    runtime = stages()["runtime"]
    lower = runtime.lower()
    for name in (*NOT_AT_RUNTIME, "apt-get", "gcc", "build-essential", "scripts/gen_proto"):
        assert name not in lower, f"the runtime stage mentions {name}"
    installs = [i.strip() for i in re.findall(r"pip install ([^&\n]+)", runtime)]
    assert installs == ['--no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0', "--no-cache-dir /wheels/*.whl"]
    assert re.findall(r"^COPY .*$", runtime, re.M) == ["COPY --from=build /wheels /wheels"]
    assert re.search(r"^USER 10001$", runtime, re.M)  # not root
    # The pins agree with pyproject: torch of the runtime, grpcio-tools of the build extra.
    project = pyproject()["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert re.findall(r"grpcio-tools==[\d.]+", stages()["build"]) == project["optional-dependencies"]["build"]


def test_runtime_dependencies_leave_out_build_test_and_benchmark_packages():
    project = pyproject()["project"]
    names = [re.split(r"[=<>\[ ]", dep)[0].lower() for dep in project["dependencies"]]
    assert not set(names) & set(NOT_AT_RUNTIME), names
    extras = project["optional-dependencies"]
    assert extras["build"] == ["grpcio-tools==1.85.1"] and extras["bench"] == ["matplotlib==3.10.9"]
    # `make install` installs the test extra and then generates the stubs: it must bring grpcio-tools.
    assert "specdec[build,bench]" in extras["test"]
    assert re.search(r"pip install .*'\.\[test\]'", (ROOT / "Makefile").read_text())


def test_services_import_no_build_test_or_benchmark_tool():
    """With those packages unimportable, as in the image, every service and the CLI still import (grpc itself
    imports grpc_tools when it happens to be installed, so its presence proves nothing)."""
    modules = [f"{m}.{part}" for m in SERVICE_MODULES for part in ("server", "config", "__main__")] + [
        "specdec.ops.cli", "specdec.ops.healthcheck", "specdec.ops.launcher", "specdec.ops.compose", "specdec_client"]
    code = f"""
import importlib, importlib.abc, sys
BLOCKED = ('matplotlib', 'grpc_tools', 'pytest', 'check_jsonschema')
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f'No module named {{name!r}} (not in the image)', name=name)
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module(m)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
               for p in prefixes for pattern in patterns)


def test_build_stage_replayed_gives_a_complete_wheel(tmp_path):
    """The build stage's COPY and RUN steps on this checkout (the context .dockerignore leaves): the stubs are
    generated and the wheel holds them, every service's entrypoint, and pyproject's runtime dependencies."""
    build = stages()["build"]
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    context = tmp_path / "src"
    context.mkdir()
    for sources, dest in re.findall(r"^COPY (?!--)(.+) (\S+)$", build, re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            target = context / (source if dest in ("./", ".") else dest.removeprefix("./"))
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "pb", "_pb"))
            else:
                shutil.copy(ROOT / source, target)
    assert not (context / "specdec" / "pb").exists()  # generated in the image, not copied
    assert not (context / "specdec_client" / "_pb").exists()
    run = re.search(r"^RUN (python scripts/gen_proto\.py) && pip wheel .*--wheel-dir /wheels \.$", build, re.M)
    assert run, "the build stage generates the stubs and builds the wheel"
    subprocess.run([sys.executable, "scripts/gen_proto.py"], cwd=context, check=True, capture_output=True, timeout=120)
    # As in the image but offline: the build backend is this environment's setuptools.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "wheels"), "."], cwd=context, check=True, capture_output=True,
                   timeout=300)
    (wheel,) = (tmp_path / "wheels").glob("specdec-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
                                     .decode())
    for module in SERVICE_MODULES:
        assert f"{module}/__main__.py" in names
    assert {"specdec/pb/__init__.py", "specdec/pb/verifier_pb2.py", "specdec/pb/generation_pb2_grpc.py",
            "specdec/ops/healthcheck.py", "specdec_client/__init__.py", "specdec_client/_pb/generation_pb2_grpc.py"} <= names
    runtime = sorted(r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r)
    assert runtime == sorted(pyproject()["project"]["dependencies"])

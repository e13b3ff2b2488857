"""The client SDK's own distribution (clients/python): built from the files it names, its wheel holds the SDK
and its stubs and asks for gRPC, protobuf and tenacity alone; installed with pip into a fresh virtual
environment, with neither torch nor the services there, it generates from a running stack what the in-repo
SDK does.

The install downloads the SDK's dependencies and build requirements from the package index (pip's cache is
reused): about half a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from specdec_client import Client

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
# Everything building the SDK reads from the repository: its folder, the package, the protos, the generator.
BUILD_SOURCES = ("clients/python", "specdec_client", "proto", "scripts/gen_proto.py")
SDK_DEPENDENCIES = ["grpcio", "grpcio-health-checking", "protobuf", "tenacity"]
# What the SDK must not bring or need: the services and what they run on (and OpenTelemetry, an extra).
NOT_INSTALLED = ["torch", "transformers", "numpy", "specdec", "scheduler_svc", "proposer_svc", "verifier_svc",
                 "opentelemetry"]
PROMPT = "def fib(n):"
MAX_TOKENS = 12

# Run in the fresh environment with `python -I` (no PYTHONPATH, no script folder on sys.path), so that only
# what pip installed there can be imported.
SCRIPT = """
import asyncio, importlib.util, json, sys
import specdec_client
from specdec_client import AsyncClient, Client

target, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Client(target, timeout=60) as client:
    client.wait_ready(timeout=60)
    result = client.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
    model = client.model_info().model

async def streamed():
    async with AsyncClient(target, timeout=60) as client:
        return await client.stream(prompt, max_tokens=max_tokens, ignore_eos=True).collect()

stream = asyncio.run(streamed())
print(json.dumps({
    "sdk": specdec_client.__file__, "model": model,
    "text": result.text, "token_ids": result.token_ids, "stream_token_ids": stream.token_ids,
    "importable": [m for m in sys.argv[4:] if importlib.util.find_spec(m) is not None],
}))
"""


def copy_build_sources(dest: Path) -> Path:
    """The files the SDK's build reads, copied to `dest` (its build writes beside them) without anything
    generated; returns the distribution's folder there."""
    for source in BUILD_SOURCES:
        target = dest / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target,
                            ignore=shutil.ignore_patterns("__pycache__", "_pb", "build", "*.egg-info"))
        else:
            shutil.copy(ROOT / source, target)
    return dest / "clients" / "python"


def pins(requirements: list[str]) -> dict[str, str]:
    return dict(r.split(";")[0].strip().split("==") for r in requirements)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A scratch folder for source copies, wheels and the fresh environment; removed at the end (the
    environment is tens of MB)."""
    with tempfile.TemporaryDirectory(prefix="sdk-dist-") as tmp:
        yield Path(tmp)


def test_the_wheel_holds_the_sdk_and_its_stubs_and_needs_only_grpc_protobuf_and_tenacity(workdir):
    dist = copy_build_sources(workdir / "wheel-source")
    wheels = workdir / "wheels"
    # Offline, with this environment's setuptools and grpcio-tools (the test extra has both).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(wheels), str(dist)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("specdec_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    metadata = Parser().parsestr(next(v for n, v in files.items() if n.endswith(".dist-info/METADATA")).decode())

    packaged = {n for n in files if not n.split("/")[0].endswith(".dist-info")}
    sources = {f"specdec_client/{p.name}" for p in (ROOT / "specdec_client").glob("*.py")}
    stubs = {f"specdec_client/_pb/{name}" for name in
             ("__init__.py", "generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")}
    assert packaged == sources | stubs  # the public API's stubs only: no proto of the services
    for name in sources:
        assert files[name] == (ROOT / name).read_bytes(), f"{name} differs from the checkout's"
    assert b"from specdec_client._pb import" in files["specdec_client/_pb/generation_pb2_grpc.py"]

    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(pins(requires)) == SDK_DEPENDENCIES
    assert pins(requires).items() <= pins(root["dependencies"]).items()  # the root's pins
    tracing = [r for r in metadata.get_all("Requires-Dist") if 'extra == "tracing"' in r]
    assert pins(tracing).items() <= pins(root["dependencies"]).items() and list(pins(tracing)) == ["opentelemetry-api"]


def test_the_sdk_alone_in_a_fresh_venv_calls_a_running_stack(tiny_stack, workdir):
    dist = copy_build_sources(workdir / "install-source")
    venv = workdir / "venv"
    # Nothing of this environment leaks in: no PYTHONPATH, a venv of the base interpreter without site-packages.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120, env=env)
    python = str(venv / "bin" / "python")
    # As a user would: pip builds the wheel (in isolation, with the build requirements it downloads) and
    # installs it with its dependencies.
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(dist)], capture_output=True, text=True,
                             timeout=420, env=env, cwd=workdir)
    assert install.returncode == 0, f"pip install {dist} failed:\n{install.stderr[-4000:]}"

    target = tiny_stack.spec("scheduler").address
    run = subprocess.run([python, "-I", "-c", SCRIPT, target, PROMPT, str(MAX_TOKENS), *NOT_INSTALLED],
                         capture_output=True, text=True, timeout=180, env=env, cwd=workdir)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout)

    assert Path(got["sdk"]).is_relative_to(venv)  # the installed SDK, not the checkout's
    assert got["importable"] == []
    with Client(target, timeout=60) as client:
        want = client.generate(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
        assert got["model"] == client.model_info().model
    assert len(want.token_ids) == MAX_TOKENS
    assert (got["text"], got["token_ids"]) == (want.text, want.token_ids)
    assert got["stream_token_ids"] == want.token_ids

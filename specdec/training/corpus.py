"""The standard-library corpus the embedded code models are trained on, and the held-out files they never see
(scripts/train_models.py and scripts/train_medusa.py train on it; the serving benchmark's `code` workload cuts
its prompts from the held-out files)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

# Relative to the stdlib folder. Fixed so that every rerun evaluates on the same files.
HELD_OUT_FILES = (
    "textwrap.py",
    "shlex.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "csv.py",
    "json/encoder.py",
    "json/decoder.py",
    "string.py",
    "colorsys.py",
    "graphlib.py",
    "statistics.py",
)
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Split the stdlib .py files into (train, held_out), both sorted for determinism."""
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        (held if rel.as_posix() in HELD_OUT_FILES else train).append(path)
    missing = set(HELD_OUT_FILES) - {p.relative_to(root).as_posix() for p in held}
    if missing:
        raise SystemExit(f"held-out files not found under {root}: {sorted(missing)}")
    return train, held


def read_text(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long token stream: files joined by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)

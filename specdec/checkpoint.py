"""Local Hugging Face checkpoint folders: find, validate, and read them.

Nothing is ever fetched from a hub: a checkpoint is a folder with config.json, *.safetensors
weights and tokenizer files. Every failure names the folder and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODELS = REPO_ROOT / "models"
DEFAULT_TARGET = EMBEDDED_MODELS / "code-target"
DEFAULT_DRAFT = EMBEDDED_MODELS / "code-draft"
DEFAULT_MEDUSA = EMBEDDED_MODELS / "code-medusa"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used, with the reason in the message."""


def validate_checkpoint(path: str | Path, *, need_tokenizer: bool = True) -> Path:
    """Check that `path` is a loadable Llama-family checkpoint folder and return it resolved."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint folder {folder}: config.json is not valid JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"checkpoint folder {folder}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not list(folder.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint folder {folder} has no *.safetensors weights")
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"checkpoint folder {folder} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    return folder.resolve()


def load_config(folder: Path):
    """The transformers config object of a validated folder (parses rope, sliding window, ...)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files, with any 'model.' prefix kept as saved."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    folder = validate_checkpoint(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)

"""Local Hugging Face checkpoint folders: find, validate, and read them.

Nothing is ever fetched from a hub: a checkpoint is a folder with config.json, *.safetensors
weights and tokenizer files. Every failure names the folder and what is wrong with it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_MODELS = REPO_ROOT / "models"
# The small code models trained here on the standard library: the test fixtures, and what the code
# benchmarks in docs/ were measured on.
CODE_TARGET = EMBEDDED_MODELS / "code-target"
CODE_DRAFT = EMBEDDED_MODELS / "code-draft"
CODE_MEDUSA = EMBEDDED_MODELS / "code-medusa"
# What the services serve when given no model: the pretrained chat model SmolLM2-135M-Instruct, converted at
# install time (`make default-model`, specdec/model/default_model.py; not in git), with the draft and the
# Medusa heads trained for it here (scripts/train_chat_draft.py; in git).
DEFAULT_TARGET = EMBEDDED_MODELS / "smollm2-135m-instruct"
DEFAULT_DRAFT = EMBEDDED_MODELS / "smollm2-draft"
DEFAULT_MEDUSA = EMBEDDED_MODELS / "smollm2-medusa"
INSTALL_DEFAULT_HINT = "make default-model (or: python -m specdec.model.default_model) installs it"
WEIGHTS_INDEX = "model.safetensors.index.json"
SENTENCEPIECE_PIN = "sentencepiece==0.2.3"  # pyproject.toml's 'sentencepiece' extra
# Rope types whose cos/sin specdec/model/llama.py takes from transformers' own rotary module. Not "longrope": it
# switches frequencies when the longest sequence in a forward passes original_max_position_embeddings, so in a
# packed batch one request's length would change another's output.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "proportional")
# Attention layer kinds the runner implements (config.layer_types).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used, with the reason in the message."""


def validate_checkpoint(path: str | Path, *, need_tokenizer: bool = True) -> Path:
    """Check that `path` is a loadable Llama-family checkpoint folder and return it resolved."""
    folder = Path(path).expanduser()
    if not folder.exists():
        hint = f"; {INSTALL_DEFAULT_HINT}" if folder.resolve() == DEFAULT_TARGET else ""
        raise CheckpointError(f"checkpoint folder {folder} does not exist{hint}")
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
    check_supported_config(raw, folder)
    weight_files(folder)
    if need_tokenizer:
        check_tokenizer(folder)
    return folder.resolve()


def check_supported_config(raw: dict, folder: Path) -> None:
    """Refuse a config.json field whose maths specdec/model/llama.py does not implement (it would serve wrong output).

    What the runner does implement, and is therefore accepted: attention biases (Llama's attention_bias,
    Qwen2's q/k/v biases), any head_dim, grouped-query attention, any activation transformers knows in the
    gated MLP (checked where the weights load, as are the weights' shapes and biases against this config), the
    rope types in SUPPORTED_ROPE_TYPES, sliding windows (Mistral, Qwen2's layer_types) and pretraining_tp
    (transformers computes the same products whatever its value)."""

    def refuse(field: str, value, why: str):
        raise CheckpointError(f"checkpoint folder {folder}: config {field}={value!r} is not supported ({why})")

    if raw.get("mlp_bias"):
        refuse("mlp_bias", raw["mlp_bias"], "the runner's MLP has no biases")
    for field in ("qk_norm", "use_qk_norm", "qk_layernorm"):
        if raw.get(field):
            refuse(field, raw[field], "the runner does not normalise queries and keys")
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        refuse("quantization_config.quant_method", method, "quantised weights are not implemented")
    heads, kv_heads = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        refuse("num_key_value_heads", kv_heads, f"it does not divide num_attention_heads={heads}")
    head_dim = raw.get("head_dim") or (raw["hidden_size"] // heads if heads and raw.get("hidden_size") else None)
    if head_dim and head_dim % 2:
        refuse("head_dim", head_dim, "rotary embeddings need an even head size")
    for field in ("rope_parameters", "rope_scaling"):
        rope = raw.get(field)
        if not isinstance(rope, dict):
            continue
        if any(isinstance(v, dict) for v in rope.values()):
            refuse(field, sorted(rope), "one rope per layer type is not implemented")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            refuse(f"{field}.rope_type", rope_type, f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if partial != 1.0 and rope_type != "proportional":
            refuse(f"{field}.partial_rotary_factor", partial, "the runner rotates whole heads")
    if raw.get("partial_rotary_factor", 1.0) != 1.0 and not isinstance(raw.get("rope_parameters"), dict):
        refuse("partial_rotary_factor", raw["partial_rotary_factor"], "the runner rotates whole heads")
    for layer_type in raw.get("layer_types") or []:
        if layer_type not in SUPPORTED_LAYER_TYPES:
            refuse("layer_types", layer_type, f"supported: {', '.join(SUPPORTED_LAYER_TYPES)}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the weights, as transformers picks them: those the index names when
    there is one (other *.safetensors, such as a stray consolidated.safetensors, are not weights of this
    checkpoint), else model.safetensors."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint folder {folder}: {WEIGHTS_INDEX} has no valid weight_map ({exc})") from exc
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint folder {folder}: {WEIGHTS_INDEX} names missing files {missing}")
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    raise CheckpointError(f"checkpoint folder {folder} has no model.safetensors or {WEIGHTS_INDEX}"
                          + (f" (found {', '.join(others)}, which are not read without an index)" if others else ""))


def check_tokenizer(folder: Path) -> None:
    """Refuse a folder without a tokenizer we can load, saying what to add or install."""
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise CheckpointError(
            f"checkpoint folder {folder} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    if present == ["tokenizer.model"] and not has_sentencepiece():
        raise CheckpointError(
            f"checkpoint folder {folder} has only a SentencePiece tokenizer (tokenizer.model), which needs the "
            f"sentencepiece package: pip install '{SENTENCEPIECE_PIN}' (specdec's 'sentencepiece' extra), "
            f"or add the model's tokenizer.json"
        )


def has_sentencepiece() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None


def load_config(folder: Path):
    """The transformers config object of a validated folder (parses rope, sliding window, ...)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's weight files (weight_files), with any 'model.' prefix kept as saved."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        state.update(load_file(file))
    return state


def load_tokenizer(folder: str | Path):
    """The Hugging Face tokenizer of a checkpoint folder or of a folder of tokenizer files alone."""
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} does not exist")
    check_tokenizer(folder)
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if present == ["tokenizer.model"] and not _tokenizer_class(folder):
        # Without a tokenizer_class transformers falls back to a generic converter that drops SentencePiece's
        # leading-space rule (the first word gets another token); Llama and Mistral's is LlamaTokenizer.
        return LlamaTokenizer.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, json.JSONDecodeError):
        return None

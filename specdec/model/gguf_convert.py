"""Convert a Llama-architecture GGUF file into a Hugging Face checkpoint folder.

    python -m specdec.model.gguf_convert SRC.gguf OUT_DIR [--dtype bfloat16|float32]

The folder holds config.json (LlamaForCausalLM), model.safetensors, tokenizer.json, tokenizer_config.json
(with the GGUF's chat template) and generation_config.json, so that transformers and our runner load it
like any other checkpoint. Quantised tensors (Q4_1, Q8_0, ... whatever the `gguf` package dequantises)
are dequantised: the folder holds the quantised model's values, not the original weights.

Two things llama.cpp's converter changes that a faithful inverse must undo:
- the q and k projections' rows are permuted (llama.cpp rotates interleaved pairs, transformers rotates
  the two halves of each head): `unpermute_rows` puts them back;
- the tokenizer is stored as a token list + merges + a pre-tokenizer name: `build_tokenizer` rebuilds the
  byte-level BPE with the pre-tokenizer llama.cpp applies for that name.
Anything the conversion does not know how to invert (other architectures, rope scaling types, per-layer
head counts, extra tensors, SentencePiece vocabularies) is refused with a GGUFConversionError.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

PROVENANCE_FILE = "gguf_source.json"  # written last: its presence marks a complete conversion

# llama.cpp's token types (gguf.TokenType): which tokens are added tokens rather than BPE vocabulary.
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre names whose pre-tokenizer is "every digit alone, then GPT-2's regex" in llama.cpp
# (llama-vocab.cpp groups STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, ...), and those that are GPT-2's
# regex alone. Other names split text differently and are refused rather than tokenised wrong.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2 = {"default", "gpt2", "gpt-2"}

# GGUF tensor name (after "blk.N.") -> transformers LlamaForCausalLM name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFConversionError(ValueError):
    """A GGUF file this converter cannot turn into an equivalent checkpoint, with the reason."""


@dataclass
class GGUFModel:
    path: Path
    metadata: dict[str, object]  # key -> value (strings, numbers, lists)
    reader: object  # gguf.GGUFReader, for the tensors

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def get(self, key: str, default=None):
        """An architecture key ("block_count" -> "llama.block_count") or a full key."""
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        return self.metadata.get(full, default)

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFConversionError(f"{self.path}: GGUF metadata has no {key!r}")
        return value


def read_gguf(path: str | Path) -> GGUFModel:
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFConversionError(f"GGUF file {path} does not exist")
    reader = GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    model = GGUFModel(path, metadata, reader)
    if model.arch != "llama":
        raise GGUFConversionError(f"{path}: architecture {model.arch!r} is not supported (supported: llama)")
    return model


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. weight: [n_heads * head_dim, in].

    llama.cpp writes W.reshape(n_heads, 2, head_dim // 2, in).swapaxes(1, 2): within each head, row i of
    the first half and row i of the second half become neighbours (2i, 2i + 1). This is the inverse."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise GGUFConversionError(f"{rows} rows do not split into {n_heads} heads of an even size")
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _single(model: GGUFModel, key: str) -> int:
    """A per-model count that GGUF may also store per layer; refused where the layers differ."""
    value = model.require(key)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFConversionError(f"{model.path}: {model.arch}.{key} differs between layers ({value}): not supported")
        value = value[0]
    return int(value)


@dataclass
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def model_shape(model: GGUFModel) -> Shape:
    heads = _single(model, "attention.head_count")
    hidden = int(model.require("embedding_length"))
    head_dim = int(model.get("attention.key_length") or hidden // heads)
    if int(model.get("attention.value_length") or head_dim) != head_dim:
        raise GGUFConversionError(f"{model.path}: attention.value_length differs from key_length: not supported")
    rope_dims = int(model.get("rope.dimension_count") or head_dim)
    if rope_dims != head_dim:
        raise GGUFConversionError(
            f"{model.path}: rope.dimension_count {rope_dims} rotates part of a head of {head_dim}: not supported")
    if model.get("expert_count"):
        raise GGUFConversionError(f"{model.path}: a mixture of experts ({model.get('expert_count')}) is not supported")
    tokens = model.metadata.get("tokenizer.ggml.tokens") or []
    return Shape(
        layers=int(model.require("block_count")),
        hidden=hidden,
        intermediate=_single(model, "feed_forward_length"),
        heads=heads,
        kv_heads=_single(model, "attention.head_count_kv") if model.get("attention.head_count_kv") else heads,
        head_dim=head_dim,
        vocab=int(model.get("vocab_size") or len(tokens)),
    )


def _rope_parameters(model: GGUFModel) -> dict:
    theta = _float32(model.get("rope.freq_base") or 10000.0)
    scaling = model.get("rope.scaling.type") or "none"
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "factor": float(model.require("rope.scaling.factor")), "rope_theta": theta}
    raise GGUFConversionError(f"{model.path}: rope.scaling.type {scaling!r} is not supported (supported: none, linear)")


def state_dict(model: GGUFModel, shape: Shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transformers-named tensors, dequantised, q/k rows un-permuted, cast to `dtype`."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    for tensor in model.reader.tensors:
        name = _hf_name(model, tensor.name, shape.layers)
        expected = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise GGUFConversionError(f"{model.path}: tensor {tensor.name}: {exc}") from exc
        values = np.array(values, dtype=np.float32).reshape(expected)  # a copy: F32 tensors are read-only memmaps
        if name.endswith("self_attn.q_proj.weight"):
            values = unpermute_rows(values, shape.heads)
        elif name.endswith("self_attn.k_proj.weight"):
            values = unpermute_rows(values, shape.kv_heads)
        state[name] = torch.from_numpy(values).to(dtype).contiguous()
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if name not in state:
            raise GGUFConversionError(f"{model.path}: GGUF has no tensor for {name}")
    return state


def _hf_name(model: GGUFModel, name: str, layers: int) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        if rest in _LAYER_TENSORS and index.isdigit() and int(index) < layers:
            return f"model.layers.{index}.{_LAYER_TENSORS[rest]}"
    # rope_freqs.weight (Llama 3 rope), biases, expert tensors, ...: a model this converter would get wrong.
    raise GGUFConversionError(f"{model.path}: tensor {name!r} has no Llama counterpart here: not supported")


def _float32(value) -> float:
    """A float GGUF stored in 32 bits, written back as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def llama_config(model: GGUFModel, shape: Shape, tied: bool, dtype: torch.dtype):
    """The transformers LlamaConfig of the equivalent LlamaForCausalLM."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=int(model.require("context_length")),
        rms_norm_eps=_float32(model.require("attention.layer_norm_rms_epsilon")),
        rope_parameters=_rope_parameters(model),
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=model.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=model.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=model.get("tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )
    return config


def build_tokenizer(model: GGUFModel):
    """The byte-level BPE tokenizer (a `tokenizers.Tokenizer`) of a GGUF with tokenizer.ggml.model 'gpt2'."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = model.get("tokenizer.ggml.model")
    if kind != "gpt2":
        hint = " (a SentencePiece vocabulary)" if kind == "llama" else ""
        raise GGUFConversionError(
            f"{model.path}: tokenizer.ggml.model {kind!r}{hint} is not supported (supported: gpt2, byte-level BPE)")
    pre = model.get("tokenizer.ggml.pre") or "default"
    if pre not in _DIGITS_THEN_GPT2 | _GPT2:
        raise GGUFConversionError(
            f"{model.path}: tokenizer.ggml.pre {pre!r} is not supported "
            f"(supported: {', '.join(sorted(_DIGITS_THEN_GPT2 | _GPT2))})")
    tokens: list[str] = list(model.require("tokenizer.ggml.tokens"))
    types: list[int] = list(model.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in model.require("tokenizer.ggml.merges")]
    unk_id = model.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    add_prefix_space = bool(model.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre in _DIGITS_THEN_GPT2 else byte_level)
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their vocabulary ids: control tokens are special (skipped when decoding with
    # skip_special_tokens), user-defined ones are plain added tokens; both are matched before the BPE.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == _CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == _USER_DEFINED])
    add_bos = bool(model.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(model.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        ends = {k: (tokens[model.require(f"tokenizer.ggml.{k}_token_id")], model.require(f"tokenizer.ggml.{k}_token_id"))
                for k, on in (("bos", add_bos), ("eos", add_eos)) if on}
        single = [ends["bos"][0]] * add_bos + ["$A"] + [ends["eos"][0]] * add_eos
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(ends.values()))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(model: GGUFModel) -> dict:
    tokens = model.require("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        index = model.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[index]

    config = {
        "backend": "tokenizers",
        "tokenizer_class": "TokenizersBackend",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(model.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(model.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model.require("context_length")),
    }
    template = model.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def stop_token_ids(model: GGUFModel) -> list[int]:
    """Every id the GGUF declares as the end of a sequence or of a turn, EOS first."""
    ids = [model.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(src: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the checkpoint folder of GGUF file `src` to `out_dir` (replaced if it exists) and return it.

    The folder is written beside its destination and renamed into place, with PROVENANCE_FILE last, so
    an interrupted conversion never leaves a folder that looks complete."""
    from safetensors.torch import save_file

    model = read_gguf(src)
    shape = model_shape(model)
    tokenizer = build_tokenizer(model)  # before the weights: a refusal costs nothing
    if tokenizer.get_vocab_size() != shape.vocab:
        raise GGUFConversionError(f"{model.path}: {tokenizer.get_vocab_size()} tokens for a vocabulary of {shape.vocab}")
    state = state_dict(model, shape, dtype)
    tied = "lm_head.weight" not in state

    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    (partial / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only; the other files are 0644
    llama_config(model, shape, tied, dtype).save_pretrained(partial)
    stops = stop_token_ids(model)
    generation = {"bos_token_id": model.get("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": stops[0] if len(stops) == 1 else stops,
                  "pad_token_id": model.get("tokenizer.ggml.padding_token_id")}
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(str(partial / "tokenizer.json"))
    (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model), indent=2) + "\n")
    provenance = {"source": model.path.name, "sha256": sha256_of(model.path), "gguf": version("gguf"),
                  "dtype": str(dtype).removeprefix("torch."), "license": model.get("general.license")}
    (partial / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a .gguf file")
    parser.add_argument("out", type=Path, help="the checkpoint folder to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(args.src, args.out, getattr(torch, args.dtype))
    except GGUFConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

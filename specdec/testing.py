"""Helpers shared by the test suite and benchmarks: tiny random checkpoints of each architecture."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_DIMS = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_tiny_checkpoint(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a random-weight fp32 checkpoint of `arch` (llama, mistral or qwen2) into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config
    from transformers import Qwen2ForCausalLM

    dims = {**TINY_DIMS, **overrides}
    if arch == "llama":
        config, cls = LlamaConfig(**dims, tie_word_embeddings=False), LlamaForCausalLM
    elif arch == "mistral":
        # A short window so that tests cross it.
        config, cls = MistralConfig(**{"sliding_window": 16, **dims}), MistralForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**dims, tie_word_embeddings=True), Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    # Random init gives near-uniform logits; scale up so argmax and acceptance are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder

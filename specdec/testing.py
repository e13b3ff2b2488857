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


# Chi-square critical values at significance alpha = 0.001, by degrees of freedom.
CHI2_CRITICAL_0_001 = {
    1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877,
    10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697, 16: 39.252, 17: 40.790,
    18: 42.312, 19: 43.820, 20: 45.315, 21: 46.797, 22: 48.268, 23: 49.728, 24: 51.179, 25: 52.620,
    26: 54.052, 27: 55.476, 28: 56.892, 29: 58.301, 30: 59.703,
}


def chi_square_passes(
    observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 0.0
) -> tuple[bool, float, int]:
    """Pearson's test of observed counts against expected probabilities at alpha = 0.001.

    Cells with expected probability 0 must be empty (else the check fails outright) and are left out
    of the degrees of freedom. Cells whose expected count is below `min_expected` are pooled into one
    cell, so that the chi-square approximation holds for small samples. Returns (passes, statistic, df).
    """
    observed, expected_probs = observed.double().flatten(), expected_probs.double().flatten()
    impossible = expected_probs == 0
    if observed[impossible].sum() > 0:
        return False, float("inf"), -1
    observed, expected = observed[~impossible], expected_probs[~impossible] * observed.sum()
    small = expected < min_expected
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(expected) - 1
    return stat < CHI2_CRITICAL_0_001[df], stat, df

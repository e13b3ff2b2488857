"""The Llama forward over ragged chains in NumPy, for small models on CPU (the draft).

A small model's forward is bound by the framework's cost per operator call, not by arithmetic: the
embedded draft (2 layers, width 128) does about a million multiply-adds per token, yet a torch forward of
one token takes about 1 ms on a CPU core, most of it the fixed cost of its operator calls (20-35 us for
each oneDNN projection of these small matrices). NumPy's calls cost a few microseconds on such arrays,
and the same forward takes about a quarter of the time for one request and 0.5-0.7x for 4-16
(docs/draft_forward.md in git history): a draft's chain of k candidates is k forwards a step.

It computes what `specdec.model.llama.forward_packed` computes, for chains only (no trees), in float32,
reading and writing the runner's own KV cache through NumPy views of its tensors, so a slot may be
filled by one path and continued by the other. The order of floating-point operations differs from
torch's, so logits agree to about 1e-5, not bit for bit: this path serves proposals, never the target's
verification, whose output must not depend on how many tokens a forward holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdec.model.linear import Linear, can_prepack
from specdec.model.llama import LlamaWeights


def supports(weights: LlamaWeights, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this path can run the model: float32 on CPU, SiLU MLP, rotary tables, no sliding window."""
    config = weights.config
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and getattr(config, "hidden_act", None) == "silu"
        and weights.rope_cos is not None
        and all(layer.sliding_window is None for layer in weights.layers)
    )


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().contiguous().numpy()


def _transposed(t: torch.Tensor) -> np.ndarray:
    """[out, in] weight -> [in, out] contiguous, so that x @ w reads it row by row."""
    return np.ascontiguousarray(t.detach().numpy().T)


def _scaled(norm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[out, in]: an RMSNorm's scale folded into the projection after it:
    rms_norm(x) W^T = (x / rms(x)) (W diag(norm))^T."""
    return weight.detach() * norm.detach()[None, :]


def _normed(norm: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
    """[in, out]: _scaled, transposed for x @ w."""
    return np.ascontiguousarray(_scaled(norm, weight).numpy().T)


@dataclass
class _Layer:
    qkv: np.ndarray  # [d, (H + 2 KV) D], the input norm's scale folded in
    qkv_bias: np.ndarray | None
    o: np.ndarray  # [H D, d]
    o_bias: np.ndarray | None
    gate_up: np.ndarray  # [d, 2 F], the post-attention norm's scale folded in
    down: np.ndarray  # [F, d]
    cache_k: np.ndarray  # [slots, KV, S, D], a view of the runner's tensor
    cache_v: np.ndarray


class NumpyForward:
    """Chains through a Llama model in NumPy, on a runner's KV cache (see the module docstring)."""

    def __init__(self, weights: LlamaWeights, cache_k: list[torch.Tensor], cache_v: list[torch.Tensor]) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
        self.eps = np.float32(weights.rms_eps)
        self.embed = _np(weights.embed)  # [V, d]
        self.lm_head = _normed(weights.final_norm, weights.lm_head.weight)  # [d, V]
        # Beyond one row OpenBLAS repacks this large matrix on every call (0.2-0.3 ms for 2-8 rows of the
        # embedded draft, against 0.03 for one); oneDNN's kernel on a weight packed once takes half that.
        self.lm_head_rows = Linear.of(_scaled(weights.final_norm, weights.lm_head.weight).contiguous(),
                                      prepack=can_prepack(torch.device("cpu"), torch.float32))
        self.intermediate = weights.layers[0].down.weight.shape[1] if weights.layers else 0
        self.rope_cos, self.rope_sin = _np(weights.rope_cos), _np(weights.rope_sin)  # [P, D] each
        half = self.head_dim // 2
        # x.roll(half) as a gather: the rotation's partner of every element (the sign is in rope_sin).
        self.rotate = np.concatenate([np.arange(half, self.head_dim), np.arange(half)])
        self.layers = [
            _Layer(_normed(layer.input_norm, layer.qkv.weight), _np(layer.qkv.bias), _transposed(layer.o.weight),
                   _np(layer.o.bias), _normed(layer.post_norm, layer.gate_up.weight), _transposed(layer.down.weight),
                   ck.numpy(), cv.numpy())
            for layer, ck, cv in zip(weights.layers, cache_k, cache_v)
        ]

    def _rms_normed(self, x: np.ndarray) -> np.ndarray:
        """x / rms(x) per row; the norm's scale is in the projection that follows (_normed)."""
        mean_square = np.einsum("nd,nd->n", x, x) / np.float32(x.shape[1])
        return x / np.sqrt(mean_square + self.eps)[:, None]

    def last_logits(self, chains: list[tuple[int, int, list[int]]]) -> np.ndarray:
        """chains: (slot, cached length, new tokens) per request, slots distinct, every chain non-empty.
        Writes every new token's K/V at the slot's next positions; returns each chain's last logits [B, V]."""
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        group = H // KV
        tokens = np.fromiter((t for _, _, new in chains for t in new), dtype=np.int64)
        n = len(tokens)
        slot_index = np.empty(n, dtype=np.int64)
        store_index = np.empty(n, dtype=np.int64)
        starts, start = [], 0
        for slot, base, new in chains:
            slot_index[start : start + len(new)] = slot
            store_index[start : start + len(new)] = np.arange(base, base + len(new))
            starts.append(start)
            start += len(new)
        cos = self.rope_cos[store_index][:, None]  # [N, 1, D]: a chain's positions are its cache positions
        sin = self.rope_sin[store_index][:, None]
        kv_heads = np.arange(KV)[None]
        scale = np.float32(D**-0.5)
        h = self.embed[tokens]  # [N, d]
        attn = np.empty((n, H, D), dtype=np.float32)
        ffn = self.intermediate
        for layer in self.layers:
            qkv = self._rms_normed(h) @ layer.qkv
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            qk = qkv[:, : (H + KV) * D].reshape(n, H + KV, D)
            qk = qk * cos + qk[:, :, self.rotate] * sin
            layer.cache_k[slot_index[:, None], kv_heads, store_index[:, None]] = qk[:, H:]
            layer.cache_v[slot_index[:, None], kv_heads, store_index[:, None]] = (
                qkv[:, (H + KV) * D :].reshape(n, KV, D))
            for (slot, base, new), s in zip(chains, starts):
                m, total = len(new), base + len(new)
                # [KV, group * m, D]: query head j reads KV head j // group, as transformers' GQA does.
                q = qk[s : s + m, :H].transpose(1, 0, 2).reshape(KV, group * m, D) * scale
                scores = q @ layer.cache_k[slot, :, :total].transpose(0, 2, 1)
                if m > 1:  # the chain's own tokens are causal among themselves
                    future = np.arange(total)[None] > (base + np.arange(m))[:, None]  # [m, total]
                    scores.reshape(KV, group, m, total)[:, :, future] = -np.inf
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                out = scores @ layer.cache_v[slot, :, :total]  # [KV, group * m, D]
                attn[s : s + m] = out.reshape(H, m, D).transpose(1, 0, 2)
            o = attn.reshape(n, H * D) @ layer.o
            if layer.o_bias is not None:
                o += layer.o_bias
            h = h + o
            gate_up = self._rms_normed(h) @ layer.gate_up
            gate = gate_up[:, :ffn]
            # silu(gate) = gate * sigmoid(gate), the sigmoid as 0.5 + 0.5 tanh(gate / 2): no exp to overflow
            h = h + (gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * gate_up[:, ffn:]) @ layer.down
        last = np.fromiter((s + len(new) - 1 for (_, _, new), s in zip(chains, starts)), dtype=np.int64)
        normed = self._rms_normed(h[last])
        if len(chains) == 1:
            return normed @ self.lm_head
        return self.lm_head_rows(torch.from_numpy(normed)).numpy()

"""A compact Llama-family forward pass over a packed ragged batch.

Covers the architectures that share the Llama block (Llama, Mistral, Qwen2): RMSNorm, rotary
embeddings (any rope type transformers knows, through its own rotary module), grouped-query
attention with optional q/k/v(/o) biases and an optional sliding window, and a gated MLP.

The forward takes every request's new tokens packed into one [N] sequence, so projections and the
MLP run as one matmul for the whole batch; only attention is per request, reading the request's
own KV-cache slot through a view (no gather, no copy of the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.model.checkpoint import CheckpointError, load_config, load_state_dict, validate_checkpoint
from specdec.model.linear import Linear, can_prepack


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [d]
    qkv: Linear  # [(H + 2 * KV) * D, d]  q, k, v projections fused, optional biases
    o: Linear  # [d, H * D], optional bias
    post_norm: torch.Tensor  # [d]
    gate_up: Linear  # [2 * F, d]  gate and up projections fused
    down: Linear  # [d, F]
    sliding_window: int | None  # keys older than this many positions are not attended


@dataclass
class LlamaWeights:
    config: object  # the transformers config the weights came with
    embed: torch.Tensor  # [V, d]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [d]
    lm_head: Linear  # [V, d]
    rotary: torch.nn.Module  # transformers' rotary embedding of this architecture
    # cos and sin of every position, rotary(...) computed once at load where they depend on the position
    # alone (None for rope types that rescale with the sequence's length): a forward indexes them instead
    # of running the module's several ops again.
    rope_cos: torch.Tensor | None  # [P, D]
    rope_sin: torch.Tensor | None  # [P, D], its first half negated: see apply_rotary
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    act: object

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def prepacked(self) -> bool:
        """Whether the projections run on oneDNN-prepacked weights (specdec/model/linear.py)."""
        return self.lm_head.packed is not None

    @property
    def hidden_size(self) -> int:
        return self.embed.shape[1]

    @property
    def num_params(self) -> int:
        tensors = [self.embed, self.final_norm]
        if self.lm_head.weight.data_ptr() != self.embed.data_ptr():
            tensors.append(self.lm_head.weight)
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_norm]
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                tensors += [t for t in (linear.weight, linear.bias) if t is not None]
        return sum(t.numel() for t in tensors)


def _rotary_module(config) -> torch.nn.Module:
    if config.model_type == "mistral":
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding as Rotary
    elif config.model_type == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rotary
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
    return Rotary(config)


def _layer_window(config, index: int) -> int | None:
    """The sliding window of layer `index`, as transformers applies it for this architecture."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[index] == "sliding_attention" else None
    return window if config.model_type == "mistral" else None


def _rope_tables(rotary: torch.nn.Module, config, device, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rotary module's cos and sin at positions 0..max_position_embeddings-1, the sin's first half negated
    (apply_rotary), or (None, None) where they change with the sequence's length (dynamic, longrope)."""
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return None, None
    positions = torch.arange(config.max_position_embeddings, device=device)[None]
    cos, sin = rotary(torch.empty(0, device=device, dtype=dtype), positions)
    return cos[0].contiguous(), _signed(sin[0])


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., D] with its first half negated, as apply_rotary takes it (a new tensor)."""
    sin = sin.clone()
    sin[..., : sin.shape[-1] // 2].neg_()
    return sin


def load_llama(path: str | Path, device: torch.device, dtype: torch.dtype, prepack: bool | None = None) -> LlamaWeights:
    """Read a validated checkpoint folder into fused, device-resident weights. prepack: reorder the
    projections' weights for oneDNN (specdec/model/linear.py); None = wherever the device and dtype allow."""
    from transformers.activations import ACT2FN

    folder = validate_checkpoint(path, need_tokenizer=False)
    config = load_config(folder)
    if config.hidden_act not in ACT2FN:
        raise CheckpointError(f"checkpoint folder {folder}: config hidden_act={config.hidden_act!r} is not supported "
                              f"(transformers knows no such activation)")
    state = load_state_dict(folder)
    prefix = "model." if any(k.startswith("model.") for k in state) else ""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    d = config.hidden_size
    shape_fields = (f"hidden_size={d}, num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}, "
                    f"head_dim={head_dim}")
    used: set[str] = set()

    def take(name: str, required: bool = True, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        tensor = state.get(name)
        if tensor is None and required:
            raise _missing(folder, name)
        if tensor is None:
            return None
        if shape is not None and tuple(tensor.shape) != shape:
            raise CheckpointLayoutError(f"checkpoint {folder}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                        f"the config says {shape} ({shape_fields})")
        used.add(name)
        return tensor.to(device=device, dtype=dtype)

    if prepack is None:
        prepack = can_prepack(device, dtype)

    def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        return Linear.of(weight, bias, prepack=prepack)

    qkv_bias, o_bias = _attention_biases(config)
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        q = take(f"{p}self_attn.q_proj.weight", shape=(num_heads * head_dim, d))
        k, v = (take(f"{p}self_attn.{n}_proj.weight", shape=(num_kv_heads * head_dim, d)) for n in "kv")
        biases = [take(f"{p}self_attn.{n}_proj.bias") if qkv_bias else None for n in "qkv"]
        layers.append(
            LayerWeights(
                input_norm=take(f"{p}input_layernorm.weight"),
                qkv=linear(torch.cat([q, k, v]).contiguous(), torch.cat(biases) if qkv_bias else None),
                o=linear(take(f"{p}self_attn.o_proj.weight", shape=(d, num_heads * head_dim)),
                         take(f"{p}self_attn.o_proj.bias") if o_bias else None),
                post_norm=take(f"{p}post_attention_layernorm.weight"),
                gate_up=linear(torch.cat([take(f"{p}mlp.gate_proj.weight"), take(f"{p}mlp.up_proj.weight")]).contiguous()),
                down=linear(take(f"{p}mlp.down_proj.weight")),
                sliding_window=_layer_window(config, i),
            )
        )
    embed = take(f"{prefix}embed_tokens.weight")
    lm_head = take("lm_head.weight", required=not config.tie_word_embeddings)
    final_norm = take(f"{prefix}norm.weight")
    # A tensor the runner does not read is a part of the model it would leave out (MLP biases, q/k norms,
    # biases the config does not declare, which transformers ignores too): refused rather than served wrong.
    unused = sorted(name for name in state if name not in used and not name.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        raise CheckpointLayoutError(f"checkpoint {folder}: weights hold tensors this {config.model_type} config does "
                                    f"not use: {shown}")
    rotary = _rotary_module(config).to(device)
    rope_cos, rope_sin = _rope_tables(rotary, config, device, dtype)
    return LlamaWeights(
        config=config,
        embed=embed,
        layers=layers,
        final_norm=final_norm,
        lm_head=linear(embed if lm_head is None else lm_head),
        rotary=rotary,
        rope_cos=rope_cos,
        rope_sin=rope_sin,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_eps=config.rms_norm_eps,
        act=ACT2FN[config.hidden_act],
    )


def _attention_biases(config) -> tuple[bool, bool]:
    """Whether transformers' attention of this architecture has q/k/v biases and an o bias."""
    if config.model_type == "qwen2":
        return True, False
    if config.model_type == "llama":
        return bool(config.attention_bias), bool(config.attention_bias)
    return False, False  # mistral


class CheckpointLayoutError(CheckpointError):
    """The weights file does not hold the tensors the config promises."""


def _missing(folder: Path, name: str) -> CheckpointLayoutError:
    return CheckpointLayoutError(f"checkpoint {folder}: weights have no tensor {name!r} (not a Llama-family layout?)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op where there is no rounding to the model dtype in between
        return F.rms_norm(x, weight.shape, weight, eps)
    # Same order of operations as transformers (norm in fp32, scale in the model dtype).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, D]; cos, sin: [N, 1, D], sin with its first half negated.

    transformers' x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): here the halves are
    swapped by a roll and the sign sits in the sin, which gives the same products bit for bit in two ops
    fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


@dataclass
class Segment:
    """One request's share of a packed batch, as attention needs it."""

    start: int  # first index of its new tokens in the packed batch
    length: int  # number of new tokens
    slot: int  # KV-cache slot
    total: int  # keys it attends over: context + new tokens
    mask: torch.Tensor | None  # [length, total] bool, True = attend; None = attend to all keys
    is_causal: bool  # prefill from an empty slot: plain causal attention, no mask needed
    window_mask: torch.Tensor | None  # [length, total] bool mask for sliding-window layers


def forward_packed(
    w: LlamaWeights,
    tokens: torch.Tensor,  # [N] token ids
    positions: torch.Tensor,  # [N] rotary positions
    cache_k: list[torch.Tensor],  # per layer [slots, KV, S, D]
    cache_v: list[torch.Tensor],  # per layer [slots, KV, S, D]
    slot_index: torch.Tensor,  # [N] slot each token's K/V is written to
    store_index: torch.Tensor,  # [N] cache position each token's K/V is written to
    segments: list[Segment],
) -> torch.Tensor:
    """Run the blocks over the packed tokens; returns final-normed hidden states [N, d]."""
    n = tokens.shape[0]
    h = w.embed[tokens]
    if w.rope_cos is not None:
        cos, sin = w.rope_cos[positions][:, None], w.rope_sin[positions][:, None]
    else:
        cos, sin = w.rotary(h, positions[None])
        cos, sin = cos[0, :, None, :], _signed(sin[0, :, None, :])
    H, KV, D = w.num_heads, w.num_kv_heads, w.head_dim
    scale = D**-0.5
    attn_out = h.new_empty(n, H, D)
    for i, layer in enumerate(w.layers):
        a = rms_norm(h, layer.input_norm, w.rms_eps)
        qkv = layer.qkv(a)
        # q and k rotated together: one set of ops for both.
        qk = apply_rotary(qkv[:, : (H + KV) * D].view(n, H + KV, D), cos, sin)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + KV) * D :].view(n, KV, D)
        ck, cv = cache_k[i], cache_v[i]
        ck[slot_index, :, store_index] = k
        cv[slot_index, :, store_index] = v
        for seg in segments:
            qs = q[seg.start : seg.start + seg.length].transpose(0, 1)[None]  # [1, H, n, D]
            ks = ck[seg.slot, :, : seg.total][None]  # [1, KV, total, D], a view
            vs = cv[seg.slot, :, : seg.total][None]
            mask = seg.window_mask if layer.sliding_window is not None else seg.mask
            out = F.scaled_dot_product_attention(
                qs,
                ks,
                vs,
                attn_mask=mask,
                is_causal=seg.is_causal and mask is None,
                scale=scale,
                enable_gqa=H != KV,
            )
            attn_out[seg.start : seg.start + seg.length] = out[0].transpose(0, 1)
        h = h + layer.o(attn_out.view(n, H * D))
        m = rms_norm(h, layer.post_norm, w.rms_eps)
        gate, up = layer.gate_up(m).chunk(2, dim=-1)
        h = h + layer.down(w.act(gate) * up)
    return rms_norm(h, w.final_norm, w.rms_eps)

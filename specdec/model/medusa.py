"""Medusa-1 tree heads: guesses for tokens 2, 3, 4... ahead from the target's last hidden state.

Convention (the verifier, the proposer and the scheduler rely on it): the heads read the target's
FINAL-NORMED hidden state at position t, the state from which the target's own lm_head predicts token
t + 1 (`ModelRunner.forward(..., return_hidden=True)`, the verifier's `hidden_state`). Token t + 1 is the
verifier's pending (bonus) token; head i (0-based) predicts token t + 2 + i. So a candidate tree's roots
are guesses for t + 2 and follow the pending token.

A heads folder holds config.json (`MedusaConfig` plus "model_type": "medusa") and model.safetensors
(bf16). `load_medusa_heads` checks everything and raises `MedusaError` naming the folder and the problem.
`build_tree` turns one request's head log-probs into a best-first candidate tree.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODEL_TYPE = "medusa"
LM_HEADS = ("own", "target")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class MedusaError(ValueError):
    """A heads folder that cannot be used; the message names the folder and what to fix."""


@dataclass(frozen=True)
class MedusaConfig:
    hidden_size: int  # d of the target's hidden state the heads read
    vocab_size: int  # V of the target
    num_heads: int  # H: head i guesses token t + 2 + i
    num_layers: int = 1  # residual blocks per head
    target: str = ""  # informational: the target checkpoint the heads were trained on
    # "own": each head ends in its own [V, d] projection (Medusa-1). "target": every head reads through the
    # target's own lm_head, which the folder does not store (a large vocabulary would make each head as big
    # as the target's embedding): loading then needs the target checkpoint.
    lm_head: str = "own"

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: object, *, source: str = "config") -> "MedusaConfig":
        """Validate a parsed config.json; `source` names it in errors."""
        if not isinstance(raw, dict):
            raise MedusaError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") != MODEL_TYPE:
            raise MedusaError(
                f"{source}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r} "
                f"(is this a model checkpoint rather than a Medusa heads folder?)"
            )
        values = {}
        for name, minimum in (("hidden_size", 1), ("vocab_size", 1), ("num_heads", 1), ("num_layers", 0)):
            if name not in raw:
                if name == "num_layers":
                    continue
                raise MedusaError(f"{source}: missing field {name!r}")
            value = raw[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise MedusaError(f"{source}: field {name!r} must be an integer >= {minimum}, got {value!r}")
            values[name] = value
        target = raw.get("target", "")
        if not isinstance(target, str):
            raise MedusaError(f"{source}: field 'target' must be a string, got {target!r}")
        lm_head = raw.get("lm_head", "own")
        if lm_head not in LM_HEADS:
            raise MedusaError(f"{source}: field 'lm_head' must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
        return cls(**values, target=target, lm_head=lm_head)

    @property
    def shares_target_lm_head(self) -> bool:
        return self.lm_head == "target"


class ResBlock(torch.nn.Module):
    """h + SiLU(Linear(h)); starts as the identity (zero weights), as in Medusa."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.nn.functional.silu(self.linear(h))


class MedusaHeads(torch.nn.Module):
    """H heads, each num_layers residual blocks then a [V, d] projection (Medusa-1): its own, or the target's
    lm_head shared by all (config.lm_head == "target"; set it with attach_lm_head, it is not saved)."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        d, v = config.hidden_size, config.vocab_size
        shared = config.shares_target_lm_head
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(*[ResBlock(d) for _ in range(config.num_layers)],
                                *([] if shared else [torch.nn.Linear(d, v, bias=False)]))
            for _ in range(config.num_heads)
        )
        # Not in the state dict: it is the target's, read from its checkpoint when the heads are loaded.
        self.register_buffer("target_lm_head", torch.zeros((v, d)) if shared else None, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] (final-normed target state at t) -> logits [..., H, V] for tokens t+2 .. t+1+H."""
        states = torch.stack([head(hidden) for head in self.heads], dim=-2)
        if self.target_lm_head is None:
            return states
        return states @ self.target_lm_head.T  # one matmul for every head: [..., H, d] x [d, V]

    @torch.no_grad()
    def attach_lm_head(self, weight: torch.Tensor) -> None:
        """Set the target's lm_head [V, d] that heads with config.lm_head == "target" read through."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if not self.config.shares_target_lm_head:
            raise MedusaError("these heads have their own projections; they do not read the target's lm_head")
        if tuple(weight.shape) != expected:
            raise MedusaError(f"the target's lm_head has shape {tuple(weight.shape)}, the heads need [V, d] = "
                              f"{expected}: they were trained for another target")
        self.target_lm_head = weight.detach().to(self.target_lm_head.device, self.target_lm_head.dtype).clone()

    @torch.no_grad()
    def init_from_lm_head(self, weight: torch.Tensor) -> None:
        """Copy the target's lm_head [V, d] into every head's projection (or attach it, when shared); residual
        blocks start at zero, so before training every head guesses what the target's lm_head would (Medusa's
        init)."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise MedusaError(f"lm_head of shape {tuple(weight.shape)} does not fit heads of [V, d] = {expected}")
        if self.config.shares_target_lm_head:
            self.attach_lm_head(weight)
        for head in self.heads:
            blocks = head if self.config.shares_target_lm_head else head[:-1]
            if not self.config.shares_target_lm_head:
                head[-1].weight.copy_(weight)
            for block in blocks:
                block.linear.weight.zero_()
                block.linear.bias.zero_()


def target_lm_head(folder: str | Path) -> torch.Tensor:
    """The lm_head [V, d] of a target checkpoint folder (its tied embedding when it has no lm_head tensor)."""
    from specdec.model.checkpoint import CheckpointError, load_state_dict

    try:
        state = load_state_dict(Path(folder))
    except (CheckpointError, OSError) as exc:
        raise MedusaError(f"cannot read the target's lm_head from {folder}: {exc}") from None
    weight = state.get("lm_head.weight", state.get("model.embed_tokens.weight"))
    if weight is None:
        raise MedusaError(f"target checkpoint {folder} has neither lm_head.weight nor model.embed_tokens.weight")
    return weight.float()


def expected_shapes(config: MedusaConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a heads state dict for `config`."""
    d, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_heads):
        for j in range(config.num_layers):
            shapes[f"heads.{i}.{j}.linear.weight"] = (d, d)
            shapes[f"heads.{i}.{j}.linear.bias"] = (d,)
        if not config.shares_target_lm_head:
            shapes[f"heads.{i}.{config.num_layers}.weight"] = (v, d)
    return shapes


def save_medusa_heads(heads: MedusaHeads, folder: str | Path) -> None:
    """Write config.json and model.safetensors (bfloat16) into `folder` (created if missing)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(heads.config.to_dict(), indent=2) + "\n")
    state = {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in heads.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def load_medusa_heads(folder: str | Path, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, target: str | Path | None = None) -> MedusaHeads:
    """Read and check a heads folder; every problem raises MedusaError naming the folder and what is wrong.
    target: the target checkpoint folder, needed by heads that read through its lm_head (lm_head "target")."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    where = f"Medusa heads folder {folder}"
    if not folder.is_dir():
        raise MedusaError(f"{where} does not exist (train heads with scripts/train_medusa.py)"
                          if not folder.exists() else f"{where} is not a folder")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise MedusaError(f"{where} has no {CONFIG_FILE}")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedusaError(f"{where}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    config = MedusaConfig.from_dict(raw, source=f"{where}: {CONFIG_FILE}")
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise MedusaError(f"{where} has no {WEIGHTS_FILE}")
    try:
        state = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise MedusaError(f"{where}: {WEIGHTS_FILE} cannot be read ({exc})") from None

    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_few(unexpected)}")
        raise MedusaError(
            f"{where}: {WEIGHTS_FILE} does not match {CONFIG_FILE} (num_heads={config.num_heads}, "
            f"num_layers={config.num_layers}): {'; '.join(parts)}"
        )
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise MedusaError(
                f"{where}: tensor {name} has shape {tuple(state[name].shape)}, but {CONFIG_FILE} "
                f"(hidden_size={config.hidden_size}, vocab_size={config.vocab_size}) implies {shape}"
            )
        if not torch.isfinite(state[name]).all():
            raise MedusaError(f"{where}: tensor {name} holds NaN or infinite values")

    heads = MedusaHeads(config)
    heads.load_state_dict(state)
    if config.shares_target_lm_head:
        if target is None:
            raise MedusaError(f"{where}: these heads read through the target's lm_head; give the target "
                              f"checkpoint folder too (the proposer's --target-model)")
        heads.attach_lm_head(target_lm_head(target))
    return heads.to(device=device, dtype=dtype).eval()


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_tree(log_probs: torch.Tensor, budget: int, top_k: int = 4) -> tuple[list[int], list[int]]:
    """Best-first candidate tree of at most `budget` nodes from one request's head log-probs.

    log_probs [H, V]: log-softmax of the heads' logits. A node at depth d (0-based) holds one of head d's
    `top_k` tokens and scores the sum of head log-probs along its path; the heads do not see the path, so
    every depth-d node has the same candidate children (head d+1's top_k). Nodes come out of a max-heap in
    non-increasing score order: a child is only pushed once its parent is out, and never scores higher,
    so any prefix of the answer is ancestor-closed and is the best tree of its size (the one with the
    highest sum of path probabilities, the expected accepted length under independent heads).

    Returns (token_ids, parent_indices), parent -1 for depth-0 nodes (they follow the pending token);
    parents precede children; depth at most H. Ties keep push order (deterministic).
    """
    if budget <= 0 or top_k <= 0:
        return [], []
    num_heads, vocab = log_probs.shape
    k = min(top_k, vocab)
    values, indices = torch.topk(log_probs.float(), k, dim=-1)  # [H, k] each
    values, indices = values.tolist(), indices.tolist()
    # Heap entries: (-score, push order, depth, rank among the head's top_k, parent index).
    heap = [(-values[0][r], r, 0, r, -1) for r in range(k) if math.isfinite(values[0][r])]
    heapq.heapify(heap)
    pushed = len(heap)
    tokens: list[int] = []
    parents: list[int] = []
    while heap and len(tokens) < budget:
        neg_score, _, depth, rank, parent = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(indices[depth][rank])
        parents.append(parent)
        if depth + 1 < num_heads:
            for r in range(k):
                score = -neg_score + values[depth + 1][r]
                if math.isfinite(score):  # a -inf child (zero probability) is never worth a node
                    heapq.heappush(heap, (-score, pushed, depth + 1, r, node))
                    pushed += 1
    return tokens, parents

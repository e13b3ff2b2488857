"""Self-distillation of Medusa heads: the target's own greedy continuations, its hidden states, a fit.

Shared by scripts/train_medusa.py (the embedded heads) and specdec.testing.make_tiny_medusa_heads
(heads for tiny test targets), so that the one training loop is tested by both.

Data: the target continues each prompt greedily through the model runner; at every position t from
the last prompt token on, the runner's final-normed hidden state h_t (the one the target's lm_head
maps to token t+1) is kept. Head i's label at t is the continuation token t + 2 + i, only where that
token lies inside the continuation: hard labels on the target's own greedy choices, which is exactly
what greedy verification accepts (the prompt tokens are corpus text, not the target's choices, and the
pending token t + 1 is always the target's own choice at inference time).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from specdec.model.medusa import MedusaHeads
from specdec.model.runner import ModelRunner, SeqInput

IGNORE = -100  # label of a (position, head) whose token falls past the continuation


@dataclass
class Rollouts:
    """Greedy continuations of S prompts by the target, N tokens each."""

    hidden: torch.Tensor  # [S, N, d] float32: row j is h at the position just before continuation token j
    continuation: torch.Tensor  # [S, N] long: the target's greedy tokens


@torch.inference_mode()
def greedy_rollouts(runner: ModelRunner, prompts: Sequence[Sequence[int]], new_tokens: int,
                    batch_size: int = 32) -> Rollouts:
    """Let the target continue every prompt greedily for `new_tokens` tokens, `batch_size` requests per
    ragged runner batch, keeping the final-normed hidden state that produced each continuation token."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    hidden_rows, token_rows = [], []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        slots = [runner.allocate() for _ in group]
        try:
            outs = runner.forward([SeqInput(s, list(p), last_logits_only=True) for s, p in zip(slots, group)],
                                  return_hidden=True)
            hidden = [[o.hidden[-1]] for o in outs]
            tokens = [[int(o.logits[-1].argmax())] for o in outs]
            for _ in range(new_tokens - 1):
                outs = runner.forward([SeqInput(s, [t[-1]]) for s, t in zip(slots, tokens)], return_hidden=True)
                for h, t, o in zip(hidden, tokens, outs):
                    h.append(o.hidden[-1])
                    t.append(int(o.logits[-1].argmax()))
        finally:
            for s in slots:
                runner.release(s)
        hidden_rows += [torch.stack(h).float().cpu() for h in hidden]
        token_rows += tokens
    return Rollouts(torch.stack(hidden_rows), torch.tensor(token_rows, dtype=torch.long))


def head_examples(rollouts: Rollouts, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs: X [M, d] hidden states, Y [M, H] labels (IGNORE past the continuation).

    Row j of a rollout (h before continuation token j, i.e. lm_head(h) -> token j) gets label
    continuation[j + 1 + i] for head i. The last row has no label for any head and is dropped.
    """
    s, n, d = rollouts.hidden.shape
    labels = torch.full((s, n, num_heads), IGNORE, dtype=torch.long)
    for i in range(num_heads):
        if 1 + i < n:
            labels[:, : n - 1 - i, i] = rollouts.continuation[:, 1 + i :]
    keep = labels[:, :, 0] != IGNORE
    return rollouts.hidden[keep].reshape(-1, d), labels[keep].reshape(-1, num_heads)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine down to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit_heads(heads: MedusaHeads, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float = 1e-3,
              batch_size: int = 256, seed: int = 0, log_every: int = 0,
              log: Callable[[str], None] = print) -> list[float]:
    """Train the heads with cross-entropy of head i on y[:, i] (IGNORE skipped), summed over heads.

    x [M, d], y [M, H]. AdamW, warmup + cosine schedule, random minibatches drawn with `seed`.
    Returns the loss of every step. The heads are left in eval mode.
    """
    if len(x) == 0:
        raise ValueError("no training examples (the continuations are too short for the heads)")
    gen = torch.Generator().manual_seed(seed)
    param = next(heads.parameters())
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    heads.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        rows = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        logits = heads(x[rows].to(param.device, param.dtype))  # [B, H, V]
        labels = y[rows].to(param.device)  # [B, H]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               reduction="sum") / len(rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"heads step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)")
    heads.eval()
    return losses


@torch.inference_mode()
def head_accuracy(heads: MedusaHeads, x: torch.Tensor, y: torch.Tensor, top_k: int = 5,
                  batch_size: int = 1024) -> list[dict]:
    """Per head: {"head", "count", "top1", "topk"} on labelled rows of (x [M, d], y [M, H])."""
    param = next(heads.parameters())
    hits1 = torch.zeros(y.shape[1])
    hitsk = torch.zeros(y.shape[1])
    for start in range(0, len(x), batch_size):
        logits = heads(x[start : start + batch_size].to(param.device, param.dtype)).float().cpu()  # [B, H, V]
        labels = y[start : start + batch_size]  # [B, H]
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices  # [B, H, k]
        valid = labels != IGNORE
        hits1 += ((top[..., 0] == labels) & valid).sum(0)
        hitsk += ((top == labels[..., None]).any(-1) & valid).sum(0)
    counts = (y != IGNORE).sum(0)
    return [
        {"head": i, "count": int(counts[i]), "top1": float(hits1[i] / max(1, counts[i])),
         "topk": float(hitsk[i] / max(1, counts[i]))}
        for i in range(y.shape[1])
    ]

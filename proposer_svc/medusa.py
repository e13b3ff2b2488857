"""Medusa tree-head proposer: candidate trees from heads on the target's last hidden state.

Each step the scheduler sends, per request, the target's final hidden state at the position its pending
token was sampled from (the verifier returns it). Head i guesses the token i + 1 places after the
pending one; `specdec.model.medusa.build_tree` turns the heads' top candidates into a best-first tree (the
first n nodes are the best n-node tree), so the scheduler can cut it to any node budget.

The proposer keeps no model state per request, only which requests it has seen (for Info and
releases): everything it needs arrives with the item. An item whose hidden state is missing or of the
wrong size gets no candidates (a warning for the wrong size), never a failed stream.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from proposer_svc.base import Proposal, ProposalRequest, Proposer
from specdec.model.medusa import MedusaHeads, build_tree, load_medusa_heads

log = logging.getLogger(__name__)


# Most multiply-adds per request of the heads' vocabulary projections for them to be offered free, i.e. for
# every request before every plan: about a millisecond of one CPU core. Heads over a small vocabulary
# (the code model's 4096 tokens: 3M) are; heads reading through SmolLM2's lm_head (3 x 49152 x 576: 85M,
# about half the target's own forward) are not, and are asked for only when the policy's plan pays for them.
FREE_PROJECTION_MACS = 16_000_000


class MedusaProposer(Proposer):
    kind = "medusa"
    tree = True

    def __init__(self, heads: MedusaHeads, *, max_budget: int = 8, top_k: int = 4, name: str = "",
                 free: bool | None = None) -> None:
        """free: offer trees before the plan (None: when the heads' projections are small, see above)."""
        super().__init__(max_budget=max_budget, vocab_size=heads.config.vocab_size)
        c = heads.config
        self.free = c.num_heads * c.vocab_size * c.hidden_size <= FREE_PROJECTION_MACS if free is None else free
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.heads = heads.eval()
        self.hidden_size = heads.config.hidden_size
        self.top_k = top_k
        self.name = name
        self._seen: dict[str, int] = {}  # request id -> committed tokens seen

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str | None = None, dtype: str = "auto",
                    max_budget: int = 8, top_k: int = 4, target: str | Path | None = None,
                    free: bool | None = None) -> "MedusaProposer":
        """Load heads saved by scripts/train_medusa.py; raises MedusaError (a ValueError) naming the problem."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 matmuls are slow on CPUs: compute in float32 there unless asked otherwise.
        torch_dtype = {"auto": torch.float32 if device == "cpu" else torch.bfloat16, "float32": torch.float32,
                       "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        heads = load_medusa_heads(folder, device=device, dtype=torch_dtype, target=target)
        return cls(heads, max_budget=max_budget, top_k=top_k, name=str(folder), free=free)

    def describe(self) -> str:
        c = self.heads.config
        return (f"{super().describe()} heads={self.name} num_heads={c.num_heads} hidden_size={c.hidden_size} "
                f"top_k={self.top_k} free={self.free}")

    def active_request_ids(self) -> list[str]:
        return list(self._seen)

    def _drop(self, request_id: str) -> None:
        self._seen.pop(request_id, None)

    def _problem(self, item: ProposalRequest, counts):
        problem, keep = super()._problem(item, counts)
        if problem is None and item.budget > 0 and item.hidden_state and len(item.hidden_state) != 4 * self.hidden_size:
            return (f"hidden state of {len(item.hidden_state)} bytes; the heads take {self.hidden_size} float32 "
                    f"values ({4 * self.hidden_size} bytes)"), True
        return problem, keep

    def _propose(self, items: list[ProposalRequest]) -> list[list[int] | Proposal]:
        for item in items:
            seen = 0 if item.reset else self._seen.get(item.request_id, 0)
            self._seen[item.request_id] = seen + len(item.new_token_ids)
        wanted = [i for i, item in enumerate(items) if item.budget > 0 and item.hidden_state]
        out: list[list[int] | Proposal] = [[] for _ in items]
        if not wanted:
            return out
        param = next(self.heads.parameters())
        hidden = np.stack([np.frombuffer(items[i].hidden_state, dtype="<f4") for i in wanted])
        started = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(hidden).to(device=param.device, dtype=param.dtype)  # [B, d]
            log_probs = torch.log_softmax(self.heads(x).float(), dim=-1).cpu()  # [B, H, V]
        self.forward_ms = (time.perf_counter() - started) * 1e3
        for row, i in enumerate(wanted):
            tokens, parents = build_tree(log_probs[row], items[i].budget, self.top_k)
            out[i] = Proposal(items[i].request_id, tokens, parents)
        return out

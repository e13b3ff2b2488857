"""The model runner: one KV-cache slot per request, ragged batches of chains and trees.

Shared by the verifier (target model) and the draft proposer. A request owns a slot whose cache is
written in place; its committed length is the number of cached tokens. One `forward` call takes, per
request, any number of new tokens: a prompt chunk, one decode token, a chain of k+1 speculative
tokens, or a tree given as tokens + parent indices. It returns logits for every new position.

After a forward the slot holds context + all new tokens. `accept(slot, kept)` then keeps only the
accepted root path: for a chain that is a length reset; for a tree the path's K/V is moved into
place (at most depth entries, never the context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from specdec.model import numpy_forward
from specdec.model.llama import LlamaWeights, Segment, forward_packed, load_llama


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str) -> None:
    """Raise ValueError (one line) unless `name` is auto, cpu, cuda or cuda:N, and present on this machine."""
    if name in ("auto", "cpu"):
        return
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on every device. bf16's rounding depends on how many tokens one forward holds, so a verified
    chain can pick another greedy token than one-at-a-time decoding: measured on an H200 and on CPU
    (docs/chain_invariance*.md in git history), 5-6 of 1280 tokens flip in bf16, none in float32. Serving must equal the target alone, so bf16 is opt-in (`--dtype bfloat16`)."""
    del device  # every device gets the same answer
    return torch.float32


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


@dataclass
class SeqInput:
    """New tokens for one request in a batch.

    parents: None for a chain (each token follows the previous). For a tree, parents[j] is the
    index of node j's parent among these new tokens, or -1 when node j directly follows the
    slot's cached context. Parents come before children (parents[j] < j).
    """

    slot: int
    tokens: Sequence[int]
    parents: Sequence[int] | None = None
    last_logits_only: bool = False  # prompt chunks only need the next-token logits


@dataclass
class SeqOutput:
    logits: torch.Tensor  # [n, V] (or [1, V] with last_logits_only)
    hidden: torch.Tensor | None  # [n, d] final-normed hidden states, when asked for


@dataclass
class _SlotState:
    length: int = 0  # cached tokens
    base: int = 0  # length before the last forward
    parents: list[int] | None = field(default=None)  # tree of the last forward (None = chain)
    new: int = 0  # tokens the last forward added


class BatchError(ValueError):
    """A batch that cannot run (bad slot, token, parent index, or capacity); nothing was changed."""


class ModelRunner:
    def __init__(
        self,
        checkpoint: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_slots: int = 32,
        max_seq_len: int | None = None,
        prepack: bool | None = None,
        numpy_chains: bool = False,
    ) -> None:
        """prepack: oneDNN-packed projection weights (specdec/model/linear.py); None = where device and dtype allow.
        numpy_chains: `next_tokens` runs in NumPy where it can (specdec/model/numpy_forward.py): for the embedded draft
        0.27x the torch forward's time at batch 1, 0.42-0.67x at 4-16 (docs/draft_forward.md in git history); its logits differ
        from `forward`'s by rounding, so only a proposer asks."""
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype, self.device)
        self.weights: LlamaWeights = load_llama(checkpoint, self.device, self.dtype, prepack)
        cfg = self.weights.config
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_slots = max_slots
        shape = (max_slots, self.weights.num_kv_heads, self.max_seq_len, self.weights.head_dim)
        self.cache_k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.weights.layers]
        self.cache_v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.weights.layers]
        self._slots: dict[int, _SlotState] = {}
        self._free = list(range(max_slots - 1, -1, -1))
        windows = {layer.sliding_window for layer in self.weights.layers} - {None}
        if len(windows) > 1:
            raise ValueError(f"layers use several sliding windows {sorted(windows)}; one is supported")
        self._window = windows.pop() if windows else None
        self._numpy = (numpy_forward.NumpyForward(self.weights, self.cache_k, self.cache_v)
                       if numpy_chains and numpy_forward.supports(self.weights, self.device, self.dtype) else None)

    @property
    def runs_numpy(self) -> bool:
        """Whether `next_tokens` takes the NumPy path."""
        return self._numpy is not None

    # -- slots ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.weights.vocab_size

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise BatchError(f"all {self.max_slots} KV-cache slots are in use")
        slot = self._free.pop()
        self._slots[slot] = _SlotState()
        return slot

    def release(self, slot: int) -> None:
        if self._slots.pop(slot, None) is not None:
            self._free.append(slot)

    def length(self, slot: int) -> int:
        return self._state(slot).length

    @property
    def cached_tokens(self) -> int:
        """Tokens held in the KV cache, all slots together (read by the metrics thread: a snapshot)."""
        return sum(state.length for state in list(self._slots.values()))

    def truncate(self, slot: int, length: int) -> None:
        """Roll the slot back to its first `length` cached tokens."""
        state = self._state(slot)
        if not 0 <= length <= state.length:
            raise BatchError(f"slot {slot}: cannot truncate to {length}, it holds {state.length} tokens")
        state.length = length
        state.new = 0

    def _state(self, slot: int) -> _SlotState:
        state = self._slots.get(slot)
        if state is None:
            raise BatchError(f"slot {slot} is not allocated")
        return state

    # -- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: Sequence[SeqInput], return_hidden: bool = False) -> list[SeqOutput]:
        """Run one ragged batch; every request's new tokens are appended to its slot."""
        self._validate(batch)
        device = self.device
        tokens, positions, slot_index, store_index, segments, logit_rows = [], [], [], [], [], []
        start = 0
        for seq in batch:
            state = self._slots[seq.slot]
            n, base = len(seq.tokens), state.length
            depth = _tree_depths(seq.parents) if seq.parents is not None else list(range(n))
            tokens.extend(seq.tokens)
            positions.extend(base + d for d in depth)
            slot_index.extend([seq.slot] * n)
            store_index.extend(range(base, base + n))
            segments.append(self._segment(start, n, seq.slot, base, seq.parents, depth))
            logit_rows.extend([start + n - 1] if seq.last_logits_only else range(start, start + n))
            start += n

        as_long = dict(dtype=torch.long, device=device)
        hidden = forward_packed(
            self.weights,
            torch.tensor(tokens, **as_long),
            torch.tensor(positions, **as_long),
            self.cache_k,
            self.cache_v,
            torch.tensor(slot_index, **as_long),
            torch.tensor(store_index, **as_long),
            segments,
        )
        rows = hidden if len(logit_rows) == start else hidden[torch.tensor(logit_rows, **as_long)]
        logits = self.weights.lm_head(rows)

        outputs, row, start = [], 0, 0
        for seq in batch:
            n = len(seq.tokens)
            m = 1 if seq.last_logits_only else n
            outputs.append(SeqOutput(logits[row : row + m], hidden[start : start + n] if return_hidden else None))
            row += m
            start += n
        self._appended(batch)
        return outputs

    def last_logits(self, batch: Sequence[SeqInput]) -> torch.Tensor:
        """[B, V]: each request's logits after its new tokens, which are appended to its slot as `forward`
        appends them. Chains run in NumPy when the runner was built with numpy_chains and can; trees in torch."""
        if self._numpy is None or any(seq.parents is not None for seq in batch):
            outputs = self.forward([SeqInput(s.slot, s.tokens, s.parents, last_logits_only=True) for s in batch])
            return torch.stack([o.logits[-1] for o in outputs])
        self._validate(batch)
        logits = self._numpy.last_logits([(seq.slot, self._slots[seq.slot].length, [int(t) for t in seq.tokens])
                                          for seq in batch])
        self._appended(batch)
        return torch.from_numpy(logits)

    def next_tokens(self, batch: Sequence[SeqInput]) -> list[int]:
        """Each request's greedy next token after its new tokens (see last_logits)."""
        return self.last_logits(batch).argmax(dim=-1).tolist()  # a list: waits for the device

    def _appended(self, batch: Sequence[SeqInput]) -> None:
        """Book a forward's new tokens into the slots' states."""
        for seq in batch:
            state = self._slots[seq.slot]
            n = len(seq.tokens)
            state.base, state.new, state.length = state.length, n, state.length + n
            state.parents = list(seq.parents) if seq.parents is not None else None

    def _segment(self, start: int, n: int, slot: int, base: int, parents, depth: list[int]) -> Segment:
        chain = parents is None
        # A single token or a prefill from an empty slot needs no explicit mask.
        plain = chain and (n == 1 or base == 0)
        full = None
        if not plain or self._window is not None:
            full = torch.ones(n, base + n, dtype=torch.bool)
            full[:, base:] = torch.ones(n, n, dtype=torch.bool).tril() if chain else _ancestor_mask(parents, n)
        window_mask = None
        if self._window is not None:
            q_pos = torch.tensor([base + d for d in depth])
            k_pos = torch.cat([torch.arange(base), q_pos])
            window_mask = (full & ((q_pos[:, None] - k_pos[None, :]) < self._window)).to(self.device)
        mask = None if plain else full.to(self.device)
        return Segment(start, n, slot, base + n, mask, chain and base == 0, window_mask)

    def _validate(self, batch: Sequence[SeqInput]) -> None:
        if not batch:
            raise BatchError("empty batch")
        seen = set()
        vocab = self.vocab_size
        for seq in batch:
            state = self._state(seq.slot)
            if seq.slot in seen:
                raise BatchError(f"slot {seq.slot} appears twice in one batch")
            seen.add(seq.slot)
            n = len(seq.tokens)
            if n == 0:
                raise BatchError(f"slot {seq.slot}: no new tokens")
            bad = [t for t in seq.tokens if not 0 <= int(t) < vocab]
            if bad:
                raise BatchError(f"slot {seq.slot}: token id {bad[0]} outside the vocabulary [0, {vocab})")
            if state.length + n > self.max_seq_len:
                raise BatchError(
                    f"slot {seq.slot}: {state.length} cached + {n} new tokens exceed the context of "
                    f"{self.max_seq_len}"
                )
            if seq.parents is not None:
                if len(seq.parents) != n:
                    raise BatchError(f"slot {seq.slot}: {len(seq.parents)} parent indices for {n} tokens")
                for j, p in enumerate(seq.parents):
                    if not -1 <= p < j:
                        raise BatchError(
                            f"slot {seq.slot}: parent index {p} of node {j} out of range (must be -1..{j - 1})"
                        )

    def warm_up(self, max_tokens: int) -> int:
        """One throwaway forward per token count 1..max_tokens on a scratch slot, so that the kernels a
        batch of that many tokens needs exist before the first request: oneDNN compiles one per token
        count (specdec/model/linear.py), 1-3 ms each on two CPU cores, which the first steps would otherwise
        pay and a scheduler's start-up cost profile would measure. Nothing stays cached; returns the
        forwards run (0 when no slot is free)."""
        count = min(max_tokens, self.max_seq_len)
        if count < 1 or self.free_slots == 0:
            return 0
        slot = self.allocate()
        try:
            for n in range(1, count + 1):
                self.truncate(slot, 0)
                self.forward([SeqInput(slot, [0] * n)])  # every position's logits, as a verify has
        finally:
            self.release(slot)
        return count

    # -- accept / rollback ---------------------------------------------------------------------

    def accept(self, slot: int, kept: Sequence[int]) -> None:
        """Keep the root path `kept` (indices into the last forward's new tokens) and drop the rest."""
        state = self._state(slot)
        kept = [int(i) for i in kept]
        if len(kept) > state.new:
            raise BatchError(f"slot {slot}: {len(kept)} kept of {state.new} new tokens")
        parents = state.parents if state.parents is not None else list(range(-1, state.new - 1))
        expected_parent = -1
        for i in kept:
            if not 0 <= i < state.new or parents[i] != expected_parent:
                raise BatchError(f"slot {slot}: kept indices {kept} are not a root path of the last forward")
            expected_parent = i
        moved = [(m, i) for m, i in enumerate(kept) if i != m]
        if moved:
            dst = torch.tensor([state.base + m for m, _ in moved], device=self.device)
            src = torch.tensor([state.base + i for _, i in moved], device=self.device)
            for ck, cv in zip(self.cache_k, self.cache_v):
                ck[slot, :, dst] = ck[slot, :, src]
                cv[slot, :, dst] = cv[slot, :, src]
        state.length = state.base + len(kept)
        state.new = 0


def _tree_depths(parents: Sequence[int]) -> list[int]:
    depth: list[int] = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def _ancestor_mask(parents: Sequence[int], n: int) -> torch.Tensor:
    """[n, n] bool: node i attends to node j when j is i or one of its ancestors."""
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask

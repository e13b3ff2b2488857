"""The verifier's logic, without gRPC: request state over the model runner, Prefill / Verify / Release.

Cache invariant (proto/specdec/v1/verifier.proto): after Prefill of tokens T the runner slot caches T
and the sampled next token t0 is *pending* (not cached). A Verify step feeds [pending] + candidates as
one tree whose root is the pending token, keeps root + accepted path, and the bonus becomes the new
pending token. `position` is the pending token's index in the request's sequence, which is also the
number of cached tokens.

Every call validates its whole batch before touching any state: a bad item raises a ValueError
subclass (InvalidRequest) and nothing changes, for any request.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from specdec.model.runner import ModelRunner, SeqInput
from specdec.model.sampling import MAX_TOP_LOGPROBS, SamplingParams, raw_logprobs
from specdec.model.verification import Verdict, is_chain, verify_step
from specdec.contracts import (
    PrefillItem,
    PrefillResult,
    Timing,
    TokenLogprobs,
    VerifierInfo,
    VerifyItem,
    VerifyResult,
)

_MAX_SEED = (1 << 64) - 1


class InvalidRequest(ValueError):
    """Bad input from the caller; the message says what to fix. Nothing was changed."""


class UnknownRequest(InvalidRequest):
    """A request id the verifier holds no state for (never prefilled, released, or lost in a restart): the
    caller rebuilds it with a Prefill."""


class CapacityError(RuntimeError):
    """Not enough KV-cache slots for the requests; nothing was changed. Retry after releasing some."""


@dataclass
class PrefillOutput:
    results: list[PrefillResult]
    timing: Timing


@dataclass
class VerifyOutput:
    results: list[VerifyResult]
    timing: Timing


@dataclass
class _Request:
    slot: int
    pending: int  # sampled, not yet cached
    sampling: SamplingParams
    seed: int
    position: int  # index of the pending token in the request's sequence == cached tokens
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives per emitted token


@dataclass
class _Planned:
    """One validated Verify item, ready to run."""

    request_id: str
    request: _Request
    tokens: list[int]
    parents: list[int]
    draft: torch.Tensor | None  # [m, V] float64


class VerifierCore:
    """Request state over a ModelRunner. Not thread-safe: the server serialises calls."""

    def __init__(self, runner: ModelRunner, *, model: str, max_batch_size: int,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self.runner = runner
        self.model = model
        self.max_batch_size = max_batch_size
        self.eos_token_ids = list(eos_token_ids)
        self._requests: dict[str, _Request] = {}

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_slots: int = 32,
        max_seq_len: int | None = None,
        max_batch_size: int = 32,
    ) -> "VerifierCore":
        """Load the target model from a local checkpoint folder ("auto" device/dtype = runner defaults)."""
        runner = ModelRunner(
            checkpoint,
            device=None if device in (None, "auto") else device,
            dtype=dtype,
            max_slots=max_slots,
            max_seq_len=max_seq_len,
        )
        folder = Path(checkpoint).expanduser().resolve()
        return cls(runner, model=str(folder), max_batch_size=max_batch_size,
                   eos_token_ids=checkpoint_eos_token_ids(folder, runner.weights.config))

    # -- Prefill -------------------------------------------------------------------------------

    def prefill(self, items: Sequence[PrefillItem], return_hidden: bool = False) -> PrefillOutput:
        """Cache each request's tokens and sample its first token (the pending one), in one forward.

        return_hidden: also give each request's final hidden state at its last token (tree-head proposers).
        """
        started = time.perf_counter()
        self._validate_prefill(items)
        if not items:
            return PrefillOutput([], Timing(total_ms=_ms_since(started)))
        if len(items) > self.runner.free_slots:
            raise CapacityError(
                f"{len(items)} requests to admit but only {self.runner.free_slots} of "
                f"{self.runner.max_slots} KV-cache slots are free; release finished requests first"
            )
        slots = [self.runner.allocate() for _ in items]
        try:
            batch = [SeqInput(slot, list(item.token_ids), last_logits_only=True) for slot, item in zip(slots, items)]
            outputs, forward_ms = self._timed_forward(batch, return_hidden=return_hidden)
            results = []
            for slot, item, out in zip(slots, items, outputs):
                seed = item.seed if item.seed is not None else random.getrandbits(64)
                position = len(item.token_ids)
                # A plain decode is a verification step without candidates: one code path for sampling.
                first = verify_step(out.logits, [], [], item.sampling, seed, position).bonus_token
                top = item.top_logprobs if item.logprobs else None
                self._requests[item.request_id] = _Request(slot, first, item.sampling, seed, position, top)
                hidden = _hidden_bytes(out.hidden[-1]) if return_hidden else b""
                logprobs = _logprobs(out.logits[-1:], [first], top)
                results.append(PrefillResult(item.request_id, first, hidden, logprobs[0] if logprobs else None))
        except BaseException:
            for item in items:
                self._requests.pop(item.request_id, None)
            for slot in slots:
                self.runner.release(slot)
            raise
        timing = Timing(forward_ms, _ms_since(started), sum(len(i.token_ids) for i in items), 0, len(items))
        return PrefillOutput(results, timing)

    def _validate_prefill(self, items: Sequence[PrefillItem]) -> None:
        seen: set[str] = set()
        vocab, limit = self.runner.vocab_size, self.runner.max_seq_len - 1
        for item in items:
            rid = item.request_id
            if not rid:
                raise InvalidRequest("request_id must not be empty")
            if rid in seen:
                raise InvalidRequest(f"request {rid!r} appears twice in one Prefill")
            seen.add(rid)
            if rid in self._requests:
                raise InvalidRequest(f"request {rid!r} is already admitted; Release it before prefilling it again")
            n = len(item.token_ids)
            if n == 0:
                raise InvalidRequest(f"request {rid!r}: token_ids is empty; a prompt needs at least one token")
            if n > limit:
                raise InvalidRequest(
                    f"request {rid!r}: {n} tokens do not fit the context of {self.runner.max_seq_len} "
                    f"(at most {limit}, leaving room for the next token)"
                )
            bad = next((t for t in item.token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"request {rid!r}: token id {bad} is outside the vocabulary [0, {vocab})")
            try:
                item.sampling.validate()
            except ValueError as exc:
                raise InvalidRequest(f"request {rid!r}: {exc}") from None
            if item.seed is not None and not 0 <= item.seed <= _MAX_SEED:
                raise InvalidRequest(f"request {rid!r}: seed {item.seed} is not a 64-bit unsigned integer")
            if not 0 <= item.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequest(f"request {rid!r}: top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, "
                                     f"got {item.top_logprobs}")

    # -- Verify --------------------------------------------------------------------------------

    def verify(self, items: Sequence[VerifyItem], return_hidden: bool = False) -> VerifyOutput:
        """One engine step for a ragged batch: a single forward, then each request's verification rule."""
        started = time.perf_counter()
        plans = self._plan_verify(items)
        if not plans:
            return VerifyOutput([], Timing(total_ms=_ms_since(started)))
        runner = self.runner
        context = sum(runner.length(p.request.slot) for p in plans)
        batch = [
            SeqInput(
                p.request.slot,
                [p.request.pending, *p.tokens],
                # Chains take the runner's cheaper causal path; trees shift parents under the root.
                None if is_chain(p.parents) else [-1] + [q + 1 if q >= 0 else 0 for q in p.parents],
            )
            for p in plans
        ]
        outputs, forward_ms = self._timed_forward(batch, return_hidden)
        try:
            verdicts = [self._judge(p, out.logits) for p, out in zip(plans, outputs)]
            # The rows each emitted token was chosen from: the root's, then each accepted node's.
            kept_rows = [[0] + [j + 1 for j in v.accepted_indices] for v in verdicts]
            logprobs = [_logprobs(out.logits[rows], v.emitted, p.request.top_logprobs)
                        for p, out, v, rows in zip(plans, outputs, verdicts, kept_rows)]
        except BaseException:
            for p in plans:  # drop the forward's tokens: the batch leaves no trace
                runner.truncate(p.request.slot, p.request.position)
            raise
        results = []
        for p, out, verdict, kept, emitted_logprobs in zip(plans, outputs, verdicts, kept_rows, logprobs):
            request = p.request
            runner.accept(request.slot, kept)
            hidden = b""
            if return_hidden:
                hidden = _hidden_bytes(out.hidden[kept[-1]])
            request.position += len(kept)
            request.pending = verdict.bonus_token
            results.append(VerifyResult(
                p.request_id, tuple(verdict.accepted_tokens), verdict.bonus_token, tuple(verdict.accepted_indices),
                hidden, tuple(emitted_logprobs),
            ))
        timing = Timing(forward_ms, _ms_since(started), sum(len(s.tokens) for s in batch), context, len(plans))
        return VerifyOutput(results, timing)

    def _judge(self, plan: _Planned, logits: torch.Tensor) -> Verdict:
        request = plan.request
        return verify_step(
            logits, plan.tokens, plan.parents, request.sampling, request.seed, request.position + 1, plan.draft
        )

    def _plan_verify(self, items: Sequence[VerifyItem]) -> list[_Planned]:
        if len(items) > self.max_batch_size:
            raise InvalidRequest(f"{len(items)} requests in one Verify; at most {self.max_batch_size} (max_batch_size)")
        seen: set[str] = set()
        return [self._plan_item(item, seen) for item in items]

    def _plan_item(self, item: VerifyItem, seen: set[str]) -> _Planned:
        rid = item.request_id
        request = self._requests.get(rid)
        if request is None:
            raise UnknownRequest(f"unknown request id {rid!r}: Prefill it first (or it was released)")
        if rid in seen:
            raise InvalidRequest(f"request {rid!r} appears twice in one Verify")
        seen.add(rid)
        cand = item.candidates
        tokens = [int(t) for t in cand.tokens] if cand is not None else []
        parents = [int(p) for p in cand.parents] if cand is not None else []
        m, vocab = len(tokens), self.runner.vocab_size
        if len(parents) != m:
            raise InvalidRequest(f"request {rid!r}: {len(parents)} parent indices for {m} candidate tokens")
        for j, (tok, parent) in enumerate(zip(tokens, parents)):
            if not -1 <= parent < j:
                raise InvalidRequest(
                    f"request {rid!r}: parent index {parent} of candidate {j} is out of range (must be -1..{j - 1}: "
                    f"-1 for the pending token, else an earlier candidate)"
                )
            if not 0 <= tok < vocab:
                raise InvalidRequest(
                    f"request {rid!r}: candidate {j} token id {tok} is outside the vocabulary [0, {vocab})"
                )
        room = self.runner.max_seq_len - request.position - 1
        if m > room:
            raise InvalidRequest(
                f"request {rid!r}: {m} candidates do not fit the context of {self.runner.max_seq_len} "
                f"({request.position} cached tokens + the pending token leave room for {max(room, 0)})"
                + ("; the request has reached the context limit, Release it" if room < 0 else "")
            )
        draft = self._draft_tensor(rid, cand.distributions if cand is not None else None, parents, m)
        return _Planned(rid, request, tokens, parents, draft)

    def _draft_tensor(self, rid: str, rows, parents: list[int], m: int) -> torch.Tensor | None:
        """Validated draft distributions as [m, V] float64, or None when there are none."""
        if rows is None or len(rows) == 0:
            return None
        if len(rows) != m:
            raise InvalidRequest(f"request {rid!r}: {len(rows)} draft distributions for {m} candidate tokens")
        if not is_chain(parents):
            raise InvalidRequest(
                f"request {rid!r}: draft distributions are supported for chains only (parents -1, 0, 1, ...), "
                f"not trees; send trees without distributions"
            )
        vocab = self.runner.vocab_size
        draft = torch.zeros(m, vocab, dtype=torch.float64)
        for j, row in enumerate(rows):
            values = torch.as_tensor(np.asarray(row, dtype=np.float64)).flatten()
            if not 0 < values.numel() <= vocab:
                raise InvalidRequest(
                    f"request {rid!r}: draft distribution {j} has {values.numel()} entries, expected 1..{vocab}"
                )
            if not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
                raise InvalidRequest(
                    f"request {rid!r}: draft distribution {j} must be finite, non-negative and not all zero"
                )
            draft[j, : values.numel()] = values
        return draft

    # -- Release / Info ------------------------------------------------------------------------

    def release(self, request_ids: Sequence[str]) -> int:
        """Free the requests' slots; unknown ids are ignored. Returns how many held state."""
        released = 0
        for rid in request_ids:
            request = self._requests.pop(rid, None)
            if request is not None:
                self.runner.release(request.slot)
                released += 1
        return released

    def info(self) -> VerifierInfo:
        runner = self.runner
        return VerifierInfo(
            model=self.model,
            device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."),
            vocab_size=runner.vocab_size,
            max_seq_len=runner.max_seq_len,
            max_slots=runner.max_slots,
            free_slots=runner.free_slots,
            max_batch_size=self.max_batch_size,
            active_request_ids=tuple(self._requests),
            hidden_size=runner.weights.hidden_size,
            eos_token_ids=tuple(self.eos_token_ids),
        )

    # -- helpers -------------------------------------------------------------------------------

    def _timed_forward(self, batch: list[SeqInput], return_hidden: bool):
        cuda = self.runner.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.runner.device)
        started = time.perf_counter()
        outputs = self.runner.forward(batch, return_hidden=return_hidden)
        if cuda:
            torch.cuda.synchronize(self.runner.device)
        return outputs, _ms_since(started)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def checkpoint_eos_token_ids(folder: Path, config) -> list[int]:
    """Every end-of-sequence / end-of-turn id the folder declares, first seen first: the tokenizer's eos token
    (tokenizer_config.json), then config.json's eos_token_id, then generation_config.json's (each an id or a
    list of ids; chat models list their end-of-turn token there)."""
    ids: list[int] = []

    def add(value) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v not in ids:
                ids.append(v)

    try:
        eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            add(Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(eos))
    except Exception:  # a missing or unreadable tokenizer only loses this source of the ids
        pass
    add(getattr(config, "eos_token_id", None))
    try:
        add(json.loads((folder / "generation_config.json").read_text()).get("eos_token_id"))
    except (OSError, ValueError, AttributeError):  # none, or not a JSON object: no ids from it
        pass
    return ids


def _logprobs(logits: torch.Tensor, token_ids: list[int], top: int | None) -> list[TokenLogprobs]:
    """TokenLogprobs of the emitted `token_ids`, each chosen from its row of logits [n, V]; [] when top is None
    (the request did not ask: nothing is computed)."""
    if top is None:
        return []
    chosen, top_ids, top_values = raw_logprobs(logits, token_ids, top)
    return [TokenLogprobs(t, lp, tuple(zip(ids, values))) for t, lp, ids, values in zip(token_ids, chosen, top_ids, top_values)]


def _hidden_bytes(row: torch.Tensor) -> bytes:
    """One hidden state [d] as the wire format: float32 little-endian."""
    return row.to("cpu", torch.float32).numpy().astype("<f4").tobytes()

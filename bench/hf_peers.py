"""Hugging Face transformers peers of the serving benchmark: the same target and draft, served the usual way.

Three peers, each `model.generate` on one request at a time, greedy, exactly `max_new_tokens` new tokens
with EOS ignored (the target's and the draft's `generation_config.eos_token_id` are cleared, so generation
neither stops at EOS nor avoids it: the stack's `ignore_eos`):

- `hf-generate`: plain greedy decoding, one target forward per token.
- `hf-assisted`: assisted generation (`assistant_model=draft`) with transformers' defaults for the
  assistant (up to 20 drafted tokens per step, cut where the draft's confidence drops below 0.4).
- `hf-prompt-lookup`: prompt lookup decoding (`prompt_lookup_num_tokens`, default `DEFAULT_LOOKUP_TOKENS`
  = 8, the most tokens the stack's goodput policies speculate per step (the scheduler's default --max-k):
  the peer may look as far ahead as the stack, so the comparison is of serving and choice of k, not of a
  longer lookahead; transformers' documentation example uses 10).

Timing: requests are served first come, first served by a single server, as `generate` is used in
practice. Each request's service time (and the time of its first new token, from a streamer) is
measured on the wall clock while nothing else runs; the queueing is then laid on the arrival trace
exactly as a FIFO single server sees it: request i starts at max(arrival_i, done_{i-1}), so its latency
counts from its arrival and includes the wait behind earlier requests (`fifo_schedule`). Idle gaps of the
trace are not slept through, which changes nothing for a single server and saves the light-load wall time.
(On CUDA, transformers 5 hands tokens to the streamer one decoding step late, so TTFT reads one step high.)

Acceptance (assisted and prompt lookup): transformers reports no counts, so `serve_one` wraps the
candidate generator `generate` builds (a private hook, `_get_candidate_generator`) and counts proposed
candidate tokens, accepted ones and target forward passes (steps); where the hook is missing the counts
are None and the benchmark reports null.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEERS = ("hf-generate", "hf-assisted", "hf-prompt-lookup")
DEFAULT_LOOKUP_TOKENS = 8


@dataclass
class PeerModels:
    """The loaded target (and draft, for hf-assisted) with the target's tokenizer, on one device."""

    target: Any  # a transformers causal LM
    tokenizer: Any
    draft: Any = None  # None: hf-assisted is not available
    device: str = "cpu"

    def encode(self, text: str) -> list[int]:
        """Prompt token ids, as the scheduler encodes them (`tokenizer.encode(text)`)."""
        return list(self.tokenizer.encode(text))


def load_peer_models(target: str | Path, draft: str | Path | None = None, device: str | None = None,
                     dtype: str | None = None) -> PeerModels:
    """Load the target (and draft) from local checkpoint folders, with the device and dtype the verifier
    picks by default (cuda when there is one, else cpu; float32), EOS stopping turned off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from specdec.model.runner import default_device, parse_dtype

    the_device = torch.device(device) if device else default_device()
    the_dtype = parse_dtype(dtype, the_device)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the benchmark has its own progress line on stderr
    try:
        models = []
        for path in (target, draft):
            if path is None:
                models.append(None)
                continue
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=the_dtype, local_files_only=True)
            model = model.to(the_device).eval()
            # None here is not overridden inside generate (None values are filled from this config), so
            # generation runs to max_new_tokens through EOS like the stack's ignore_eos requests.
            model.generation_config.eos_token_id = None
            models.append(model)
        tokenizer = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return PeerModels(models[0], tokenizer, models[1], str(the_device))


@dataclass
class ServedRequest:
    """One request served alone: its output and timings (seconds from the start of its service)."""

    token_ids: list[int]  # new tokens only
    service_s: float  # generate() from call to return
    first_token_s: float  # when the streamer received the first new token
    proposed: int | None = None  # candidate tokens verified (None: not counted)
    accepted: int | None = None
    steps: int | None = None  # target forward passes


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (generate first puts the
    prompt, then new tokens)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class _CountingCandidates:
    """Wraps a transformers candidate generator to count what it proposes and what the target accepts."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.proposed = self.accepted = self.steps = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def get_candidates(self, input_ids, *args, **kwargs):
        candidate_ids, candidate_logits = self.inner.get_candidates(input_ids, *args, **kwargs)
        self.steps += 1  # one target forward verifies each set of candidates
        self.proposed += candidate_ids.shape[1] - input_ids.shape[1]
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        # num_matches is after transformers' own cut at max_length, so accepted never exceeds what was kept.
        self.accepted += int(num_matches)
        return self.inner.update_candidate_strategy(input_ids, scores, num_matches)


def peer_kwargs(peer: str, models: PeerModels, lookup_tokens: int = DEFAULT_LOOKUP_TOKENS) -> dict:
    """The generate() arguments that make `peer` what it is."""
    if peer == "hf-generate":
        return {}
    if peer == "hf-assisted":
        if models.draft is None:
            raise ValueError("hf-assisted needs a draft model")
        return {"assistant_model": models.draft}
    if peer == "hf-prompt-lookup":
        if lookup_tokens < 1:
            raise ValueError(f"prompt lookup needs >= 1 token, got {lookup_tokens}")
        return {"prompt_lookup_num_tokens": lookup_tokens}
    raise ValueError(f"unknown peer {peer!r} (choose from {', '.join(PEERS)})")


def serve_one(models: PeerModels, peer: str, prompt_ids: list[int], max_new_tokens: int,
              lookup_tokens: int = DEFAULT_LOOKUP_TOKENS) -> ServedRequest:
    """Run one greedy request through `peer` and time it."""
    import torch
    from transformers.utils import logging as hf_logging

    kwargs = peer_kwargs(peer, models, lookup_tokens)
    model = models.target
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)  # [1, prompt]
    clock = _FirstTokenClock()
    counters: list[_CountingCandidates] = []
    hooked = peer != "hf-generate" and hasattr(model, "_get_candidate_generator")
    if hooked:
        make_candidates = model._get_candidate_generator  # the bound method

        def counting_candidates(*args, **kw):
            counters.append(_CountingCandidates(make_candidates(*args, **kw)))
            return counters[-1]

        model._get_candidate_generator = counting_candidates  # shadows the method on this instance only
    verbosity = hf_logging.get_verbosity()
    # Quiet: transformers warns about its own internal calls of assisted generation, over the progress line.
    hf_logging.set_verbosity_error()
    try:
        began = time.perf_counter()
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=False, streamer=clock, **kwargs)
        token_ids = output[0, input_ids.shape[1]:].tolist()  # .tolist() waits for the device
        ended = time.perf_counter()
    finally:
        hf_logging.set_verbosity(verbosity)
        if hooked:
            del model._get_candidate_generator
    first = (clock.first_token_at or ended) - began
    served = ServedRequest(token_ids, ended - began, first)
    if peer == "hf-generate":
        served.proposed, served.accepted, served.steps = 0, 0, len(token_ids)
    elif counters:
        c = counters[-1]
        served.proposed, served.accepted, served.steps = c.proposed, c.accepted, c.steps
    return served


def fifo_schedule(arrivals_s: list[float], service_s: list[float]) -> list[tuple[float, float]]:
    """(start, done) of each request of a single first-come-first-served server: a request starts at its
    arrival or when the previous one is done, whichever is later. Arrivals must be in order."""
    if len(arrivals_s) != len(service_s):
        raise ValueError(f"{len(arrivals_s)} arrivals but {len(service_s)} service times")
    if any(b < a for a, b in itertools.pairwise(arrivals_s)):
        raise ValueError("arrivals must be in increasing order")
    times, free_at = [], 0.0
    for arrival, service in zip(arrivals_s, service_s):
        start = max(arrival, free_at)
        free_at = start + service
        times.append((start, free_at))
    return times


@dataclass
class PeerResult:
    """One request of a peer run on the trace. Offsets in s from the first arrival; times in ms."""

    index: int
    arrival_s: float
    start_s: float  # when the server took it
    done_s: float
    latency_ms: float  # arrival to done (queueing included)
    ttft_ms: float  # arrival to the first new token
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    proposed: int | None = None
    accepted: int | None = None
    steps: int | None = None


def run_peer(models: PeerModels, peer: str, trace: list[float], prompts: list[list[int]], max_new_tokens: int,
             lookup_tokens: int = DEFAULT_LOOKUP_TOKENS) -> list[PeerResult]:
    """Serve prompts[i] (token ids) arriving at trace[i] one at a time in arrival order through `peer`."""
    if len(prompts) < len(trace):
        raise ValueError(f"{len(trace)} arrivals but only {len(prompts)} prompts")
    served = [serve_one(models, peer, prompts[i], max_new_tokens, lookup_tokens) for i in range(len(trace))]
    schedule = fifo_schedule(trace, [s.service_s for s in served])
    results = []
    for i, (arrival, s, (start, done)) in enumerate(zip(trace, served, schedule)):
        results.append(PeerResult(i, arrival, start, done, (done - arrival) * 1000,
                                  (start + s.first_token_s - arrival) * 1000, len(prompts[i]), s.token_ids,
                                  s.proposed, s.accepted, s.steps))
    return results


def warm_up(models: PeerModels, peers: list[str], prompt_ids: list[int],
            lookup_tokens: int = DEFAULT_LOOKUP_TOKENS) -> None:
    """One short untimed request per peer: the first generate() of a process pays one-off costs."""
    for peer in peers:
        serve_one(models, peer, prompt_ids, 4, lookup_tokens)

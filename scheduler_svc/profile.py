"""The start-up cost profile: a few timed calls through the verifier and costly proposers, before SERVING.

It seeds the cost model so that the first steps are not planned blind: dummy requests are prefilled
in up to VERIFY_PROFILE_MAX_BATCH verifier slots, verified at batch sizes from 1 to all of them with no
candidates and with chains of several lengths, and released; each costly proposer (not prompt lookup)
is asked for chains of a few lengths at batch 1 and at a larger batch, plus one larger batch of mixed
lengths, so that its per-request, per-token and per-pass costs (d1, d2, d3 in cost_model) are told
apart: at batch 1 tokens and passes are the same number, at a larger batch with one length they differ
by the batch size, and mixed lengths separate tokens from the longest chain. Two last calls bring it
requests it has not seen, with longer prompts, for what reading a prompt costs (d4). The first call of
each batch size only warms up (lazy initialisation) and is not measured. It stays within a time budget
and never fails start-up: on any error the defaults stay and a warning is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from scheduler_svc.clients.proposer import ProposerClient, ProposeWork
from scheduler_svc.clients.verifier import VerifierClient
from scheduler_svc.policy.cost_model import (
    MEASURED_PRIOR_STEPS,
    CostModel,
    RidgeFit,
    caught_up_tokens,
    steady_new_tokens,
)
from specdec.contracts import Candidates, PrefillItem, VerifyItem

log = logging.getLogger(__name__)

PROFILE_PREFIX = "__specdec_profile_"  # request ids of the dummy requests (never a client's: those are UUIDs)
PROMPT_TOKENS = 32
CATCH_UP_PROMPT_TOKENS = 128  # the longer prompts of the calls that measure a proposer's catch-up
PROPOSER_PROFILE_BATCH = 4  # the larger batch size costly proposers are profiled at
# The verifier is profiled up to this batch: a token's cost grows with the batch (small batches leave the
# hardware idle, so extra tokens there are nearly free), and serving at a fixed k cannot tell a request's
# cost from a token's, so a seed from batches 1 and 2 alone made speculation look dear or free under load.
VERIFY_PROFILE_MAX_BATCH = 16


@dataclass
class ProfileReport:
    """What the profile measured (for the log and tests)."""

    verify_points: int = 0
    proposer_points: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def verify_profile_batches(slots: int) -> list[int]:
    """The batch sizes the verifier is profiled at: 1, 2, a quarter, half and all of the usable slots."""
    return sorted({b for b in (1, 2, slots // 4, slots // 2, slots) if 1 <= b <= slots})


def _chain(length: int, token: int) -> Candidates:
    return Candidates.chain([token] * length)


async def profile_costs(
    cost_model: CostModel,
    verifier: VerifierClient,
    proposers: Mapping[str, ProposerClient],
    *,
    max_k: int,
    vocab_size: int,
    max_seq_len: int,
    slots: int,
    budget_s: float = 2.0,
) -> ProfileReport:
    """Measure, fit and seed `cost_model`; returns what was done. Never raises (except cancellation)."""
    report = ProfileReport()
    if budget_s <= 0:
        return report
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    try:
        await asyncio.wait_for(
            _profile(cost_model, verifier, proposers, report, max_k=max(max_k, 1), vocab_size=vocab_size,
                     max_seq_len=max_seq_len, slots=slots, deadline=deadline),
            timeout=budget_s + 5.0,  # a hard bound even if one call hangs past the budget
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the profile only improves the first steps: never let it stop start-up
        report.error = f"{type(exc).__name__}: {exc}"
        log.warning("start-up cost profile stopped early (%s); using what it measured", report.error)
    report.seconds = time.perf_counter() - t0
    return report


async def _profile(cost_model: CostModel, verifier: VerifierClient, proposers: Mapping[str, ProposerClient],
                   report: ProfileReport, *, max_k: int, vocab_size: int, max_seq_len: int, slots: int,
                   deadline: float) -> None:
    n_slots = max(1, min(VERIFY_PROFILE_MAX_BATCH, slots))
    batches = verify_profile_batches(n_slots)
    prompt_len = max(1, min(PROMPT_TOKENS, max_seq_len // 4))
    ids = [f"{PROFILE_PREFIX}{i}" for i in range(n_slots)]
    token = 1 % max(vocab_size, 1)
    prompt = [(7 * i + 3) % max(vocab_size, 1) for i in range(prompt_len)]
    # Chains of several lengths; each Verify commits up to k + 1 tokens, so stay well inside the context.
    lengths = sorted({0, max(1, max_k // 2), max_k})
    context = {rid: prompt_len + 1 for rid in ids}  # committed tokens, the pending one included
    x, y = [], []
    try:
        await verifier.prefill([PrefillItem(rid, prompt) for rid in ids])
        for batch in batches:
            for i, k in enumerate([lengths[-1], *lengths]):  # the first call of a batch size warms up
                if time.perf_counter() > deadline or context[ids[0]] + k + 1 >= max_seq_len:
                    break
                items = [VerifyItem(rid, _chain(k, token) if k else None) for rid in ids[:batch]]
                outputs, timing = await verifier.verify(items)
                if i > 0:
                    x.append((1.0, batch, batch * (k + 1), sum(context[rid] for rid in ids[:batch])))
                    y.append(timing.total_ms)
                for rid in ids[:batch]:
                    context[rid] += len(outputs[rid].accepted_token_ids) + 1
    finally:
        try:
            await verifier.release(ids)
        except Exception as exc:  # the leftover dummies are released by the next scheduler's start-up
            log.warning("could not release the profile's dummy requests: %s", exc)
    points = [(xi, yi) for xi, yi in zip(x, y) if np.isfinite(yi)]  # features as in CostModel.verify
    if points:
        fit = RidgeFit(cost_model.verify.seed, window=len(points))
        for xi, yi in points:
            fit.add(xi, yi, refit=False)
        fit.refit()
        cost_model.verify.reseed(fit.coef, MEASURED_PRIOR_STEPS)
        for xi, yi in points:
            cost_model.verify.add(xi, yi, refit=False)
        cost_model.verify.refit()
        report.verify_points = len(points)

    steady = steady_new_tokens(max_k)
    long_prompt = [(5 * i + 2) % max(vocab_size, 1)
                   for i in range(max(1, min(CATCH_UP_PROMPT_TOKENS, max_seq_len // 2)))]
    for name, proposer in proposers.items():
        if proposer.free or not proposer.available():
            continue
        fit = cost_model.proposer(name)
        points = []
        warmed: set[int] = set()  # batch sizes called once already
        asked: set[str] = set()
        batches = _proposer_batches(max(1, min(max_k, proposer.max_budget)), slots)
        calls = [(f"{name}-", prompt, ks) for ks in batches]
        # Then requests it has not read, at the largest batch (warmed up by now), one candidate each, with
        # prompts of two lengths (one call alone is a single point the robust fit may discount).
        for half, tokens in enumerate((long_prompt, long_prompt[:len(long_prompt) // 2])):
            calls.append((f"{name}-new{half}-", tokens, [1] * len(calls[-1][2])))
        try:
            for prefix, tokens, ks in calls:
                if time.perf_counter() > deadline:
                    break
                rids = [f"{PROFILE_PREFIX}{prefix}{j}" for j in range(len(ks))]
                asked.update(rids)
                sent = [proposer.unsent(rid, len(tokens)) for rid in rids]
                t = time.perf_counter()
                result = await proposer.step([ProposeWork(rid, tokens, k) for rid, k in zip(rids, ks)])
                if not result.ok:
                    break
                # The first call at a batch size warms up (new requests' prompts are fed then).
                if len(ks) in warmed:
                    points.append((_proposer_features(ks, caught_up_tokens(sent, steady)),
                                   (time.perf_counter() - t) * 1e3))
                warmed.add(len(ks))
        finally:
            for rid in sorted(asked):
                proposer.forget(rid)  # released with the next step
        if points:
            for xi, ms in points:
                fit.add(xi, ms, refit=False)
            fit.refit()
            fit.reseed(fit.coef, MEASURED_PRIOR_STEPS)
            report.proposer_points[name] = len(points)


def _proposer_batches(max_k: int, slots: int) -> list[list[int]]:
    """The chains a costly proposer is asked for, one list of k per call (the first per batch size warms up).

    Batch 1 at a few lengths, then the larger batch at the same lengths, then the larger batch with one
    long chain among short ones (the only call where the longest chain and the total disagree in ratio).
    """
    batch = max(1, min(PROPOSER_PROFILE_BATCH, slots))
    lengths = [1, max(1, max_k // 2), max_k]
    calls = [[max_k]] + [[k] for k in lengths]
    if batch > 1:
        calls += [[max_k] * batch] + [[k] * batch for k in lengths] + [[max_k] + [1] * (batch - 1)]
    return calls


def _proposer_features(ks: list[int], caught_up: int = 0) -> tuple[float, float, float, float, float]:
    """(1, requests, tokens, max_k, caught_up) of one proposer call: what CostModel.proposer fits are
    fitted on."""
    return (1.0, float(len(ks)), float(sum(ks)), float(max(ks)), float(caught_up))

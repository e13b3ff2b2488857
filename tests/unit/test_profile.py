"""The start-up cost profile (scheduler_svc/profile.py), over fake clients and a virtual clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from scheduler_svc import profile
from scheduler_svc.policy.cost_model import CostModel
from scheduler_svc.profile import PROFILE_PREFIX, profile_costs
from specdec.contracts import Timing, VerifyResult


class Clock:
    """A virtual perf_counter (seconds) that the fakes advance by what their calls cost."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class FakeVerifier:
    def __init__(self) -> None:
        self.released: list[str] = []

    async def prefill(self, items, return_hidden=False):
        return {item.request_id: 1 for item in items}, Timing(), {}

    async def verify(self, items, return_hidden=False):
        n = sum(1 + (len(item.candidates) if item.candidates else 0) for item in items)
        return {item.request_id: VerifyResult(item.request_id, (), 1) for item in items}, Timing(total_ms=5.0 + 0.5 * n)

    async def release(self, request_ids):
        self.released.extend(request_ids)
        return len(request_ids)


class FakeDraft:
    """Costs d0 + d1 * requests + d2 * tokens + d3 * longest chain + d4 * tokens read beyond a steady
    step's (a new request's prompt), plus a lazy start-up cost the first time it sees a batch size."""

    kind = "draft"
    free = False
    max_budget = 8

    def __init__(self, clock: Clock, coef, steady: int, warm_up_ms: float = 40.0) -> None:
        self.clock, self.coef, self.steady, self.warm_up_ms = clock, np.asarray(coef, float), steady, warm_up_ms
        self.sent: dict[str, int] = {}
        self.batch_sizes: set[int] = set()
        self.calls: list[list[int]] = []
        self.prompts: list[list[int]] = []  # tokens sent per call
        self.forgotten: list[str] = []

    def available(self) -> bool:
        return True

    def unsent(self, request_id: str, committed: int) -> int:
        return committed - self.sent.get(request_id, 0)

    async def step(self, work):
        ks = [w.budget for w in work]
        assert all(k > 0 for k in ks) and len({w.request_id for w in work}) == len(work)
        self.calls.append(ks)
        new = [self.unsent(w.request_id, len(w.tokens)) for w in work]
        self.prompts.append(new)
        caught_up = sum(max(0, n - self.steady) for n in new)
        ms = float(self.coef @ (1.0, len(ks), sum(ks), max(ks), caught_up))
        if len(ks) not in self.batch_sizes:
            ms += self.warm_up_ms
        self.batch_sizes.add(len(ks))
        self.sent.update((w.request_id, len(w.tokens)) for w in work)
        self.clock.now += ms / 1e3
        return SimpleNamespace(ok=True)

    def forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)


class FakeNgram(FakeDraft):
    kind = "ngram"
    free = True


def run_profile(monkeypatch, *, slots: int, max_k: int = 5, coef=(1.5, 0.3, 0.15, 0.8, 0.05)):
    clock = Clock()
    monkeypatch.setattr(profile, "time", clock)
    model = CostModel()
    draft, ngram = FakeDraft(clock, coef, steady=max_k + 1), FakeNgram(clock, coef, steady=max_k + 1)
    report = asyncio.run(profile_costs(model, FakeVerifier(), {"ngram": ngram, "draft": draft}, max_k=max_k,
                                       vocab_size=100, max_seq_len=256, slots=slots, budget_s=10.0))
    return model, report, draft, ngram


def test_profile_tells_per_request_token_pass_and_catch_up_costs_of_a_draft_apart(monkeypatch):
    true = (1.5, 0.3, 0.15, 0.8, 0.05)
    model, report, draft, ngram = run_profile(monkeypatch, slots=8, coef=true)
    assert report.error is None and report.verify_points > 0
    assert not ngram.calls  # prompt lookup costs nothing: not profiled
    # Batch 1 and batch 4 at several lengths, and a batch of mixed lengths.
    assert {len(ks) for ks in draft.calls} == {1, 4} and {max(ks) for ks in draft.calls} >= {1, 2, 5}
    assert any(len(set(ks)) > 1 for ks in draft.calls)
    # Last, two calls of four requests it has not read, with prompts longer than the others'.
    assert draft.calls[-2:] == [[1] * 4] * 2 and draft.prompts[-2:] == [[128] * 4, [64] * 4]
    assert max(draft.prompts[-3]) == 0
    # Exact timings: the fit is the truth (up to the weak pull towards the defaults), and the first call
    # at each batch size, which paid the lazy start-up, was left out.
    assert model.proposer("draft").coef == pytest.approx(true, rel=0.1)
    assert model.catch_up_ms_per_token("draft") == pytest.approx(0.05, rel=0.05)
    assert report.proposer_points["draft"] == len(draft.calls) - 2
    assert sorted(draft.forgotten) == sorted([f"{PROFILE_PREFIX}draft-{i}" for i in range(4)]
                                             + [f"{PROFILE_PREFIX}draft-new{h}-{i}" for h in (0, 1) for i in range(4)])


def test_profile_with_one_slot_stays_at_batch_one(monkeypatch):
    model, report, draft, _ = run_profile(monkeypatch, slots=1)
    assert report.error is None and {len(ks) for ks in draft.calls} == {1}
    assert draft.forgotten == [f"{PROFILE_PREFIX}draft-{i}" for i in ("0", "new0-0", "new1-0")]
    # At batch 1 tokens and passes are the same number: only their sum is pinned down.
    d = model.proposer("draft").coef
    assert d[2] + d[3] == pytest.approx(0.15 + 0.8, rel=0.1)


def test_verifier_is_profiled_from_batch_one_to_the_slots_it_may_use(monkeypatch):
    assert profile.verify_profile_batches(1) == [1]
    assert profile.verify_profile_batches(2) == [1, 2]
    assert profile.verify_profile_batches(16) == [1, 2, 4, 8, 16]
    calls = []

    class Recording(FakeVerifier):
        async def verify(self, items, return_hidden=False):
            calls.append(len(items))
            return await super().verify(items)

    clock = Clock()
    monkeypatch.setattr(profile, "time", clock)
    model = CostModel()
    asyncio.run(profile_costs(model, Recording(), {}, max_k=4, vocab_size=100, max_seq_len=256, slots=64,
                              budget_s=10.0))
    assert sorted(set(calls)) == [1, 2, 4, 8, 16]  # capped at VERIFY_PROFILE_MAX_BATCH
    # The fake costs 5 + 0.5 per batched token: the fit finds it with no per-request cost.
    assert model.verify.coef[:3] == pytest.approx([5.0, 0.0, 0.5], abs=0.05)

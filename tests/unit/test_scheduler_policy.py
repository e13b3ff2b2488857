"""Speculation policies (scheduler_svc/policy/base.py)."""

from __future__ import annotations

import pytest

from scheduler_svc.policy import make_policy
from scheduler_svc.policy.base import FixedPolicy, NoSpeculationPolicy
from scheduler_svc.types import NO_SPECULATION, Plan, RequestView


def view(rid: str, proposer: str = "", max_k: int = 100) -> RequestView:
    return RequestView(request_id=rid, proposer=proposer, context_len=10, max_k=max_k)


def test_fixed_uses_the_requests_proposer_or_the_first_configured():
    policy = FixedPolicy(["ngram", "draft"], k=3)
    plans = policy.plan([view("a"), view("b", "draft"), view("c", "ngram")])
    assert plans == {"a": Plan("ngram", 3), "b": Plan("draft", 3), "c": Plan("ngram", 3)}


def test_fixed_none_disables_and_k_is_capped_by_the_room_left():
    policy = FixedPolicy(["ngram"], k=4)
    plans = policy.plan([view("a", "none"), view("b", max_k=2), view("c", max_k=0)])
    assert plans == {"a": NO_SPECULATION, "b": Plan("ngram", 2), "c": NO_SPECULATION}


def test_fixed_without_proposers_or_with_k_zero_does_not_speculate():
    assert FixedPolicy([], k=3).plan([view("a")]) == {"a": NO_SPECULATION}
    assert FixedPolicy(["ngram"], k=0).plan([view("a")]) == {"a": NO_SPECULATION}


def test_none_policy_never_speculates_even_when_asked():
    assert NoSpeculationPolicy().plan([view("a", "ngram"), view("b")]) == {"a": NO_SPECULATION, "b": NO_SPECULATION}


def test_make_policy():
    assert isinstance(make_policy("none", ["x"], 3), NoSpeculationPolicy)
    fixed = make_policy("fixed", ["x"], 5)
    assert isinstance(fixed, FixedPolicy) and fixed.k == 5
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("goodput?", [], 1)

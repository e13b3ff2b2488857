"""Speculation policies (scheduler_svc/policy.py)."""

from __future__ import annotations

import pytest

from scheduler_svc.policy import NO_SPECULATION, FixedPolicy, NoSpeculationPolicy, Plan, RequestView, make_policy


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


def test_proposers_for_names_the_proposers_a_plan_may_use():
    """What the engine sends an admitted prompt to (the costly ones among them), policy by policy."""
    from scheduler_svc.policy import ProposerSpec

    specs = {"ngram": ProposerSpec("ngram", 8), "draft": ProposerSpec("draft", 8), "heads": ProposerSpec("medusa", 16)}
    assert NoSpeculationPolicy().proposers_for("") == ()
    fixed = FixedPolicy(["ngram", "draft"], k=3)
    assert fixed.proposers_for("") == ("ngram",) and fixed.proposers_for("draft") == ("draft",)
    assert fixed.proposers_for("none") == () and FixedPolicy(["draft"], k=0).proposers_for("") == ()
    assert make_policy("disable-by-batch-size", ["draft"], 3).proposers_for("") == ("draft",)
    assert make_policy("batch-size-table", ["draft"], 0, table="1-4:0").proposers_for("") == ()
    assert make_policy("batch-size-table", ["draft"], 0, table="1-4:0,5-:2").proposers_for("") == ("draft",)
    smart = make_policy("smartspec", list(specs), 0)
    smart.bind_proposers(specs)
    assert smart.proposers_for("") == ("ngram", "draft", "heads") and smart.proposers_for("draft") == ("draft",)
    assert smart.proposers_for("none") == ()
    chains_off = make_policy("smartspec", list(specs), 0, max_k=0)
    chains_off.bind_proposers(specs)
    assert chains_off.proposers_for("") == ("heads",)  # trees still may be planned

"""Goodput policies (scheduler_svc/policy/smartspec.py) and the batch-size baselines (batch_size_policies.py)."""

from __future__ import annotations


import numpy as np
import pytest

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.policy import make_policy, policy_from_config
from scheduler_svc.policy.acceptance import Observation
from scheduler_svc.policy.batch_size import BatchSizeTablePolicy, DisableByBatchSizePolicy
from scheduler_svc.policy.smartspec import BatchUniformPolicy, SmartSpecPolicy
from scheduler_svc.types import (
    NO_SPECULATION,
    BatchSizeRange,
    Candidates,
    Plan,
    ProposerSpec,
    RequestOutcome,
    RequestView,
    StepRecord,
    parse_batch_size_table,
)


def chain(n: int) -> tuple[int, ...]:
    """The parent indices of a chain of n candidates (what a prompt-lookup proposal looks like)."""
    return tuple(range(-1, n - 1))


def view(rid: str, proposer: str = "", max_k: int = 100, offered: dict | None = None, context: int = 50):
    return RequestView(request_id=rid, proposer=proposer, context_len=context, max_k=max_k, offered=offered or {})


def smartspec(verify=(20.0, 0.1, 0.5, 0.0), draft=(1.0, 0.2, 0.5), max_k: int = 4) -> SmartSpecPolicy:
    """A policy over ngram (free) + draft with a known cost model (no data: the seeds are the model)."""
    policy = SmartSpecPolicy(["ngram", "draft"], max_k=max_k)
    policy.bind_proposers({"ngram": ProposerSpec("ngram", 8, free=True), "draft": ProposerSpec("draft", 8)})
    policy.cost_model.verify.reseed(verify)
    policy.cost_model.overhead.reseed((0.0, 0.0, 0.0))
    policy.cost_model.proposer("draft").reseed(draft)
    return policy


def teach(policy, proposer: str, tested: int, accepted: int, steps: int = 60) -> None:
    """Feed outcomes of many requests to set a proposer's prior."""
    from scheduler_svc.policy.acceptance import Observation

    for i in range(steps):
        policy.acceptance.observe(f"teach{i}", Observation(proposer, tested, accepted))


def test_smartspec_uses_prompt_lookup_where_it_matched_and_the_draft_elsewhere():
    policy = smartspec()
    teach(policy, "ngram", 4, 3)
    teach(policy, "draft", 4, 3)
    plans = policy.plan([view("a", offered={"ngram": chain(3)}), view("b", offered={"ngram": chain(0)})])
    assert plans["a"].proposer == "ngram" and 0 < plans["a"].k <= 3  # capped by what it offered
    assert plans["b"].proposer == "draft" and plans["b"].k > 0
    assert policy.free_proposal_budget == 4
    assert policy.predicted_step_ms > 0 and policy.predicted_goodput > 0 and policy.last_plan_ms > 0


def test_smartspec_honours_request_choices_and_room():
    policy = smartspec()
    teach(policy, "ngram", 4, 3)
    teach(policy, "draft", 4, 3)
    plans = policy.plan([view("a", "none", offered={"ngram": chain(4)}), view("b", "draft", offered={"ngram": chain(4)}),
                         view("c", max_k=0, offered={"ngram": chain(4)}), view("d", max_k=1)])
    assert plans["a"] == NO_SPECULATION and plans["c"] == NO_SPECULATION
    assert plans["b"].proposer == "draft" and plans["d"].k <= 1


def test_smartspec_stops_speculating_when_acceptance_is_low_or_the_batch_is_large():
    policy = smartspec()
    teach(policy, "draft", 1, 0, steps=200)  # the draft is never right
    assert policy.plan([view("a")]) == {"a": NO_SPECULATION}
    # A good draft but a batch where candidate tokens cost as much as the whole step's fixed part.
    policy = smartspec(verify=(2.0, 0.1, 3.0, 0.0))
    teach(policy, "draft", 4, 2)
    plans = policy.plan([view(f"r{i}") for i in range(32)])
    assert all(p == NO_SPECULATION for p in plans.values())
    # The same draft with batch 1 and a costly fixed step: long speculation.
    policy = smartspec(verify=(30.0, 0.1, 0.2, 0.0))
    teach(policy, "draft", 5, 5)
    assert policy.plan([view("a")])["a"].k == 4


def test_smartspec_learns_from_outcomes_and_timings():
    policy = smartspec()
    views = [view("a", offered={"ngram": chain(4)}), view("b", offered={"ngram": chain(0)})]
    for step in range(30):
        plans = policy.plan(views)
        outcomes = []
        for v in views:
            plan = plans[v.request_id]
            if plan.proposer == "draft":
                outcomes.append(RequestOutcome(v.request_id, "draft", plan.k, plan.k, 0, committed=(9,)))
            else:
                # Prompt lookup offered [1, 2, 3, 4]; the target produced 1, 2 then 7: two would be accepted.
                k = plan.k
                outcomes.append(RequestOutcome(v.request_id, plan.proposer, k, k, min(k, 2),
                                               committed=(1, 2, 7)[: min(k, 2) + 1],
                                               free_proposals={"ngram": Candidates.chain((1, 2, 3, 4))}))
        record = StepRecord(step_id=step, start_s=0.0, wall_ms=30.0, verify_total_ms=22.0,
                            propose_ms={"draft": 3.0}, propose_wall_ms=4.0)
        policy.observe(outcomes, record)
    # The draft keeps missing for b: it is dropped; prompt lookup on a is scored from its full chain.
    assert policy.acceptance.rate("b", "draft") < policy.acceptance.prior("draft")
    assert policy.plan(views)["b"] == NO_SPECULATION
    assert policy.acceptance.rate("a", "ngram") == pytest.approx(2 / 3, abs=0.05)
    assert policy.cost_model.steps_observed == 30
    assert policy.cost_model.last_relative_error is not None


def test_batch_uniform_gives_everyone_the_same_k():
    policy = BatchUniformPolicy(["draft"], max_k=4)
    policy.bind_proposers({"draft": ProposerSpec("draft", 8)})
    teach(policy, "draft", 4, 3)
    policy.acceptance.observe("low", Observation("draft", 3, 0))
    plans = policy.plan([view("a"), view("low"), view("c")])
    assert len({p.k for p in plans.values()}) == 1
    assert policy.free_proposal_budget == 0


def test_disable_by_batch_size():
    policy = DisableByBatchSizePolicy(["ngram"], k=3, threshold=2)
    assert policy.plan([view("a"), view("b")]) == {"a": Plan("ngram", 3), "b": Plan("ngram", 3)}
    assert set(policy.plan([view("a"), view("b"), view("c")]).values()) == {NO_SPECULATION}


def test_batch_size_table_parsing_and_lookup():
    assert parse_batch_size_table("1-4:5, 5-16:3,17-:0") == (
        BatchSizeRange(1, 4, 5), BatchSizeRange(5, 16, 3), BatchSizeRange(17, None, 0))
    assert parse_batch_size_table("2:1") == (BatchSizeRange(2, 2, 1),)
    for bad in ("", "1-4", "a-b:3", "4-1:2", "1-4:-1", "1-4:2,3-5:1", "1-:2,5-:1"):
        with pytest.raises(ValueError, match="--batch-size-table"):
            parse_batch_size_table(bad)
    policy = BatchSizeTablePolicy(["d"], "1-2:4,3-:1")
    assert policy.plan([view("a")]) == {"a": Plan("d", 4)}
    assert policy.plan([view(str(i)) for i in range(5)])["0"] == Plan("d", 1)
    assert BatchSizeTablePolicy(["d"], "2-3:4").plan([view("a")]) == {"a": NO_SPECULATION}  # not covered


def test_make_policy_and_config_select_every_policy_by_name():
    for name, cls in (("smartspec", SmartSpecPolicy), ("batch-uniform", BatchUniformPolicy),
                      ("disable-by-batch-size", DisableByBatchSizePolicy),
                      ("batch-size-table", BatchSizeTablePolicy)):
        config = SchedulerConfig(verifier="h:1", policy=name, max_k=6, disable_batch_size=3,
                                 batch_size_table="1-:2")
        policy = policy_from_config(config, ["p"])
        assert isinstance(policy, cls) and policy.name == name
    assert policy_from_config(SchedulerConfig(verifier="h:1", policy="smartspec", max_k=6), ["p"]).max_k == 6
    assert make_policy("smartspec", ["p"], 3).max_k == 8
    assert SchedulerConfig(verifier="h:1").policy == "smartspec"  # the default
    with pytest.raises(ValueError, match="batch-size-table"):
        SchedulerConfig(verifier="h:1", batch_size_table="x")
    with pytest.raises(ValueError, match="ema-alpha"):
        SchedulerConfig(verifier="h:1", ema_alpha=0.0)


def test_the_cost_fit_learns_the_draft_s_catch_up_from_the_steps_that_read_new_prompts():
    """Steps where the draft read a prompt stay in its fit, their extra tokens a term of their own: under
    load they are most steps, and leaving them out left the draft's large-batch costs to its seed."""
    rng = np.random.default_rng(3)
    true = np.array([1.0, 0.3, 0.4, 0.6, 0.05])  # d0..d3, and per token read beyond a steady step's
    policy = smartspec(max_k=4)  # a steady step sends at most 4 + 1 tokens
    for step_id in range(80):
        ks = rng.integers(1, 5, size=int(rng.integers(1, 9)))
        new = rng.choice([2, 3, 5, 60, 150], size=len(ks), p=[0.3, 0.3, 0.2, 0.1, 0.1])
        rids = [f"r{step_id}-{i}" for i in range(len(ks))]
        policy.plan([view(rid, proposer="draft") for rid in rids])
        caught_up = int(np.maximum(new - 5, 0).sum())
        ms = float(true @ (1.0, len(ks), ks.sum(), ks.max(), caught_up)) * (1 + rng.normal(0, 0.02))
        outcomes = [RequestOutcome(rid, "draft", int(k), int(k), 0, committed=(7,)) for rid, k in zip(rids, ks)]
        policy.observe(outcomes, StepRecord(step_id=step_id, start_s=0.0, wall_ms=ms + 30.0, verify_total_ms=25.0,
                                            propose_ms={"draft": ms}, propose_wall_ms=ms,
                                            propose_new_tokens={"draft": tuple(int(n) for n in new)}))
    draft = policy.cost_model.proposer("draft")
    assert len(draft) == 80  # every step taught the fit
    assert draft.coef[1:] == pytest.approx(true[1:], rel=0.15)
    assert draft.coef[0] == pytest.approx(true[0], abs=0.3)  # the intercept, the least pinned down
    assert policy.cost_model.catch_up_ms_per_token("draft") == pytest.approx(0.05, rel=0.1)


def test_the_draft_s_catch_up_is_charged_to_requests_it_has_not_read_where_prompt_lookup_matched():
    # Reading a prompt token costs 30 / 145 ms: 30 ms for a 150-token prompt beyond a steady step's 5.
    policy = smartspec(draft=(1.0, 0.2, 0.5, 0.0, 30.0 / 145))
    teach(policy, "ngram", 4, 2)
    teach(policy, "draft", 4, 3)
    # Two requests where prompt lookup matched: the draft is better for both when it has read them, but
    # not for one whose whole prompt it would read first, with 20 tokens to go.
    read = view("r", offered={"ngram": chain(4)}, max_k=19)
    new = RequestView(request_id="n", proposer="", context_len=200, max_k=19, offered={"ngram": chain(4)},
                      unsent={"draft": 200})
    plans = policy.plan([read, new])
    assert plans["r"].proposer == "draft" and plans["n"].proposer == "ngram"
    # The same request with its prompt already read goes to the draft too.
    plans = policy.plan([read, RequestView(request_id="n", proposer="", context_len=200, max_k=19,
                                           offered={"ngram": chain(4)}, unsent={"draft": 1})])
    assert plans["n"].proposer == "draft"
    # Where prompt lookup has nothing, the choice is the draft or nothing: waiting would not make the catch-up
    # cheaper, so it is not charged and the new request gets the draft.
    plans = policy.plan([read, RequestView(request_id="n", proposer="", context_len=200, max_k=19,
                                           offered={"ngram": chain(0)}, unsent={"draft": 200})])
    assert plans["n"].proposer == "draft"

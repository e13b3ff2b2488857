"""The engine's free-proposer phase and the smartspec policy end to end, over the fake services."""

from __future__ import annotations

import asyncio

from test_scheduler_fakes import FakeProposer, cluster, generate, reference, run

from scheduler_svc.config import config_from_args
from scheduler_svc.policy.base import Policy
from scheduler_svc.types import Plan
from scheduler_svc.profile import PROFILE_PREFIX
from specdec.pb import common_pb2, proposer_pb2

PROMPTS = [[11, 12, 13], [20, 5], [31, 40, 41, 42], [8]]  # odd first token: prompt lookup has a match


class FakeNgram(FakeProposer):
    """A free proposer (as prompt lookup is); has no match for prompts that start with an even token."""

    async def Info(self, request, context):
        return proposer_pb2.ProposerInfo(kind="ngram", config=self.mode, max_budget=self.max_budget, free=True)

    def _propose(self, rid: str, budget: int) -> common_pb2.Candidates:
        if self.history[rid][0] % 2 == 0:
            return common_pb2.Candidates(request_id=rid)
        return super()._propose(rid, budget)


class ScriptedPolicy(Policy):
    """Prompt lookup for 2 where it matched, else the draft for 3; keeps what it is told."""

    name = "scripted"
    free_proposal_budget = 4

    def __init__(self) -> None:
        self.views, self.outcomes, self.records = [], [], []

    def plan(self, requests):
        self.views.extend(requests)
        return {r.request_id: Plan("ngram", 2) if r.offered.get("ngram") else Plan("draft", 3) for r in requests}

    def observe(self, outcomes, record):
        self.outcomes.extend(outcomes)
        self.records.append(record)


async def generate_all(c, max_tokens: int):
    results = await asyncio.gather(*(generate(c.stub, prompt_token_ids=p, max_tokens=max_tokens) for p in PROMPTS))
    for prompt, (tokens, _, reason, _, _) in zip(PROMPTS, results):
        assert (tokens, reason) == reference(prompt, max_tokens)
    return results


def test_free_proposer_proposes_first_and_is_truncated_to_the_plan():
    async def body():
        ngram, draft = FakeNgram("good"), FakeProposer("good")
        async with cluster(proposers={"ngram": ngram, "draft": draft}) as c:
            c.engine.policy = policy = ScriptedPolicy()
            await generate_all(c, max_tokens=12)
            seen = {**ngram.history, **ngram.history_at_release}  # releases go out with a later step
            first_token = {rid: hist[0] for rid, hist in seen.items()}
            matched = {rid for rid, t in first_token.items() if t % 2}
            assert len(first_token) == len(PROMPTS) and len(matched) == 2
            # Prompt lookup was asked for the full budget for every request, the draft only where it had none.
            ngram_items = [i for req in ngram.requests for i in req.items if i.budget > 0]
            assert {i.request_id for i in ngram_items} == set(first_token)
            assert max(i.budget for i in ngram_items) == 4
            draft_ids = {i.request_id for req in draft.requests for i in req.items if i.budget > 0}
            assert draft_ids and not draft_ids & matched
            # What was verified: 2 of the 4 prompt-lookup candidates, or 3 from the draft.
            counts = [(rid, n) for batch in c.verifier.verify_batches for rid, n in batch.items()]
            assert {n for rid, n in counts if rid in matched} <= {0, 1, 2} and any(
                n == 2 for rid, n in counts if rid in matched)
            assert any(n == 3 for rid, n in counts if rid not in matched)
            # The policy saw the offers, and afterwards the full chains and the committed tokens.
            assert {len(v.offered["ngram"]) for v in policy.views if v.request_id in matched} <= {1, 2, 3, 4}
            assert all(v.offered["ngram"] == () for v in policy.views if v.request_id not in matched)
            scored = [o for o in policy.outcomes if o.free_proposals]
            assert scored and all(o.request_id in matched and o.proposer == "ngram" for o in scored)
            assert all(len(o.committed) == o.accepted + 1 for o in policy.outcomes)
            assert any(len(o.free_proposals["ngram"]) == 4 and o.k == 2 for o in scored)
            record = policy.records[-1]
            assert record.free_propose_wall_ms > 0 and record.plan_ms > 0 and "ngram" in record.propose_ms

    run(body())


class OrderedPolicy(ScriptedPolicy):
    """Logs plans and feedback in order; its learning may fail."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.fail = fail

    def plan(self, requests):
        self.events.append(("plan", len(self.records)))
        return super().plan(requests)

    def observe(self, outcomes, record):
        self.events.append(("observe", record.step_id))
        super().observe(outcomes, record)
        if self.fail:
            raise RuntimeError("a bug in the policy's learning")


def test_the_policy_learns_from_each_step_once_before_the_next_plan_and_its_faults_cost_no_output():
    async def body(fail: bool, free: bool):
        proposers = {"ngram": FakeNgram("good"), "draft": FakeProposer("good")} if free else {
            "draft": FakeProposer("good")}
        async with cluster(proposers=proposers) as c:
            c.engine.policy = policy = OrderedPolicy(fail)
            await generate_all(c, max_tokens=12)  # the output is the target's alone, even when it fails
            steps = len(c.engine.step_records)
            # plan (having learnt from 0 steps), observe step 1, plan (1 step learnt), observe step 2, ...
            assert policy.events == [e for i in range(steps) for e in (("plan", i), ("observe", i + 1))]
            assert c.engine.num_running == 0

    for fail in (False, True):
        for free in (False, True):
            run(body(fail, free))


def test_smartspec_end_to_end_is_lossless_profiles_at_start_and_learns():
    async def body():
        ngram, draft = FakeNgram("good"), FakeProposer("mixed")
        async with cluster(proposers={"ngram": ngram, "draft": draft}, policy="smartspec", max_k=4,
                           profile_s=0.5) as c:
            policy = c.engine.policy
            assert policy.name == "smartspec"
            # The start-up profile ran through the verifier and the draft, and left nothing behind.
            profiled = [rid for rid in c.verifier.prefilled if rid.startswith(PROFILE_PREFIX)]
            assert profiled and set(profiled) <= set(c.verifier.released)
            assert len(policy.cost_model.verify) > 0 and len(policy.cost_model.proposer("draft")) > 0
            results = await generate_all(c, max_tokens=16)
            assert any(stats.proposers["ngram"].accepted > 0 for _, _, _, stats, _ in results)
            records = list(c.engine.step_records)
            assert all(r.predicted_step_ms is not None and r.predicted_step_ms > 0 for r in records)
            assert policy.cost_model.steps_observed == len(records)
            assert policy.cost_model.last_relative_error is not None
            assert policy.predicted_goodput > 0
            assert max(n for b in c.verifier.verify_batches for n in b.values()) <= 4
            # The draft's profile request is released like any other.
            await asyncio.sleep(0)
            assert {f"{PROFILE_PREFIX}draft-{i}" for i in range(4)} <= set(draft.released)

    run(body())


def test_scheduler_flags_select_policies():
    config = config_from_args(["--verifier", "h:1", "--policy", "batch-size-table", "--batch-size-table", "1-:2",
                               "--max-k", "7", "--ema-alpha", "0.5", "--disable-batch-size", "3",
                               "--cost-window", "64", "--profile-s", "0"])
    assert (config.policy, config.batch_size_table, config.max_k, config.ema_alpha) == ("batch-size-table", "1-:2",
                                                                                         7, 0.5)
    assert (config.disable_batch_size, config.cost_window, config.profile_s) == (3, 64, 0.0)
    assert config_from_args(["--verifier", "h:1"]).policy == "smartspec"

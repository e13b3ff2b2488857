"""The Propose stream client (scheduler_svc/clients/proposer.py) against a fake proposer on loopback."""

from __future__ import annotations

import asyncio

import pytest

from scheduler_svc.clients.proposer import ProposerClient, ProposerFault, ProposeWork, check_candidates
from specdec.pb import common_pb2, proposer_pb2_grpc
from test_scheduler_fakes import VOCAB, FakeProposer, next_token, run, serve_fake

pytestmark = pytest.mark.timeout(60)


async def with_client(fake: FakeProposer, body, **kwargs):
    async with serve_fake(fake, proposer_pb2_grpc.add_ProposerServicer_to_server) as (_, address):
        client = ProposerClient("p", address, vocab_size=VOCAB, **kwargs)
        try:
            await client.info()
            await body(client)
        finally:
            await client.close()


def test_only_unsent_tokens_go_and_releases_follow_forget():
    fake = FakeProposer("good", max_budget=6)

    async def body(client: ProposerClient):
        assert client.max_budget == 6
        tokens = [1, 2, 3]
        result = await client.step([ProposeWork("r", tokens, 2)])
        assert result.ok and list(result.candidates["r"].tokens) == [next_token(3), next_token(next_token(3))]
        tokens += [4, 5]
        result = await client.step([ProposeWork("r", tokens, 1)])
        assert list(result.candidates["r"].tokens) == [next_token(5)]
        first, second = fake.requests
        assert (list(first.items[0].new_token_ids), first.items[0].reset) == ([1, 2, 3], True)
        assert (list(second.items[0].new_token_ids), second.items[0].reset) == ([4, 5], False)
        assert second.step_id == first.step_id + 1
        client.forget("r")
        client.forget("never-sent")
        assert client.has_releases
        result = await client.step([])  # a release-only step
        assert result.ok and list(fake.requests[-1].release_request_ids) == ["r"]
        assert not client.has_releases and fake.released == ["r"]

    run(with_client(fake, body))


def test_a_fault_drops_the_stream_backs_off_and_resends_from_scratch():
    fake = FakeProposer("garbage_step", misbehave_from_step=2)

    async def body(client: ProposerClient):
        tokens = [7, 8]
        assert (await client.step([ProposeWork("r", tokens, 2)])).ok
        tokens.append(9)
        result = await client.step([ProposeWork("r", tokens, 2)])
        assert not result.ok and result.candidates == {} and client.faults == 1
        assert not client.available()
        sent = len(fake.requests)
        assert not (await client.step([ProposeWork("r", tokens, 2)])).ok  # skipped, nothing sent
        assert len(fake.requests) == sent
        await asyncio.sleep(0.06)
        fake.mode = "good"
        tokens.append(10)
        result = await client.step([ProposeWork("r", tokens, 2)])
        assert result.ok and fake.streams == 2
        item = fake.requests[-1].items[0]
        assert item.reset and list(item.new_token_ids) == [7, 8, 9, 10]

    run(with_client(fake, body, backoff_s=0.05))


def test_a_proposer_that_does_not_answer_in_time():
    fake = FakeProposer("hang", misbehave_from_step=1)

    async def body(client: ProposerClient):
        result = await client.step([ProposeWork("r", [1], 3)])
        assert not result.ok and client.faults == 1

    run(with_client(fake, body, timeout_s=0.1))


def chain(tokens, parents=None, dists=0, width=VOCAB, value=1.0):
    parents = list(range(-1, len(tokens) - 1)) if parents is None else parents
    return common_pb2.Candidates(token_ids=tokens, parent_indices=parents,
                                 draft_distributions=[common_pb2.Distribution(probs=[value] * width)] * dists)


def test_check_candidates():
    check_candidates(chain([1, 2, 3]), 3, VOCAB)
    check_candidates(chain([1, 2, 3], [-1, -1, 0]), 3, VOCAB)  # a tree
    check_candidates(chain([1, 2], dists=2), 2, VOCAB)
    check_candidates(chain([1, 2], dists=2, width=VOCAB - 10), 2, VOCAB)  # a draft's shorter vocabulary
    check_candidates(chain([]), 0, VOCAB)
    bad = [
        (chain([1, 2, 3]), 2, "budget"),
        (chain([1, 2], [-1]), 2, "parent indices"),
        (chain([1, 2], [-1, 1]), 2, "out of range"),
        (chain([1, -2]), 2, "outside the vocabulary"),
        (chain([1, VOCAB]), 2, "outside the vocabulary"),
        (chain([1, 2], [-1, -1], dists=2), 2, "tree"),
        (chain([1, 2], dists=1), 2, "draft distributions"),
        (chain([1, 2], dists=2, width=VOCAB + 1), 2, "probabilities"),
        (chain([1, 2], dists=2, width=0), 2, "probabilities"),
        (chain([1, 2], dists=2, value=0.0), 2, "non-zero"),
        (chain([1, 2], dists=2, value=-1.0), 2, "non-negative"),
        (chain([1, 2], dists=2, value=float("nan")), 2, "finite"),
    ]
    for cand, budget, message in bad:
        with pytest.raises(ProposerFault, match=message):
            check_candidates(cand, budget, VOCAB)

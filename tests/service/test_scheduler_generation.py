"""The Generation API's n, logprobs, chat messages, several EOS ids and ModelInfo, over gRPC in front of the
in-process fakes (tests/service/test_scheduler_fakes.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specdec.pb import generation_pb2
from test_scheduler_fakes import (
    EOS,
    TOKENIZER,
    FakeProposer,
    FastTokenizer,
    FakeVerifier,
    cluster,
    fake_logprob,
    fake_top,
    reference,
    run,
    token_before,
)

pytestmark = pytest.mark.timeout(60)


class ChatTokenizer(FastTokenizer):
    """The fake tokenizer with a chat template (a stand-in for transformers' apply_chat_template)."""

    chat_template = "<fake>"

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[list[dict]] = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        self.rendered.append(messages)
        if any(m["role"] == "tool" for m in messages):
            raise RuntimeError("tool messages are not supported by this template")
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


async def unary(stub, **fields) -> generation_pb2.GenerateResult:
    return await stub.GenerateUnary(generation_pb2.GenerateRequest(**fields), timeout=20)


def test_n_completions_share_the_prompt_and_carry_their_index():
    async def body():
        async with cluster(proposers={"fake": FakeProposer("mixed")}, k=3) as c:
            prompt = [5, 6, 7]
            want, _ = reference(prompt, 12)
            result = await unary(c.stub, prompt_token_ids=prompt, max_tokens=12, n=3)
            assert [x.index for x in result.completions] == [0, 1, 2]
            # Greedy: every completion is the model's own output.
            for completion in result.completions:
                assert list(completion.token_ids) == want and completion.text == TOKENIZER.decode(want)
                assert completion.stats.completion_tokens == 12 and completion.stats.prompt_tokens == 3
            assert list(result.token_ids) == want and result.text == result.completions[0].text
            # Three requests in the engine, all released.
            assert len(c.verifier.prefilled) == 3
            # Streamed: the pieces interleave; each completion ends with its own finish reason.
            by_index: dict[int, list[int]] = {0: [], 1: [], 2: []}
            finished = []
            async for msg in c.stub.Generate(generation_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=12,
                                                                            n=3), timeout=20):
                by_index[msg.index].extend(msg.token_ids)
                if msg.finish_reason:
                    finished.append(msg.index)
                    assert msg.stats.completion_tokens == 12
            assert sorted(finished) == [0, 1, 2] and all(t == want for t in by_index.values())
            await asyncio.sleep(0.05)
            assert c.verifier.seqs == {}

    run(body())


def test_n_completions_with_a_seed_sample_with_seed_plus_index():
    async def body():
        async with cluster() as c:
            await unary(c.stub, prompt_token_ids=[1, 2], max_tokens=3, n=3, temperature=0.8, seed=41)
            seeds = sorted(c.verifier.sampling[rid].seed for rid in c.verifier.prefilled)
            assert seeds == [41, 42, 43]
            await unary(c.stub, prompt_token_ids=[1, 2], max_tokens=3, n=2, temperature=0.8, seed=2**64 - 1)
            assert sorted(c.verifier.sampling[rid].seed for rid in c.verifier.prefilled[3:]) == [0, 2**64 - 1]
            # Without a seed, none is sent: the verifier draws one per request.
            await unary(c.stub, prompt_token_ids=[1, 2], max_tokens=3, n=2, temperature=0.8)
            assert not any(c.verifier.sampling[rid].HasField("seed") for rid in c.verifier.prefilled[5:])

    run(body())


def test_n_that_does_not_fit_the_queue_is_refused_whole():
    async def body():
        verifier = FakeVerifier(max_slots=2, max_batch_size=2, verify_delay_s=0.02)
        async with cluster(verifier, max_waiting=2, proposers={}) as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(c.stub, prompt_token_ids=[1], max_tokens=3, n=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.engine.num_waiting == 0 and verifier.prefilled == []
            result = await unary(c.stub, prompt_token_ids=[1], max_tokens=3, n=4)  # 2 slots + 2 waiting
            assert len(result.completions) == 4

    run(body())


def test_logprobs_follow_every_kept_token_through_truncation():
    async def body():
        async with cluster(proposers={"fake": FakeProposer("good")}, k=4) as c:
            prompt = [11, 12]
            want, _ = reference(prompt, 10)
            result = await unary(c.stub, prompt_token_ids=prompt, max_tokens=10, logprobs=True, top_logprobs=2)
            assert list(result.token_ids) == want
            assert [lp.token_id for lp in result.logprobs] == want
            for lp in result.logprobs:
                assert lp.logprob == pytest.approx(fake_logprob(lp.token_id))
                assert lp.token == TOKENIZER.decode([lp.token_id])
                top = [(t.token_id, pytest.approx(t.logprob)) for t in lp.top_logprobs]
                assert top == fake_top(lp.token_id, 2)
                assert [t.token for t in lp.top_logprobs] == [TOKENIZER.decode([t]) for t, _ in fake_top(lp.token_id, 2)]
            # Streamed, each message has one logprob per token; a request that did not ask gets none.
            async for msg in c.stub.Generate(generation_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=10,
                                                                            logprobs=True), timeout=20):
                assert [lp.token_id for lp in msg.logprobs] == list(msg.token_ids)
                assert all(not lp.top_logprobs for lp in msg.logprobs)
            plain = await unary(c.stub, prompt_token_ids=prompt, max_tokens=10)
            assert list(plain.logprobs) == [] and list(plain.token_ids) == want
            # EOS cuts a step: the logprobs stop with the kept tokens.
            before_eos = token_before(EOS)
            cut = await unary(c.stub, prompt_token_ids=[1, token_before(token_before(before_eos))], max_tokens=10,
                              logprobs=True)
            assert cut.finish_reason == generation_pb2.FINISH_REASON_EOS
            assert [lp.token_id for lp in cut.logprobs] == list(cut.token_ids) == [token_before(before_eos),
                                                                                     before_eos]

    run(body())


def test_every_eos_id_the_verifier_reports_stops_generation():
    async def body():
        prompt = [21, 22]
        want, _ = reference(prompt, 20, eos=None)
        # The 6th output token is an end-of-turn id besides the EOS.
        verifier = FakeVerifier(eos_token_ids=(EOS, want[5]))
        async with cluster(verifier, proposers={"fake": FakeProposer("good")}, k=3) as c:
            result = await unary(c.stub, prompt_token_ids=prompt, max_tokens=20)
            assert list(result.token_ids) == want[:5] and result.finish_reason == generation_pb2.FINISH_REASON_EOS
            ignored = await unary(c.stub, prompt_token_ids=prompt, max_tokens=20, ignore_eos=True)
            assert list(ignored.token_ids) == want
            info = await c.stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=5)
            assert list(info.eos_token_ids) == [EOS, want[5]]

    run(body())


def test_model_info():
    async def body():
        async with cluster(FakeVerifier(model="/srv/ckpt/tiny-target/"), max_tokens_limit=64) as c:
            info = await c.stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=5)
            assert (info.model, info.context_length, info.vocab_size, info.has_chat_template) == (
                "tiny-target", 128, 4096, False)
            assert info.max_tokens_limit == 64 and list(info.proposers) == ["fake"]
        async with cluster(model_name="served-name", tokenizer=ChatTokenizer()) as c:
            info = await c.stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=5)
            assert info.model == "served-name" and info.has_chat_template

    run(body())


def test_chat_messages_go_through_the_chat_template():
    async def body():
        tokenizer = ChatTokenizer()
        async with cluster(tokenizer=tokenizer) as c:
            messages = [generation_pb2.ChatMessage(role="system", content="be brief"),
                        generation_pb2.ChatMessage(role="user", content="hello there")]
            result = await unary(c.stub, messages=messages, max_tokens=6)
            assert tokenizer.rendered[-1] == [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hello there"}]
            templated = TOKENIZER.encode("<system>be brief\n<user>hello there\n<assistant>", add_special_tokens=False)
            assert result.stats.prompt_tokens == len(templated)
            assert list(result.token_ids) == reference(templated, 6)[0]
            # The same as sending the templated tokens.
            same = await unary(c.stub, prompt_token_ids=templated, max_tokens=6)
            assert list(same.token_ids) == list(result.token_ids)
            for fields, message in [
                (dict(messages=[generation_pb2.ChatMessage(role="tool", content="x")]), "chat template refused"),
                (dict(messages=[generation_pb2.ChatMessage(content="x")]), "messages[0] has no role"),
                (dict(messages=messages, prompt="x"), "prompt and messages are set"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary(c.stub, max_tokens=4, **fields)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
        async with cluster() as c:  # a tokenizer without a chat template
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(c.stub, messages=[generation_pb2.ChatMessage(role="user", content="hi")], max_tokens=4)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "has no chat template" in info.value.details()

    run(body())


@pytest.mark.parametrize("fields, message", [
    (dict(n=-1), "n must be in 1..64"),
    (dict(n=65), "n must be in 1..64"),
    (dict(top_logprobs=2), "top_logprobs needs logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs must be in 0..20"),
])
def test_bad_n_and_logprobs_are_invalid(fields, message):
    async def body():
        async with cluster() as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(c.stub, prompt_token_ids=[1], max_tokens=4, **fields)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()

    run(body())


"""The HTTP API's schemas and their translation (scheduler_svc/http/schema.py), without servers: OpenAI
request bodies become the GenerateRequest a gRPC client would send, what cannot be served is refused naming
its field, and responses take OpenAI's shape."""

from __future__ import annotations

import pydantic
import pytest

from scheduler_svc.http.app import validation_error
from scheduler_svc.http.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidField,
    chat_logprobs,
    chat_to_pb,
    completion_logprobs,
    completion_to_pb,
    finish_reason_name,
    speculation_of,
)
from scheduler_svc.request import FinishReason, ProposerCounts, RequestStats
from specdec.contracts import TokenLogprobs
from specdec.pb import generation_pb2


def completion(**fields) -> generation_pb2.GenerateRequest:
    return completion_to_pb(CompletionRequest(model="m", **fields))


def chat(**fields) -> generation_pb2.GenerateRequest:
    return chat_to_pb(ChatCompletionRequest(model="m", **fields))


def test_a_completion_request_is_the_grpc_request_a_client_would_send():
    request = completion(prompt="def f(", max_tokens=5, temperature=0, top_p=0.9, n=2, seed=3, stop="\n",
                         logprobs=2, top_k=4, proposer="draft", ignore_eos=True)
    assert request == generation_pb2.GenerateRequest(
        prompt="def f(", max_tokens=5, temperature=0, top_p=0.9, n=2, seed=3, stop=["\n"], logprobs=True,
        top_logprobs=2, top_k=4, proposer="draft", ignore_eos=True)
    # OpenAI's defaults: temperature 1, one completion, no max_tokens (0: the server's default), no logprobs.
    assert completion(prompt="x") == generation_pb2.GenerateRequest(prompt="x", temperature=1.0, n=1)
    assert not completion(prompt="x").HasField("seed") and not completion(prompt="x").HasField("top_p")
    assert completion(prompt=[1, 2, 3]).prompt_token_ids == [1, 2, 3]
    assert completion(prompt=[[4, 5]]).prompt_token_ids == [4, 5] and completion(prompt=["y"]).prompt == "y"
    assert completion(prompt="x", logprobs=0).logprobs and completion(prompt="x", logprobs=0).top_logprobs == 0
    assert list(completion(prompt="x", stop=["a", "b"]).stop) == ["a", "b"]


def test_a_chat_request_carries_its_messages():
    request = chat(messages=[{"role": "system", "content": "s"},
                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": None}],
                   max_completion_tokens=7, logprobs=True, top_logprobs=3)
    assert [(m.role, m.content) for m in request.messages] == [("system", "s"), ("user", "ab"), ("assistant", "")]
    assert (request.max_tokens, request.logprobs, request.top_logprobs) == (7, True, 3)
    assert chat(messages=[{"role": "user", "content": "x"}], max_tokens=9).max_tokens == 9
    assert chat(messages=[{"role": "user", "content": "x"}], max_tokens=9, max_completion_tokens=9).max_tokens == 9


@pytest.mark.parametrize("build, fields, param", [
    (completion, dict(prompt="x", presence_penalty=0.1), "presence_penalty"),
    (completion, dict(prompt="x", frequency_penalty=-1), "frequency_penalty"),
    (completion, dict(prompt="x", logit_bias={"5": 1}), "logit_bias"),
    (completion, dict(prompt="x", echo=True), "echo"),
    (completion, dict(prompt="x", suffix="y"), "suffix"),
    (completion, dict(prompt="x", best_of=3), "best_of"),
    (completion, dict(prompt="x", n=0), "n"),
    (completion, dict(prompt="x", logprobs=-1), "logprobs"),
    (completion, dict(prompt=["a", "b"]), "prompt"),
    (completion, dict(prompt="x", stream_options={"include_usage": True}), "stream_options"),
    (chat, dict(messages=[]), "messages"),
    (chat, dict(messages=[{"role": "user", "content": "x"}], max_tokens=3, max_completion_tokens=4),
     "max_completion_tokens"),
])
def test_what_cannot_be_served_is_refused_naming_its_field(build, fields, param):
    with pytest.raises(InvalidField) as info:
        build(**fields)
    assert info.value.param == param
    # Their neutral values are accepted.
    completion(prompt="x", presence_penalty=0, frequency_penalty=0.0, logit_bias={}, echo=False, best_of=1, user="u")


@pytest.mark.parametrize("body, message, param", [
    (dict(prompt="x", tools=[]), "unknown field 'tools'", "tools"),
    (dict(), "prompt is required", "prompt"),
    (dict(prompt="x", max_tokens=2**31), "max_tokens:", "max_tokens"),
    (dict(prompt="x", seed=-2), "seed:", "seed"),
    (dict(prompt="x", temperature="hot"), "temperature:", "temperature"),
    (dict(prompt=[1, "a"]), "prompt", None),
])
def test_json_shape_errors_name_the_field(body, message, param):
    with pytest.raises(pydantic.ValidationError) as info:
        CompletionRequest(model="m", **body)
    error = validation_error(info.value.errors())
    assert error.status == 400 and message in error.message
    if param is not None:
        assert error.param == param


def test_responses_take_openais_shape():
    assert [finish_reason_name(r) for r in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP, None)] == [
        "length", "stop", "stop", None]
    stats = [RequestStats(steps=3, proposed=6, accepted=4, proposers={"draft": ProposerCounts(3, 6, 4)}),
             RequestStats(steps=2, proposed=2, accepted=1, proposers={"draft": ProposerCounts(1, 2, 1),
                                                                      "ngram": ProposerCounts(1, 0, 0)})]
    speculation = speculation_of(stats).model_dump()
    assert speculation == {"steps": 5, "proposed": 8, "accepted": 5, "proposers": {
        "draft": {"steps": 4, "proposed": 8, "accepted": 5}, "ngram": {"steps": 1, "proposed": 0, "accepted": 0}}}
    text = {1: "a", 2: "é", 3: "c"}.__getitem__
    logprobs = [TokenLogprobs(1, -0.5, ((1, -0.5), (3, -1.5))), TokenLogprobs(2, -0.25, ((2, -0.25), (1, -2.0)))]
    assert chat_logprobs(logprobs, text).model_dump() == {"content": [
        {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
            {"token": "a", "logprob": -0.5, "bytes": [97]}, {"token": "c", "logprob": -1.5, "bytes": [99]}]},
        {"token": "é", "logprob": -0.25, "bytes": [195, 169], "top_logprobs": [
            {"token": "é", "logprob": -0.25, "bytes": [195, 169]}, {"token": "a", "logprob": -2.0, "bytes": [97]}]},
    ], "refusal": None}
    assert completion_logprobs(logprobs, text, with_top=True, offset=10).model_dump() == {
        "tokens": ["a", "é"], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"a": -0.5, "c": -1.5},
                                                                                {"é": -0.25, "a": -2.0}],
        "text_offset": [10, 11]}
    assert completion_logprobs(logprobs, text, with_top=False).top_logprobs is None

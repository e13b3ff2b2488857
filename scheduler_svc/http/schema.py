"""The OpenAI-compatible HTTP API's schemas (pydantic) and their translation to and from the Generation API.

Requests are checked here only for their JSON shape and for the OpenAI fields this server does not serve;
everything else is translated into a GenerateRequest and validated by validation.validate_request, like a
gRPC call, so that both doors answer the same input the same way. Responses are built from the engine's
StreamChunks. Plain functions over plain data: no HTTP here (http_api.py serves these).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler_svc.request import FinishReason, RequestStats
from scheduler_svc.validation import MAX_COMPLETIONS
from specdec.pb import generation_pb2
from specdec.contracts import TokenLogprobs

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]


class InvalidField(ValueError):
    """A request field this server cannot serve as given; `param` names it (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# -- requests ------------------------------------------------------------------------------------------


class _Request(BaseModel):
    # Unknown fields are refused (as OpenAI does), so that a setting this server ignores never goes unnoticed.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: str
    content: str | list[TextPart] | None = None


class _GenerationRequest(_Request):
    """Fields completions and chat completions share."""

    model: str
    max_tokens: Int32 | None = None  # None: as many as the context and the server's limit allow
    temperature: float | None = None  # None: 1, OpenAI's default (0 = greedy)
    top_p: float | None = None
    n: Int32 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    # OpenAI fields served only at their neutral value.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (the Generation API's fields; the openai client sends them with extra_body).
    top_k: Int32 | None = None
    proposer: str | None = None
    ignore_eos: bool = False


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[Int32] | list[str] | list[list[Int32]]
    logprobs: Int32 | None = None  # the number of alternatives per token (0: the chosen token's only)
    echo: bool = False
    suffix: str | None = None
    best_of: Int32 | None = None


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    max_completion_tokens: Int32 | None = None
    logprobs: bool = False
    top_logprobs: Int32 | None = None


def _common_to_pb(body: _GenerationRequest, max_tokens: int | None) -> generation_pb2.GenerateRequest:
    if body.presence_penalty:
        raise InvalidField("presence_penalty", "presence_penalty is not supported (only 0)")
    if body.frequency_penalty:
        raise InvalidField("frequency_penalty", "frequency_penalty is not supported (only 0)")
    if body.logit_bias:
        raise InvalidField("logit_bias", "logit_bias is not supported")
    if body.stream_options is not None and not body.stream:
        raise InvalidField("stream_options", "stream_options is only allowed with stream: true")
    if body.n is not None and body.n < 1:
        raise InvalidField("n", f"n must be in 1..{MAX_COMPLETIONS}, got {body.n}")
    request = generation_pb2.GenerateRequest(
        max_tokens=max_tokens or 0,
        temperature=1.0 if body.temperature is None else body.temperature,
        n=body.n or 1,
        top_k=body.top_k or 0,
        proposer=body.proposer or "",
        ignore_eos=body.ignore_eos,
    )
    if body.top_p is not None:
        request.top_p = body.top_p
    if body.seed is not None:
        request.seed = body.seed
    if body.stop is not None:
        request.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    return request


def completion_to_pb(body: CompletionRequest) -> generation_pb2.GenerateRequest:
    """A completions request as a GenerateRequest (max_tokens 0 when the body has none: see
    validate_request's default_max_tokens). Raises InvalidField for what cannot be served."""
    if body.echo:
        raise InvalidField("echo", "echo is not supported")
    if body.suffix:
        raise InvalidField("suffix", "suffix is not supported")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidField("best_of", "best_of is not supported (only equal to n)")
    if body.logprobs is not None and body.logprobs < 0:
        raise InvalidField("logprobs", f"logprobs must be in 0..20, got {body.logprobs}")
    request = _common_to_pb(body, body.max_tokens)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidField("prompt", f"{len(prompt)} prompts in one request; this server takes one per request "
                                         "(send one request each, or use n for several completions)")
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    if body.logprobs is not None:
        request.logprobs = True
        request.top_logprobs = body.logprobs
    return request


def chat_to_pb(body: ChatCompletionRequest) -> generation_pb2.GenerateRequest:
    """A chat completions request as a GenerateRequest; raises InvalidField for what cannot be served."""
    if (body.max_tokens is not None and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens):
        raise InvalidField("max_completion_tokens", "max_tokens and max_completion_tokens differ; give one of them")
    if not body.messages:
        raise InvalidField("messages", "messages is empty: give at least one message")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    request = _common_to_pb(body, max_tokens)
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        request.messages.add(role=message.role, content=content or "")
    request.logprobs = body.logprobs
    request.top_logprobs = body.top_logprobs or 0
    return request


# -- responses -----------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ProposerSpeculation(BaseModel):
    steps: int  # engine steps in which this proposer served the request with k > 0
    proposed: int  # its candidate tokens that were verified
    accepted: int  # of those, accepted by the target


class Speculation(BaseModel):
    """Extension: how speculation went for the response (all its completions together)."""

    steps: int  # engine steps after the prefill
    proposed: int
    accepted: int
    proposers: dict[str, ProposerSpeculation]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    speculation: Speculation


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    speculation: Speculation | None = None  # on each completion's last chunk: that completion's


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    speculation: Speculation


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    speculation: Speculation | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specdec"
    max_model_len: int  # extension (as vLLM): the context length


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def finish_reason_name(reason: FinishReason | None) -> str | None:
    """OpenAI's finish_reason: "length" for max_tokens, "stop" for an EOS id or a stop string."""
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def speculation_of(stats: list[RequestStats]) -> Speculation:
    """The speculation counts of one or more completions, summed."""
    proposers: dict[str, ProposerSpeculation] = {}
    for s in stats:
        for name, c in s.proposers.items():
            total = proposers.setdefault(name, ProposerSpeculation(steps=0, proposed=0, accepted=0))
            total.steps += c.steps
            total.proposed += c.proposed
            total.accepted += c.accepted
    return Speculation(steps=sum(s.steps for s in stats), proposed=sum(s.proposed for s in stats),
                       accepted=sum(s.accepted for s in stats), proposers=dict(sorted(proposers.items())))


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(logprobs: list[TokenLogprobs], token_text) -> ChatLogprobs:
    """Chat logprobs of these tokens; `token_text(id)` decodes one token alone."""
    content = []
    for lp in logprobs:
        text = token_text(lp.token_id)
        content.append(ChatTokenLogprob(
            token=text, logprob=lp.logprob, bytes=_utf8(text),
            top_logprobs=[TopLogprob(token=(t := token_text(i)), logprob=v, bytes=_utf8(t)) for i, v in lp.top]))
    return ChatLogprobs(content=content)


def completion_logprobs(logprobs: list[TokenLogprobs], token_text, with_top: bool,
                        offset: int = 0) -> CompletionLogprobs:
    """Legacy completions logprobs of these tokens, their text offsets counted from `offset`."""
    tokens, offsets = [], []
    for lp in logprobs:
        tokens.append(token_text(lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    top = [{token_text(i): v for i, v in lp.top} for lp in logprobs] if with_top else None
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs], top_logprobs=top,
                              text_offset=offsets)

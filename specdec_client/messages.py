"""The Generation API's protobuf messages <-> the SDK's plain types, the same for the sync and async clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from specdec_client._pb import generation_pb2
from specdec_client.errors import SpecdecError
from specdec_client.types import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    LogprobCandidate,
    ModelInfo,
    ProposerStats,
    TokenLogprob,
)

# Chat messages: {"role": ..., "content": ...} mappings, or (role, content) pairs.
Messages = Sequence[Mapping[str, str] | tuple[str, str]]

_FINISH_REASONS = {
    generation_pb2.FINISH_REASON_LENGTH: FINISH_LENGTH,
    generation_pb2.FINISH_REASON_EOS: FINISH_EOS,
    generation_pb2.FINISH_REASON_STOP: FINISH_STOP,
}


def build_request(
    prompt: str | Sequence[int] | None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    proposer: str = "",
    ignore_eos: bool = False,
    n: int = 1,
    logprobs: bool = False,
    top_logprobs: int = 0,
    messages: Messages | None = None,
) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; a prompt given as a sequence of ints is sent as token ids,
    chat `messages` (with prompt None) go through the server's chat template."""
    request = generation_pb2.GenerateRequest(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, proposer=proposer, ignore_eos=ignore_eos,
        n=n, logprobs=logprobs or top_logprobs > 0, top_logprobs=top_logprobs,
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.extend(int(t) for t in prompt)
    for message in messages or ():
        role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message
        request.messages.add(role=role, content=content)
    # Optional fields stay unset (not 0) when not given: unset top_p means 1, unset seed means random.
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    if stop:
        request.stop.extend([stop] if isinstance(stop, str) else list(stop))
    return request


def stats_from_proto(message: generation_pb2.GenerationStats) -> GenerationStats:
    """Plain stats from the protobuf message."""
    return GenerationStats(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        steps=message.steps,
        proposed=message.proposed,
        accepted=message.accepted,
        proposers={
            name: ProposerStats(p.steps, p.proposed, p.accepted) for name, p in sorted(message.proposers.items())
        },
        time_to_first_token_ms=message.time_to_first_token_ms,
        total_ms=message.total_ms,
    )


def logprobs_from_proto(messages) -> list[TokenLogprob]:
    return [TokenLogprob(lp.token_id, lp.token, lp.logprob,
                         [LogprobCandidate(t.token_id, t.token, t.logprob) for t in lp.top_logprobs])
            for lp in messages]


def chunk_from_proto(message: generation_pb2.GenerateResponse) -> GenerationChunk:
    """One streamed message as a chunk; finish_reason and stats only on a completion's last one."""
    finish_reason = _FINISH_REASONS.get(message.finish_reason)
    return GenerationChunk(
        token_ids=list(message.token_ids),
        text=message.text,
        finish_reason=finish_reason,
        stats=stats_from_proto(message.stats) if finish_reason is not None else None,
        index=message.index,
        logprobs=logprobs_from_proto(message.logprobs) if message.logprobs else None,
    )


def _completion_from_proto(message, logprobs: bool) -> Completion:
    finish_reason = _FINISH_REASONS.get(message.finish_reason)
    if finish_reason is None:
        raise SpecdecError(f"the server returned a result without a finish reason ({message.finish_reason})")
    return Completion(text=message.text, token_ids=list(message.token_ids), finish_reason=finish_reason,
                      stats=stats_from_proto(message.stats),
                      logprobs=logprobs_from_proto(message.logprobs) if logprobs else None,
                      index=getattr(message, "index", 0))


def result_from_proto(message: generation_pb2.GenerateResult, logprobs: bool = False) -> GenerationResult:
    """A unary GenerateResult as a plain result (logprobs: whether they were asked for)."""
    # A server from before `completions` sends completion 0's fields only.
    completions = [_completion_from_proto(c, logprobs) for c in message.completions] or [
        _completion_from_proto(message, logprobs)]
    first = completions[0]
    return GenerationResult(first.text, first.token_ids, first.finish_reason, first.stats, first.logprobs, 0,
                            completions)


def model_info_from_proto(message: generation_pb2.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(model=message.model, context_length=message.context_length, vocab_size=message.vocab_size,
                     has_chat_template=message.has_chat_template, max_tokens_limit=message.max_tokens_limit,
                     eos_token_ids=list(message.eos_token_ids), proposers=list(message.proposers))


class Assembler:
    """Joins streamed chunks into the whole result, which exists once every completion's last chunk arrived."""

    def __init__(self, n: int = 1, logprobs: bool = False) -> None:
        self._text: list[list[str]] = [[] for _ in range(n)]
        self._token_ids: list[list[int]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprob]] | None = [[] for _ in range(n)] if logprobs else None
        self._done: list[Completion | None] = [None] * n
        self.result: GenerationResult | None = None

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self._token_ids)

    def add(self, chunk: GenerationChunk) -> None:
        i = chunk.index
        if not 0 <= i < len(self._done):
            raise SpecdecError(f"the server sent a chunk of completion {i} of {len(self._done)}")
        self._text[i].append(chunk.text)
        self._token_ids[i].extend(chunk.token_ids)
        if self._logprobs is not None and chunk.logprobs:
            self._logprobs[i].extend(chunk.logprobs)
        if chunk.is_last:
            assert chunk.finish_reason is not None and chunk.stats is not None
            self._done[i] = Completion("".join(self._text[i]), list(self._token_ids[i]), chunk.finish_reason,
                                       chunk.stats, None if self._logprobs is None else self._logprobs[i], i)
            if all(c is not None for c in self._done):
                first = self._done[0]
                self.result = GenerationResult(first.text, first.token_ids, first.finish_reason, first.stats,
                                               first.logprobs, 0, list(self._done))

    def finish(self) -> GenerationResult:
        if self.result is None:
            raise SpecdecError("the server ended the stream without the last message of every completion "
                               "(no finish reason)")
        return self.result

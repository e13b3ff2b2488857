"""GenerateRequest -> validated GenerationParams, or ValueError with a message a person can act on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from scheduler_svc.config import NO_PROPOSER
from scheduler_svc.request import GenerationParams
from specdec.pb import generation_pb2
from specdec.model.sampling import MAX_TOP_LOGPROBS, SamplingParams


# Stop strings a request may give, and their length: each is searched for at every output token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
# Longest piece of client input quoted back in an error message (a status message travels in metadata,
# whose size is limited: an unbounded echo would turn INVALID_ARGUMENT into a transport error).
MAX_QUOTED_CHARS = 64
# Completions one request may ask for (each is a request in the engine).
MAX_COMPLETIONS = 64
# Chat messages one request may hold, and the longest role name.
MAX_MESSAGES = 1024
MAX_ROLE_CHARS = 64


@dataclass(frozen=True)
class Limits:
    """What the served model and the scheduler allow."""

    vocab_size: int
    max_seq_len: int  # most tokens one request may hold (prompt + output)
    max_tokens_limit: int
    proposer_names: tuple[str, ...] = ()
    # Most bytes one token stands for: a text of more characters than max_seq_len times this cannot fit
    # the context, so it is refused before it is tokenised (work proportional to input is bounded first).
    max_token_bytes: int = 64

    @property
    def max_prompt_chars(self) -> int:
        return self.max_seq_len * self.max_token_bytes


def quoted(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """repr(value), cut to `limit` characters with the full length said: safe to put in an error message."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def validate_request(
    request: generation_pb2.GenerateRequest,
    limits: Limits,
    tokenize: Callable[[str], list[int]],
    render_chat: Callable[[list[dict[str, str]]], list[int]] | None = None,
    *,
    default_max_tokens: bool = False,
) -> GenerationParams:
    """Check every field of a GenerateRequest; tokenize a text prompt, or render chat messages through the
    checkpoint's chat template (`render_chat`: messages -> token ids; None = the model has no chat template).
    Raises ValueError on bad input.

    default_max_tokens: max_tokens 0 means "as many as the context and the server's limit allow" (the HTTP
    API's max_tokens is optional); otherwise it must be >= 1.
    """
    has_text, has_ids, has_chat = bool(request.prompt), len(request.prompt_token_ids) > 0, len(request.messages) > 0
    if has_text + has_ids + has_chat > 1:
        given = [name for name, has in (("prompt", has_text), ("prompt_token_ids", has_ids), ("messages", has_chat))
                 if has]
        raise ValueError(f"give the prompt one way, not both: {' and '.join(given)} are set (prompt: text, "
                         "prompt_token_ids: token ids, messages: a chat)")
    if not has_text and not has_ids and not has_chat:
        raise ValueError("the prompt is empty: set prompt (text), prompt_token_ids or messages")
    sampling, seed = _validate_sampling(request)
    max_tokens = request.max_tokens
    if max_tokens <= 0 and not (default_max_tokens and max_tokens == 0):
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens > limits.max_tokens_limit:
        raise ValueError(f"max_tokens {max_tokens} is above this server's limit of {limits.max_tokens_limit}")
    _validate_proposer(request.proposer, limits.proposer_names)
    stop = tuple(request.stop)
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ValueError(f"a stop string has {max(len(s) for s in stop)} characters; at most {MAX_STOP_CHARS}")
    n = request.n or 1
    if not 1 <= n <= MAX_COMPLETIONS:
        raise ValueError(f"n must be in 1..{MAX_COMPLETIONS} (completions of the prompt), got {request.n}")
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.top_logprobs}")
    if request.top_logprobs and not request.logprobs:
        raise ValueError("top_logprobs needs logprobs set")
    if has_text and len(request.prompt) > limits.max_prompt_chars:
        raise ValueError(
            f"the prompt has {len(request.prompt)} characters, more than the model's context of "
            f"{limits.max_seq_len} tokens can hold (at most {limits.max_prompt_chars} characters)"
        )
    if has_ids and len(request.prompt_token_ids) >= limits.max_seq_len:
        raise ValueError(
            f"the prompt has {len(request.prompt_token_ids)} tokens; the model's context is {limits.max_seq_len} "
            f"tokens, so a prompt may have at most {limits.max_seq_len - 1}"
        )
    messages = _validate_messages(request.messages, limits) if has_chat else []
    if has_chat and render_chat is None:
        raise ValueError("this model has no chat template, so it cannot take chat messages: send a prompt instead "
                         "(or serve a checkpoint whose tokenizer_config.json or chat_template.jinja has one)")

    if has_ids:
        prompt_ids = list(request.prompt_token_ids)
    elif has_chat:
        prompt_ids = list(render_chat(messages))
    else:
        prompt_ids = list(tokenize(request.prompt))
    if not prompt_ids:
        raise ValueError("the prompt text encodes to no tokens")
    _validate_token_ids(prompt_ids, limits.vocab_size)
    if len(prompt_ids) + 1 > limits.max_seq_len:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {limits.max_seq_len} tokens, "
            f"so a prompt may have at most {limits.max_seq_len - 1}"
        )
    if max_tokens == 0:
        max_tokens = min(limits.max_tokens_limit, limits.max_seq_len - len(prompt_ids))
    if len(prompt_ids) + max_tokens > limits.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
            f"{limits.max_seq_len} tokens: lower max_tokens to at most {limits.max_seq_len - len(prompt_ids)} "
            "or shorten the prompt"
        )
    return GenerationParams(
        prompt_token_ids=tuple(prompt_ids),
        max_tokens=max_tokens,
        sampling=sampling,
        seed=seed,
        stop=stop,
        proposer=request.proposer,
        ignore_eos=request.ignore_eos,
        n=n,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
    )


def prompt_chars(request: generation_pb2.GenerateRequest) -> int:
    """Characters to tokenise (prompt text or chat contents): what decides whether it is worth a thread."""
    return len(request.prompt) + sum(len(m.content) for m in request.messages)


def _validate_messages(messages: Sequence[generation_pb2.ChatMessage], limits: Limits) -> list[dict[str, str]]:
    """Chat messages as the dicts a chat template reads, bounded before the template renders them."""
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"{len(messages)} chat messages; at most {MAX_MESSAGES}")
    chars = 0
    for i, message in enumerate(messages):
        if not message.role:
            raise ValueError(f"messages[{i}] has no role (e.g. 'system', 'user', 'assistant')")
        if len(message.role) > MAX_ROLE_CHARS:
            raise ValueError(f"messages[{i}].role has {len(message.role)} characters; at most {MAX_ROLE_CHARS}")
        chars += len(message.content)
    if chars > limits.max_prompt_chars:
        raise ValueError(
            f"the messages have {chars} characters, more than the model's context of {limits.max_seq_len} tokens "
            f"can hold (at most {limits.max_prompt_chars} characters)"
        )
    return [{"role": m.role, "content": m.content} for m in messages]


def _validate_sampling(request: generation_pb2.GenerateRequest) -> tuple[SamplingParams, int | None]:
    temperature = request.temperature
    if math.isnan(temperature) or temperature < 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    top_p = 1.0
    if request.HasField("top_p"):
        top_p = request.top_p
        if math.isnan(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if request.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no limit), got {request.top_k}")
    seed = request.seed if request.HasField("seed") else None
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=request.top_k), seed


def _validate_proposer(name: str, configured: Sequence[str]) -> None:
    if name in ("", NO_PROPOSER) or name in configured:
        return
    have = f"the configured proposers are {', '.join(configured)}" if configured else "no proposer is configured"
    raise ValueError(
        f"unknown proposer {quoted(name)}: {have}; use {NO_PROPOSER!r} for no speculation, or leave it empty for the "
        "server's choice"
    )


def _validate_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    for i, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"prompt_token_ids[{i}] = {token} is outside the vocabulary (valid ids are 0..{vocab_size - 1})"
            )

"""The held-out chat prompt set: loading and validation.

The set lives in bench/prompts/chat_heldout.jsonl (see bench/prompts/README.md): one JSON object a line,
{"id", "category", "messages": [{"role", "content"}, ...], "source"}. It is for demos and benchmarks
only and must never be used for training. `load_chat_prompts` reads a file in that format and raises
ValueError, naming the file and line, on the first line that breaks the rules below. The default
path is resolved from this file, so it exists in a source checkout, not in an installed copy (the
Docker image does not carry bench/): pass `path` there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The categories as Spec-Bench groups its prompts.
CATEGORIES = ("multi_turn", "coding", "math_reasoning", "qa", "summarization", "rewriting", "extraction")
ROLES = ("system", "user", "assistant")
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "bench" / "prompts" / "chat_heldout.jsonl"


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    id: str
    category: str  # one of CATEGORIES
    messages: tuple[Message, ...]  # ends with a user message
    source: str  # where the text comes from

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as [{"role": ..., "content": ...}], the form chat templates take."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _parse_line(obj: object, where: str) -> ChatPrompt:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "category", "source"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    pid = obj["id"]
    if obj["category"] not in CATEGORIES:
        raise ValueError(f"{where}: prompt {pid!r} has unknown category {obj['category']!r} "
                         f"(known: {', '.join(CATEGORIES)})")
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: prompt {pid!r}: 'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: prompt {pid!r}, message {i}: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: prompt {pid!r}, message {i}: unknown role {role!r} "
                             f"(known: {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{where}: prompt {pid!r}, message {i}: empty content")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: prompt {pid!r}, message {i}: a system message may only come first")
        messages.append(Message(role, content))
    if messages[-1].role != "user":
        raise ValueError(f"{where}: prompt {pid!r}: the last message must be from the user, "
                         f"not {messages[-1].role!r}")
    return ChatPrompt(pid, obj["category"], tuple(messages), obj["source"])


def load_chat_prompts(path: str | Path | None = None) -> list[ChatPrompt]:
    """The prompts in `path` (default: the repository's bench/prompts/chat_heldout.jsonl), in file order.

    Blank lines are skipped. Raises ValueError naming the file and line for: a line that is not a JSON
    object, a missing or empty id/category/source, an unknown category, an empty message list, an
    unknown role, empty content, a system message other than the first, a conversation whose last
    message is not from the user, and an id used twice."""
    path = Path(path) if path is not None else DEFAULT_PATH
    prompts: list[ChatPrompt] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            prompt = _parse_line(obj, where)
            if prompt.id in seen:
                raise ValueError(f"{where}: duplicate id {prompt.id!r} (first on line {seen[prompt.id]})")
            seen[prompt.id] = lineno
            prompts.append(prompt)
    return prompts

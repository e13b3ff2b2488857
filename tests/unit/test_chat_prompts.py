"""The held-out chat prompt set (bench/prompts/chat_heldout.jsonl) and its loader."""

import json
from collections import Counter

import pytest

from specdec.ops.chat_prompts import CATEGORIES, DEFAULT_PATH, ChatPrompt, Message, load_chat_prompts

PASSAGE_CATEGORIES = ("summarization", "rewriting", "extraction")


@pytest.fixture(scope="module")
def prompts():
    return load_chat_prompts()


def test_shipped_file_loads_with_enough_prompts_per_category(prompts):
    assert DEFAULT_PATH.name == "chat_heldout.jsonl" and DEFAULT_PATH.is_file()
    assert len(prompts) >= 120
    counts = Counter(p.category for p in prompts)
    assert set(counts) == set(CATEGORIES)
    assert all(counts[c] >= 18 for c in CATEGORIES), counts
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(isinstance(p, ChatPrompt) and p.source.strip() for p in prompts)


def test_conversations_are_well_formed(prompts):
    for p in prompts:
        roles = [m.role for m in p.messages]
        assert roles[-1] == "user", p.id
        # Strictly alternating user/assistant turns after an optional leading system message.
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns == ["user", "assistant"] * (len(turns) // 2) + ["user"], p.id
        n_user = roles.count("user")
        if p.category == "multi_turn":
            assert n_user >= 2, p.id
        else:
            assert n_user == 1, p.id
        # Short enough for a small model's context: about 400 tokens at most.
        assert sum(len(m.content) for m in p.messages) <= 1600, p.id


def test_passage_prompts_carry_their_passage(prompts):
    for p in prompts:
        if p.category in PASSAGE_CATEGORIES:
            text = p.messages[-1].content
            assert len(text) >= 300, p.id
            assert "\n\n" in text, p.id  # the instruction, then the passage


def test_as_dicts_gives_the_chat_template_form(prompts):
    p = next(p for p in prompts if p.category == "multi_turn")
    assert p.as_dicts() == [{"role": m.role, "content": m.content} for m in p.messages]
    assert isinstance(p.messages, tuple) and all(isinstance(m, Message) for m in p.messages)


def _line(**overrides):
    obj = {"id": "x-1", "category": "qa", "messages": [{"role": "user", "content": "Why?"}], "source": "test"}
    obj.update(overrides)
    return json.dumps(obj)


def test_loader_reads_a_small_valid_file(tmp_path):
    f = tmp_path / "ok.jsonl"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    f.write_text(_line() + "\n\n" + _line(id="x-2", category="multi_turn", messages=convo) + "\n")
    got = load_chat_prompts(f)
    assert [p.id for p in got] == ["x-1", "x-2"]
    assert got[1].messages[0] == Message("system", "Be brief.")


@pytest.mark.parametrize("lines, match", [
    ([_line(messages=[{"role": "bot", "content": "Hi"}])], "unknown role 'bot'"),
    ([_line(messages=[{"role": "user", "content": "   "}])], "empty content"),
    ([_line(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])],
     "last message must be from the user"),
    ([_line(), _line()], "duplicate id 'x-1'"),
    ([_line(category="poetry")], "unknown category 'poetry'"),
    ([_line(messages=[])], "'messages' must be a non-empty list"),
    ([_line(id="")], "'id' must be a non-empty string"),
    ([_line(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                      {"role": "user", "content": "c"}])], "system message may only come first"),
    (["{not json"], "not valid JSON"),
    (["[1, 2]"], "expected a JSON object"),
])
def test_loader_rejects_bad_lines(tmp_path, lines, match):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match) as info:
        load_chat_prompts(f)
    assert f"{f}:{len(lines)}" in str(info.value)  # names the file and the offending line

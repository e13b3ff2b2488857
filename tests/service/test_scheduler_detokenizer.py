"""Incremental detokenization and stop strings (scheduler_svc/detokenizer.py)."""

from __future__ import annotations

import random

import pytest

from scheduler_svc.detokenizer import IncrementalDetokenizer
from test_scheduler_fakes import TOKENIZER

# A toy byte-level vocabulary: token i is a byte string; "é" (c3 a9) and "日" (e6 97 a5) are split.
PIECES = [b"", b"a", b"b", b"\n", b"\xc3", b"\xa9", b"\xe6", b"\x97", b"\xa5", b"END", b" ", b"EN", b"D!"]


def toy_decode(ids) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def feed(detok: IncrementalDetokenizer, ids) -> list[str]:
    return [detok.add(i).text for i in ids]


def test_text_arrives_with_each_token_and_split_characters_wait_for_their_last_byte():
    detok = IncrementalDetokenizer(toy_decode)
    assert feed(detok, [1, 4, 5, 2, 6, 7, 8, 3]) == ["a", "", "é", "b", "", "", "日", "\n"]
    assert detok.flush() == ""
    assert detok.text == "aéb日\n"


def test_flush_gives_an_unfinished_character_at_the_end():
    detok = IncrementalDetokenizer(toy_decode)
    assert feed(detok, [1, 6]) == ["a", ""]
    assert detok.flush() == "\ufffd"


def test_the_prompt_is_context_only():
    detok = IncrementalDetokenizer(toy_decode, prompt_ids=[1, 1, 4])  # ends in half a character
    # As when decoding the output alone: its half character cannot be completed.
    assert feed(detok, [5, 2]) == ["", "\ufffdb"] == ["", toy_decode([5, 2])]
    detok = IncrementalDetokenizer(toy_decode, prompt_ids=[1, 2, 3])
    assert feed(detok, [2]) == ["b"]


def test_stop_string_within_one_token_cuts_before_it():
    detok = IncrementalDetokenizer(toy_decode, stop=["END"])
    assert feed(detok, [1, 10])[-1] == " "
    piece = detok.add(9)
    assert piece.stopped and piece.text == ""
    assert detok.text == "a " and detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.add(1)


def test_text_that_may_start_a_stop_string_is_held_then_released():
    detok = IncrementalDetokenizer(toy_decode, stop=["END!x"])
    # "EN" could start "END!x": held; "D!" still could; then "a" rules it out: all of it comes at once.
    assert feed(detok, [1, 11, 12, 1]) == ["a", "", "", "END!a"]


def test_stop_string_across_tokens_and_the_earliest_of_several_wins():
    detok = IncrementalDetokenizer(toy_decode, stop=["D!", "b\nEN"])
    texts = feed(detok, [1, 2, 3])
    assert texts == ["a", "", ""]  # "b" and "b\n" may start "b\nEN"
    piece = detok.add(11)
    assert piece.stopped and piece.text == ""
    assert detok.text == "a"


def test_a_stop_string_in_a_token_with_text_before_it():
    detok = IncrementalDetokenizer(toy_decode, stop=["D"])
    assert feed(detok, [1])[0] == "a"
    piece = detok.add(9)  # "END"
    assert piece.stopped and piece.text == "EN" and detok.text == "aEN"


def test_real_tokenizer_streamed_text_equals_decoding_everything():
    text = "def f(x):\n    return 'héllo wörld 日本'  # ok\n"
    ids = TOKENIZER.encode(text)
    prompt = TOKENIZER.encode("print(1)\n")
    detok = IncrementalDetokenizer(TOKENIZER.decode, prompt, stop=["never there"])
    streamed = "".join(feed(detok, ids)) + detok.flush()
    assert streamed == TOKENIZER.decode(ids) == text


def test_real_tokenizer_stop_string():
    ids = TOKENIZER.encode("x = 1\n\nclass A:\n    pass\n")
    detok = IncrementalDetokenizer(TOKENIZER.decode, [], stop=["\n\nclass"])
    out, stopped_at = [], None
    for i, t in enumerate(ids):
        piece = detok.add(t)
        out.append(piece.text)
        if piece.stopped:
            stopped_at = i
            break
    assert "".join(out) == "x = 1"
    assert stopped_at is not None and "\n\nclass" in TOKENIZER.decode(ids[: stopped_at + 1])
    assert "\n\nclass" not in TOKENIZER.decode(ids[:stopped_at])


def test_streaming_with_stop_strings_equals_cutting_the_whole_text():
    """Random outputs and stop strings: the stream always equals decoding everything, cut at the first stop."""
    rng = random.Random(0)
    for trial in range(300):
        ids = [rng.randrange(1, 4096) for _ in range(rng.randrange(1, 25))]
        whole = TOKENIZER.decode(ids)
        stops = []
        for _ in range(rng.randrange(0, 3)):
            start = rng.randrange(len(whole) or 1)
            snippet = whole[start : start + rng.randrange(1, 6)]
            # A piece of the text, else something absent. (U+FFFD marks bytes still to come, which
            # the detokenizer holds back, so a stop string with it is seen one token late.)
            if rng.random() < 0.7 and snippet and "\ufffd" not in snippet:
                stops.append(snippet)
            else:
                stops.append("\x00never")
        detok = IncrementalDetokenizer(TOKENIZER.decode, [rng.randrange(1, 4096)], stops)
        out, stopped_at = [], None
        for i, t in enumerate(ids):
            piece = detok.add(t)
            out.append(piece.text)
            if piece.stopped:
                stopped_at = i
                break
        if stopped_at is None:
            out.append(detok.flush())
        hits = [whole.find(s) for s in stops if s in whole]
        assert "".join(out) == (whole[: min(hits)] if hits else whole), (trial, ids, stops)
        if hits:  # stopped at the first token whose text completes a stop string
            first = next(i for i in range(len(ids) + 1) if any(s in TOKENIZER.decode(ids[:i]) for s in stops))
            assert stopped_at == first - 1, (trial, ids, stops)

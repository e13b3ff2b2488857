"""Incremental detokenization and stop strings.

Text is streamed as tokens arrive. Two things are held back until they are settled:
- bytes of an incomplete character (byte-level BPE splits UTF-8 characters across tokens; the
  decoder shows them as U+FFFD until the last byte arrives);
- text that may be the start of a stop string ("\\n\\n" held while the stop is "\\n\\nclass").
A stop string ends the request: the text is cut right before it, and the token that completed it is
the last token reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

# Prompt tokens decoded ahead of the output so that tokenizers whose pieces depend on what precedes
# them (sentencepiece's leading space) give the same text as decoding the whole sequence.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[Sequence[int]], str]


@dataclass
class DetokenizedToken:
    """The text one token adds that may be sent now, and whether it completed a stop string."""

    text: str
    stopped: bool = False


class IncrementalDetokenizer:
    """Turns output tokens into text one token at a time, honouring stop strings.

    decode: token ids -> text (special tokens skipped). prompt_ids: the request's prompt, of which
    the last few tokens give the decoder its context.
    """

    def __init__(self, decode: Decode, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends inside a character gives no context for it: the output is then decoded
        # as if on its own (its first bytes show as U+FFFD, as in decoding the output alone).
        while self._ids and decode(self._ids).endswith(REPLACEMENT_CHAR):
            self._ids.pop()
        # ids[prefix:read] decode to text already produced; ids[read:] are not yet turned into text.
        self._prefix = 0
        self._read = len(self._ids)
        self._stops = tuple(stop)
        self._text = ""  # output text decoded so far (complete characters only)
        self._sent = 0  # characters of _text already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """Output text handed out so far."""
        return self._text[: self._sent]

    def add(self, token_id: int) -> DetokenizedToken:
        """Add one output token; returns the text that can be sent now."""
        if self.stopped:
            raise RuntimeError("add() after a stop string ended the output")
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self._text += full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """At the end (length or EOS): everything held back, incomplete characters included."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._text += full_text[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        out = self._text[self._sent :]
        self._sent = len(self._text)
        return out

    def _release(self) -> DetokenizedToken:
        """Cut at the first stop string, else hand out the settled text minus a possible stop prefix."""
        text = self._text
        # Sent text holds no stop string, and since a possible start of one is always held back, one
        # not found yet starts in the unsent text: the search can start there.
        hit = _first_stop(text, self._stops, self._sent)
        if hit is not None:
            out = text[self._sent : hit]
            self._text = text[:hit]
            self._sent = hit
            self.stopped = True
            return DetokenizedToken(out, stopped=True)
        end = len(text) - _held_back(text, self._stops, self._sent)
        out = text[self._sent : end]
        self._sent = end
        return DetokenizedToken(out)


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index of the earliest occurrence of any stop string in text[start:], or None."""
    best = None
    for stop in stops:
        i = text.find(stop, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: Sequence[str], sent: int) -> int:
    """Length of the longest unsent suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text) - sent), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest

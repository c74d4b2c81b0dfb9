"""Turning generated token ids into text pieces a client can be sent, one token at a time.

Decoding token by token breaks multi-byte characters and words whose spelling depends on
their neighbours, so each new piece is the difference between decoding a short window
with and without the newest tokens (the approach of TGI and vLLM). Text that could be the
start of a stop string is held back until it is clear it is not one; the stop string
itself is never sent.
"""

from __future__ import annotations

from typing import Sequence


class IncrementalText:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Take one token; return the text that may be sent now. Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: return what is still held back (incomplete characters included)."""
        if not self.stopped and self._read_offset < len(self.ids):
            before = self._decode(self.ids[self._prefix_offset : self._read_offset])
            after = self._decode(self.ids[self._prefix_offset :])
            self.text += after[len(before) :]
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        hits = [pos for pos in (self.text.find(s, self.sent) for s in self.stop) if pos >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            self.text = self.text[:end]
        elif not final:
            end -= _held_back(self.text, self.stop, self.sent)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece


def _held_back(text: str, stops: Sequence[str], start: int) -> int:
    """Length of the longest end of `text` (after `start`) that begins some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest

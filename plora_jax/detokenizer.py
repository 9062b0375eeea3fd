"""Incremental detokenization with stop strings, for streaming.

Text is produced by decoding a sliding window of ids and emitting only what the newest ids add;
a delta that ends in U+FFFD (a multi-byte character cut between tokens) is held back until the
next token completes it, so streamed text never carries broken characters. A few prompt ids
seed the window, so tokenizers that encode a leading space into the next token (SentencePiece
style) decode the first output token as they would in context.

Stop strings are searched in the text as it grows. While the request runs, the last
`len(longest stop string) - 1` characters are held back, because they might be the start of a
stop string; when a stop string is found the text is cut before it (or after it, with
`include_stop_str_in_output`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

_CONTEXT_IDS = 4


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ):
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_IDS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._include_stop = include_stop_str_in_output
        self._skip_special = skip_special_tokens
        self.text = ""  # all decoded output text (cut at a stop string once found)
        self._emitted = 0  # characters of `text` already handed out
        self.stop_string: str | None = None

    def add_token(self, token_id: int) -> None:
        if self.stop_string is not None:
            return
        self._ids.append(token_id)
        self._advance(final=False)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return  # nothing new yet, or an incomplete character that a later token may complete
        start = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._check_stop(max(0, start - self._hold))

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip_special)

    def _check_stop(self, search_from: int) -> None:
        found = [(self.text.find(s, search_from), s) for s in self._stop]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, stop = min(found)
            self.stop_string = stop
            self.text = self.text[: index + len(stop) if self._include_stop else index]

    def take_delta(self, finished: bool) -> str:
        """New text to hand out; while running, text that may begin a stop string is held back.

        When the request has finished, bytes still waiting to complete a character are flushed
        (as U+FFFD, the way a full decode shows them).
        """
        if finished and self.stop_string is None:
            self._advance(final=True)
        end = (
            len(self.text)
            if finished or self.stop_string is not None
            else max(len(self.text) - self._hold, self._emitted)
        )
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

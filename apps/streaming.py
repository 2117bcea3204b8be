"""Streamed answers: token ids in, certain text out, with a bounded amount of decoding per token.

`IncrementalDetokenizer` turns a growing list of token ids into text without decoding the whole list
again at each step. It keeps two offsets into the ids (the "prefix offset" technique of text-generation
servers): `prefix` .. `read` is a short window of ids already turned into text, kept as context because
a token's text can depend on its neighbours (a leading space dropped at the start of a decode, bytes of
one character split across tokens). Each new token decodes `ids[prefix:]` and `ids[prefix:read]`; what
the former adds to the latter is the new text, unless it ends in U+FFFD (half of a multi-byte character,
whose other bytes are still to come). Then the window moves on: `prefix = read`, `read = len(ids)`.

`StreamedText` is transformers' streamer interface (`put`/`end`, plus this project's `rewind`) over that
detokeniser, holding back text that may be the start of a stop sequence. `swarm-chat`'s terminal printer
and the HTTP API's collector are thin users of it.
"""

from __future__ import annotations

from typing import Callable

import torch

from apps.api.text import sendable

MAX_UNFINISHED = 8  # tokens without a whole new character before their text is passed on as it is


class IncrementalDetokenizer:
    """The text of a growing list of token ids, decoding a few recent ids per new token."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self._pieces: list[str] = []  # the text so far, in the pieces push() returned
        self._chars = 0  # characters in those pieces
        self._prefix = self._read = 0
        self._prefix_text: str | None = ""  # decode(tokens[prefix:read]), None until needed again
        self._marks: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]  # (pieces, chars, prefix, read) per count

    @property
    def text(self) -> str:
        """The text of the tokens so far, less a trailing unfinished character."""
        return "".join(self._pieces)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self.tokens.append(token)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.tokens[self._prefix:self._read])
        new_text = self._decode(self.tokens[self._prefix:])
        grew = len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd")
        if grew or len(self.tokens) - self._read >= MAX_UNFINISHED:  # the latter: not text, or not valid UTF-8
            piece = new_text[len(self._prefix_text):]
            self._prefix, self._read, self._prefix_text = self._read, len(self.tokens), None
            if piece:
                self._pieces.append(piece)
                self._chars += len(piece)
        else:
            piece = ""
        self._marks.append((len(self._pieces), self._chars, self._prefix, self._read))
        return piece

    def flush(self) -> str:
        """The text of the tokens not passed on yet (an unfinished character's U+FFFD included), added to
        the text: for the end of an answer."""
        if self._read == len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        piece = self._decode(self.tokens[self._prefix:])[len(prefix_text):]
        self._prefix, self._read, self._prefix_text = self._read, len(self.tokens), None
        if piece:
            self._pieces.append(piece)
            self._chars += len(piece)
        self._marks[-1] = (len(self._pieces), self._chars, self._prefix, self._read)
        return piece

    def rewind(self, kept: int) -> None:
        """Drop all but the first `kept` tokens, and their text."""
        kept = max(0, min(kept, len(self.tokens)))
        del self.tokens[kept:], self._marks[kept + 1:]
        pieces, self._chars, self._prefix, self._read = self._marks[kept]
        del self._pieces[pieces:]
        self._prefix_text = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


class StreamedText:
    """A streamer (transformers' `put`/`end`, and `rewind`) passing the answer's certain text to `on_text`:
    whole characters only, and never text that may be the start of one of the `stop` sequences. The
    answer ends at the first stop sequence (`stopped`); the sequence itself is not part of it.

    The first `put` carries the prompt, and is skipped: only new tokens are decoded.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), on_text: Callable[[str], None] | None = None):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop, self.on_text = stop, on_text
        self.stopped = False
        self._sent: list[str] = []
        self._chars_sent = 0
        self._sent_after: list[int] = [0]  # characters sent after each token
        self._pending = ""  # decoded, not sent yet: it may begin a stop sequence
        self._seen_prompt = False

    @property
    def tokens(self) -> list[int]:
        return self.detokenizer.tokens

    @property
    def sent(self) -> str:
        """The text passed on so far."""
        return "".join(self._sent)

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # the first call carries the prompt
            self._seen_prompt = True
            return
        for token in value.view(-1).tolist():
            self.add(int(token))

    def add(self, token: int) -> None:
        """One new token."""
        piece = self.detokenizer.push(token)
        if piece and not self.stopped:
            self._pass_on(piece, final=False)
        self._sent_after.append(self._chars_sent)

    def rewind(self, kept_new_tokens: int) -> None:
        """The newest tokens were dropped: go on from the text of the first `kept_new_tokens` (text already
        passed on cannot be taken back; what is passed on next follows the kept text)."""
        kept = max(0, min(kept_new_tokens, len(self.tokens)))
        self.detokenizer.rewind(kept)
        del self._sent_after[kept + 1:]
        text, self._chars_sent = self.detokenizer.text, self._sent_after[kept]
        self._sent, self._pending = [text[:self._chars_sent]], text[self._chars_sent:]
        self.stopped = False  # a stop sequence ends the answer: nothing is generated after it to rewind

    def end(self) -> None:
        pass

    def finish(self) -> str:
        """Pass on the rest of the text (an unfinished last character too); return the whole answer."""
        if not self.stopped:
            self._pass_on(self.detokenizer.flush(), final=True)
            self._sent_after[-1] = self._chars_sent
        return self.sent

    def _pass_on(self, piece: str, final: bool) -> None:
        self._pending += piece
        # A stop sequence cannot straddle the text sent and the pending text: sendable() held back any
        # start of one, so only the pending text needs searching.
        certain, self.stopped = sendable(self._pending, self.stop, final)
        self._pending = "" if self.stopped else self._pending[len(certain):]
        if certain:
            self._sent.append(certain)
            self._chars_sent += len(certain)
            if self.on_text is not None:
                self.on_text(certain)

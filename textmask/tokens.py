"""Token map: which context positions of an encoded prompt belong to a word or phrase.

Long prompts are encoded the way ComfyUI and A1111 do: 75-token windows, each wrapped as
[BOS] tokens [EOS] [PAD…] to 77, concatenated along the sequence. Window w, slot s sits at
context position ``w * 77 + 1 + s``.
"""

from __future__ import annotations

import re
from typing import Sequence
from dataclasses import dataclass

from .errors import PhraseNotFoundError, TextMaskError

BOS, EOS = 49406, 49407  # CLIP's start and end tokens (SD1/SD2/SDXL alike)
WINDOW = 75  # content tokens per window
CONTEXT = WINDOW + 2  # with BOS and EOS
MAX_WORD_TOKENS = 8  # words this long or longer may be split across windows (ComfyUI's rule)


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt: content token ids (no BOS/EOS) with the character span of each."""

    text: str
    ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]

    def words(self) -> list[list[int]]:
        """Group token indices into words: a word ends where the next token does not touch it."""
        groups: list[list[int]] = []
        for i, (start, _end) in enumerate(self.spans):
            if groups and self.spans[groups[-1][-1]][1] == start and not self.text[start - 1 : start].isspace():
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups


def split_windows(tokens: PromptTokens, window: int = WINDOW, max_word: int = MAX_WORD_TOKENS) -> list[list[int]]:
    """Split token indices into windows of at most ``window``, keeping short words whole."""
    windows: list[list[int]] = [[]]
    for word in tokens.words():
        current = windows[-1]
        if len(current) + len(word) > window and len(word) < max_word:
            windows.append([])
            current = windows[-1]
        for i in word:
            if len(current) == window:
                windows.append([])
                current = windows[-1]
            current.append(i)
    return windows


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """A case-insensitive, word-bounded pattern for ``phrase`` that tolerates any whitespace between words."""
    words = phrase.split()
    if not words:
        raise TextMaskError("empty phrase")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


class TokenMap:
    """Maps phrases of one prompt to positions in its encoded context sequence.

    By default the tokens are laid out in textmask's own 75-token windows; a host that chunks prompts
    itself (ComfyUI, A1111) passes the context position of each token instead.
    """

    def __init__(
        self,
        tokens: PromptTokens,
        windows: list[list[int]] | None = None,
        positions: list[int] | None = None,
        context_length: int | None = None,
    ):
        self.tokens = tokens
        if positions is None:
            self.windows = windows or split_windows(tokens)
            positions = [0] * len(tokens.ids)
            for w, win in enumerate(self.windows):
                for s, i in enumerate(win):
                    positions[i] = w * CONTEXT + 1 + s
            context_length = CONTEXT * len(self.windows)
        elif len(positions) != len(tokens.ids):
            raise ValueError("one context position per token is needed")
        self._position = dict(enumerate(positions))
        self.context_length = context_length if context_length is not None else max(positions, default=0) + 1

    def occurrences(self, phrase: str) -> list[list[int]]:
        """Context positions of each occurrence of ``phrase``, in text order; raises PhraseNotFoundError if absent."""
        found = []
        for m in phrase_pattern(phrase).finditer(self.tokens.text):
            start, end = m.span()
            positions = [self._position[i] for i, (a, b) in enumerate(self.tokens.spans) if a < end and b > start]
            if positions:
                found.append(positions)
        if not found:
            raise PhraseNotFoundError(f"'{phrase}' is not in the prompt '{self.tokens.text}'")
        return found

    def find(self, phrase: str) -> list[int]:
        """Context positions of every occurrence of ``phrase``; raises PhraseNotFoundError if absent."""
        return sorted({p for occurrence in self.occurrences(phrase) for p in occurrence})


def token_map_from_chunks(chunks: Sequence[Sequence[tuple[int, str | None]]]) -> TokenMap:
    """A TokenMap from a host's own chunking: per chunk, (token id, BPE piece) for each context position,
    piece None for start, end and padding. Words are rebuilt from the pieces ("</w>" ends a word)."""
    ids, spans, positions = [], [], []
    text, offset = "", 0
    for chunk in chunks:
        for j, (tok, piece) in enumerate(chunk):
            if piece is None:
                continue
            ends_word = piece.endswith("</w>")
            piece = piece[: -len("</w>")] if ends_word else piece
            ids.append(int(tok))
            spans.append((len(text), len(text) + len(piece)))
            positions.append(offset + j)
            text += piece + (" " if ends_word else "")
        offset += len(chunk)
    return TokenMap(PromptTokens(text.rstrip(), tuple(ids), tuple(spans)), positions=positions, context_length=offset)


STREAM_SEPARATOR = "\n|\n"  # between text streams' rebuilt texts: no phrase matches across it


def token_map_from_streams(streams: Sequence[Sequence[tuple[int, str, int]]], context_length: int,
                           offset: int = 0) -> TokenMap:
    """A TokenMap over an MM-DiT's text streams (SD3: CLIP, then T5; Flux: T5), each a list of (token id, piece,
    context position) for its content tokens. Words are rebuilt from the pieces (CLIP's "</w>" ends a word,
    SentencePiece's "▁" starts one) and the streams joined by ``STREAM_SEPARATOR``, so a phrase finds its tokens in
    every stream. ``offset`` shifts every position (tokens the model puts before the text, such as SD3's registers).
    """
    ids, spans, positions, text = [], [], [], ""
    for stream in streams:
        if text:
            text += STREAM_SEPARATOR
        bare = []  # T5's lone "▁" pieces (before "a", digits, punctuation): they belong to the next piece's word
        for tok, piece, position in stream:
            if piece.startswith("▁"):  # SentencePiece: a new word
                piece = piece[1:]
                if text and not text[-1].isspace():
                    text += " "
            ends_word = piece.endswith("</w>")
            piece = piece[: -len("</w>")] if ends_word else piece
            if not piece:
                bare.append((tok, position))
                continue
            span = (len(text), len(text) + len(piece))
            for tok_, position_ in [*bare, (tok, position)]:
                ids.append(int(tok_))
                spans.append(span)
                positions.append(offset + position_)
            bare = []
            text += piece + (" " if ends_word else "")
    return TokenMap(PromptTokens(text.rstrip(), tuple(ids), tuple(spans)), positions=positions,
                    context_length=offset + context_length)

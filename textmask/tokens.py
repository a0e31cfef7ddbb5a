"""Token map: which context positions of an encoded prompt belong to a word or phrase.

Long prompts are encoded the way ComfyUI and A1111 do: 75-token windows, each wrapped as
[BOS] tokens [EOS] [PAD…] to 77, concatenated along the sequence. Window w, slot s sits at
context position ``w * 77 + 1 + s``.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

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


_LETTERS = re.compile(r"[^\W\d_]+")  # a run of letters: one word to CLIP (digits and symbols stand alone)


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """A case-insensitive pattern for ``phrase`` that never starts or ends inside a word. Whitespace is required
    between two runs of letters and optional around digits and punctuation: CLIP's tokens do not say whether it was
    there ("red-car" and "red - car" are the same tokens), so a phrase finds the same tokens whether the map holds
    the prompt as typed or rebuilt from a host's tokens."""
    units = re.findall(r"[^\W\d_]+|\S", phrase)
    if not units:
        raise TextMaskError("empty phrase")
    body = re.escape(units[0])
    for before, unit in itertools.pairwise(units):
        gap = r"\s+" if _LETTERS.fullmatch(before) and _LETTERS.fullmatch(unit) else r"\s*"
        body += gap + re.escape(unit)
    # a phrase neither starts nor ends inside a run of letters; digits and punctuation are words of their own to CLIP
    start = r"(?<![^\W\d_])" if _LETTERS.match(units[0]) else ""
    end = r"(?![^\W\d_])" if _LETTERS.match(units[-1]) else ""
    return re.compile(start + body + end, re.IGNORECASE)


STREAM_SEPARATOR = "\n|\n"  # between text streams' rebuilt texts: no phrase matches across it


class TokenMap:
    """Maps phrases of one prompt to positions in its encoded context sequence.

    It holds the prompt's text, each content token's id and character span in that text, and each token's context
    position. The text is the prompt itself where textmask tokenizes it (diffusers), or rebuilt from the host's tokens
    (``token_map_from_streams``). By default the tokens are laid out in textmask's own 75-token windows; a host that
    chunks prompts itself (ComfyUI, A1111, Forge) passes the context position of each token instead.
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
        found, in_text = [], False
        for m in phrase_pattern(phrase).finditer(self.tokens.text):
            in_text = True
            start, end = m.span()
            positions = [self._position[i] for i, (a, b) in enumerate(self.tokens.spans) if a < end and b > start]
            if positions:
                found.append(positions)
        if not found:
            def short(text: str) -> str:  # one line, however long the texts
                return text if len(text) <= 120 else text[:117] + "..."

            if in_text:  # the text has it, but past the tokens the encoders keep
                raise PhraseNotFoundError(f"'{short(phrase)}' comes after the tokens the model's text encoders read; "
                                          "shorten the prompt, or name it earlier")
            if "<unk>" in self.prompt:  # the prompt as read has characters its tokenizer lacks (Flux's T5: CJK, emoji)
                raise PhraseNotFoundError(f"'{short(phrase)}' is not among the tokens the model's text encoder has: it "
                                          "reads some of the prompt's characters as <unk>; name it in words it knows")
            raise PhraseNotFoundError(f"'{short(phrase)}' is not in the prompt '{short(self.prompt)}'")
        return found

    @property
    def prompt(self) -> str:
        """The prompt for messages: one line, and only the first text stream of a map that joins several."""
        return " ".join(self.tokens.text.split(STREAM_SEPARATOR)[0].split())

    def find(self, phrase: str) -> list[int]:
        """Context positions of every occurrence of ``phrase``; raises PhraseNotFoundError if absent."""
        return sorted({p for occurrence in self.occurrences(phrase) for p in occurrence})


def join_token_maps(maps: Sequence[TokenMap], shifts: Sequence[int], context_length: int) -> TokenMap:
    """The token map of pieces of several encodings joined along the tokens: each map's text a stream of its own (no
    phrase matches across two), each of its positions moved by its ``shifts`` entry."""
    text, ids, spans, positions = "", [], [], []
    for m, shift in zip(maps, shifts):
        if text:
            text += STREAM_SEPARATOR
        at = len(text)
        text += m.tokens.text
        ids += m.tokens.ids
        spans += [(a + at, b + at) for a, b in m.tokens.spans]
        positions += [shift + m._position[i] for i in range(len(m.tokens.ids))]
    return TokenMap(PromptTokens(text, tuple(ids), tuple(spans)), positions=positions, context_length=context_length)


def token_map_from_chunks(chunks: Sequence[Sequence[tuple[int, str | None]]]) -> TokenMap:
    """A TokenMap from a host's own CLIP chunking (ComfyUI, A1111): per chunk, (token id, BPE piece) for each context
    position, piece None for start, end and padding. The text is rebuilt as in ``token_map_from_streams``."""
    stream, offset = [], 0
    for chunk in chunks:
        stream += [(tok, piece, offset + j) for j, (tok, piece) in enumerate(chunk) if piece is not None]
        offset += len(chunk)
    return token_map_from_streams([stream], offset)


def token_map_from_streams(streams: Sequence[Sequence[tuple[int, str, int]]], context_length: int,
                           offset: int = 0) -> TokenMap:
    """A TokenMap over a host's text streams (ComfyUI's and A1111's CLIP chunks; SD3: CLIP, then T5; Flux: T5), each a
    list of (token id, piece, context position) for its content tokens. Each stream's text is rebuilt from its
    pieces (``_rebuild``) and the streams joined by ``STREAM_SEPARATOR``, so a phrase finds its tokens in every
    stream. ``offset`` shifts every position (tokens the model puts before the text, such as SD3's registers).
    """
    text, ids, spans, positions = "", [], [], []
    for stream in streams:
        if text:
            text += STREAM_SEPARATOR
        text = _rebuild(stream, text, ids, spans, positions, offset)
    return TokenMap(PromptTokens(text, tuple(ids), tuple(spans)), positions=positions,
                    context_length=offset + context_length)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """CLIP's printable stand-in character -> the byte it stands for (the inverse of CLIP's ``bytes_to_unicode``:
    printable bytes stand for themselves, the others for chr(256), chr(257), ... in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _gap(text: str, after: str) -> str:
    """The space between ``text`` and the next CLIP word, which its tokens do not give (CLIP drops whitespace): one
    between words, numbers and emoji, none around punctuation except after ``,.;!?)]}>%`` and before an opening
    bracket, so "red-car", "car's" and "(car:1.2), a dog" read as typed. ``phrase_pattern`` matches either way."""
    def wordlike(c: str) -> bool:
        return c.isalnum() or unicodedata.category(c) == "So"

    before, close = text[-1], ",.;!?)]}>%"
    if wordlike(before) and wordlike(after):
        return "" if before.isdigit() and after.isdigit() else " "
    if after in "([{<":
        return " " if wordlike(before) or before in close else ""
    if before in ".," and text[-2:-1].isdigit() and after.isdigit():  # 1.2, 1,000
        return ""
    return " " if before in close and wordlike(after) else ""


def _rebuild(stream: Sequence[tuple[int, str, int]], text: str, ids: list, spans: list, positions: list,
             offset: int) -> str:
    """Append one stream's text, rebuilt from its pieces, to ``text`` and each token's id, character span and context
    position to the lists; return the text. CLIP pieces (byte-level BPE) are decoded from CLIP's byte stand-ins, a
    word's pieces joined and "</w>" ends a word (``_gap`` then spaces the next); SentencePiece's (T5, any piece starting
    with "▁") are text already, and "▁" starts a word. A token whose bytes end within a character (CJK, emoji, "é")
    spans that whole character; T5's lone "▁" pieces span the next piece's text, as their tokenizer's offsets do."""
    sentencepiece = any(piece.startswith("▁") for _, piece, _ in stream)
    table, decoder = _byte_decoder(), codecs.getincrementaldecoder("utf-8")("replace")
    pending: list[list] = []  # [id, position, start]: tokens whose characters are not all decoded yet
    word_start, begin = False, len(text)  # whether a new word begins at the next character; where the stream began
    for tok, piece, position in [*stream, (None, "", None)]:
        if tok is None:  # the stream's end: any incomplete character becomes U+FFFD
            out = decoder.decode(b"", final=True) if not sentencepiece else ""
        else:
            pending.append([int(tok), position, None])
            if piece.startswith("▁"):
                word_start, piece = True, piece[1:]
            ends_word = piece.endswith("</w>")
            piece = piece[: -len("</w>")] if ends_word else piece
            out = piece if sentencepiece else decoder.decode(
                b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece))
        if out:
            if word_start and len(text) > begin:
                text += " " if sentencepiece else _gap(text, out[0])
            start, text, word_start = len(text), text + out, False
            complete = pending[:-1] if not sentencepiece and decoder.getstate()[0] else pending
            for tok_, position_, start_ in complete:
                ids.append(tok_)
                spans.append((start if start_ is None else start_, len(text)))
                positions.append(offset + position_)
            pending = pending[len(complete):]
            for entry in pending:  # the last token's bytes run on into the next character
                entry[2] = start if entry[2] is None else entry[2]
        if tok is not None and ends_word:
            word_start = True
    return text

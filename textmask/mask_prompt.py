"""The mask prompt language: phrases combined with ``|``/``OR``, ``AND``, ``NOT`` and parentheses.

``red car | truck AND NOT wheels`` parses as ``red car OR (truck AND (NOT wheels))``. Operators are
upper-case keywords so that lower-case "and"/"or"/"not" stay part of a phrase ("salt and pepper").
Soft maps combine with fuzzy logic (max, min, 1 - x); see ``textmask.postprocess.soft_threshold``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

import torch

from . import options
from .errors import PromptSyntaxError, TextMaskError
from .options import readable, visible


@dataclass(frozen=True)
class Phrase:
    text: str


@dataclass(frozen=True)
class Not:
    arg: "Expr"


@dataclass(frozen=True)
class And:
    args: tuple["Expr", ...]


@dataclass(frozen=True)
class Or:
    args: tuple["Expr", ...]


Expr = Union[Phrase, Not, And, Or]

_TOKEN = re.compile(r"\s*(?:(?P<op>\(|\)|\|)|(?P<word>[^\s()|]+))")
_KEYWORDS = {"AND", "OR", "NOT"}
# Parentheses and NOTs nest at most this deep: the parser and every walk of the tree recurse once a level, and no
# sensible prompt comes near it (Python's own limit, about 1000 frames, would otherwise end it in a traceback).
MAX_DEPTH = 100


def _lex(text: str) -> list[tuple[str, str, int]]:
    """Split into (kind, value, column) tokens; column is 1-based."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            break
        if m.group("op"):
            tokens.append(("op", m.group("op"), m.start("op") + 1))
        elif m.group("word"):
            word = m.group("word")
            tokens.append(("kw" if word in _KEYWORDS else "word", word, m.start("word") + 1))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _lex(text)
        self.i = 0
        self.depth = 0  # parentheses and NOTs open at the current token

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def end_column(self) -> int:
        return len(self.text.rstrip()) + 1

    def is_op(self, *values: str) -> bool:
        t = self.peek()
        return t is not None and t[0] in ("op", "kw") and t[1] in values

    def parse(self) -> Expr:
        expr = self.or_expr()
        t = self.peek()
        if t is not None:
            raise PromptSyntaxError(f"unexpected '{t[1]}'", t[2])
        return expr

    def or_expr(self) -> Expr:
        args = [self.and_expr()]
        while self.is_op("|", "OR"):
            self.i += 1
            args.append(self.and_expr())
        return args[0] if len(args) == 1 else Or(tuple(args))

    def and_expr(self) -> Expr:
        args = [self.not_expr()]
        while self.is_op("AND"):
            self.i += 1
            args.append(self.not_expr())
        return args[0] if len(args) == 1 else And(tuple(args))

    def nested(self, parse: Callable[[], Expr]) -> Expr:
        """``parse()`` one level deeper (inside a parenthesis or a NOT); refused past ``MAX_DEPTH`` levels."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise PromptSyntaxError(f"nested more than {MAX_DEPTH} levels deep; use fewer parentheses or NOTs",
                                    self.tokens[self.i - 1][2])
        expr = parse()
        self.depth -= 1
        return expr

    def not_expr(self) -> Expr:
        if self.is_op("NOT"):
            self.i += 1
            return Not(self.nested(self.not_expr))
        return self.atom()

    def atom(self) -> Expr:
        t = self.peek()
        if t is None:
            raise PromptSyntaxError("expected a phrase, got the end of the prompt", self.end_column())
        kind, value, column = t
        if value == "(" and kind == "op":
            self.i += 1
            expr = self.nested(self.or_expr)
            if not self.is_op(")"):
                t = self.peek()
                raise PromptSyntaxError("missing ')'", t[2] if t else self.end_column())
            self.i += 1
            return expr
        if kind != "word":
            raise PromptSyntaxError(f"expected a phrase, got '{value}'", column)
        words = []
        while (t := self.peek()) is not None and t[0] == "word":
            words.append(t[1])
            self.i += 1
        phrase = " ".join(words)
        if not visible(phrase):
            shown = " ".join(f"U+{ord(c):04X}" for c in phrase[:4] if not c.isspace())
            raise PromptSyntaxError(f"the phrase here is only invisible characters ({shown}); type words", column)
        return Phrase(phrase)


def parse(text: str) -> Expr:
    """Parse a mask prompt; raises PromptSyntaxError naming the column, or TextMaskError when empty or not text."""
    if not isinstance(text, str):
        raise TextMaskError(f"the mask prompt must be text, got {type(text).__name__}")
    readable("the mask prompt", text)
    if not visible(text):
        raise TextMaskError("the mask prompt is empty" + (" (only invisible characters)" if text.strip() else ""))
    return _Parser(text).parse()


def phrases(expr: Expr) -> list[str]:
    """The distinct phrases of an expression, in order of appearance (case-insensitive)."""
    seen: dict[str, str] = {}

    def walk(e: Expr) -> None:
        if isinstance(e, Phrase):
            seen.setdefault(e.text.lower(), e.text)
        elif isinstance(e, Not):
            walk(e.arg)
        else:
            for a in e.args:
                walk(a)

    walk(expr)
    return list(seen.values())


def evaluate(expr: Expr, leaf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Evaluate with fuzzy logic: OR = max, AND = min, NOT = 1 - x over maps in [0, 1]."""
    if isinstance(expr, Phrase):
        return leaf(expr.text)
    if isinstance(expr, Not):
        return 1 - evaluate(expr.arg, leaf)
    maps = [evaluate(a, leaf) for a in expr.args]
    out = maps[0]
    for m in maps[1:]:
        out = torch.maximum(out, m) if isinstance(expr, Or) else torch.minimum(out, m)
    return out


def with_negative(expr: Expr, negative: str | None) -> Expr:
    """``expr AND NOT (negative)`` when a negative mask prompt is given (one of only spaces or invisible characters
    is none)."""
    negative = options.text("the negative mask prompt", negative)
    if negative is None or not visible(negative):
        return expr
    return And((expr, Not(parse(negative))))

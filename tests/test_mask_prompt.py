"""Mask prompt language: parsing, precedence, errors with columns, and evaluation."""

import pytest
import torch

from textmask.errors import PromptSyntaxError, TextMaskError
from textmask.mask_prompt import MAX_DEPTH, And, Not, Or, Phrase, evaluate, parse, phrases, with_negative


def test_precedence():
    assert parse("red car | truck AND NOT wheels") == Or(
        (Phrase("red car"), And((Phrase("truck"), Not(Phrase("wheels")))))
    )
    assert parse("a OR b AND c") == Or((Phrase("a"), And((Phrase("b"), Phrase("c")))))
    assert parse("(a OR b) AND c") == And((Or((Phrase("a"), Phrase("b"))), Phrase("c")))
    assert parse("NOT NOT a") == Not(Not(Phrase("a")))


def test_lowercase_words_stay_in_phrases():
    assert parse("salt and pepper or not") == Phrase("salt and pepper or not")
    assert parse("the man on the left") == Phrase("the man on the left")


@pytest.mark.parametrize(
    "text,column",
    [("a AND", 6), ("(a | b", 7), ("a ) b", 3), ("AND a", 1), ("| x", 1), ("a | | b", 5), ("()", 2), ("a AND (b OR)", 12)],
)
def test_syntax_errors_name_the_column(text, column):
    with pytest.raises(PromptSyntaxError) as e:
        parse(text)
    assert e.value.column == column
    assert f"column {column}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "   ", "\n", "\u00a0", "\u3000", "\u200b", "\ufeff \u200b", "\x00\x1b"])
def test_empty(text):
    """Spaces of every kind, zero-width and control characters alone are an empty prompt, not a phrase of bytes."""
    with pytest.raises(TextMaskError, match="empty") as e:
        parse(text)
    assert "\n" not in str(e.value)


def test_nesting_is_bounded_in_one_line_and_width_is_not():
    """Parentheses and NOTs nest up to MAX_DEPTH (Python's recursion limit is never reached); a flat prompt of
    thousands of phrases parses."""
    assert phrases(parse("(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH)) == ["a"]
    assert parse("NOT " * MAX_DEPTH + "a") is not None
    for deep in ("(" * 5000 + "a" + ")" * 5000, "NOT " * 5000 + "a", "a | " + "(" * (MAX_DEPTH + 1) + "b"):
        with pytest.raises(PromptSyntaxError, match=f"nested more than {MAX_DEPTH} levels") as e:
            parse(deep)
        assert "\n" not in str(e.value)
    assert len(phrases(parse(" | ".join(f"w{i}" for i in range(5000))))) == 5000


@pytest.mark.parametrize("text, phrase", [("car | \u200b", "invisible"), ("car AND NOT \ufeff", "invisible"),
                                          ("red \udcff car", "not UTF-8 text at column 5"),
                                          ("\ud800", "not UTF-8 text at column 1")])
def test_invisible_phrases_and_bytes_that_are_not_text_are_one_line(text, phrase):
    """A phrase of only zero-width characters names nothing to see; a lone surrogate (a byte that was not UTF-8 on
    the command line, or a JSON escape) is not text a tokenizer reads. Both are refused naming where."""
    with pytest.raises(TextMaskError, match=phrase) as e:
        parse(text)
    assert "\n" not in str(e.value)


def test_phrases_deduplicated_in_order():
    assert phrases(parse("Cat | dog AND NOT cat | (bird)")) == ["Cat", "dog", "bird"]


def test_evaluate_fuzzy_logic():
    a = torch.tensor([0.0, 0.2, 0.9, 1.0])
    b = torch.tensor([1.0, 0.5, 0.3, 1.0])
    leaf = {"a": a, "b": b}.__getitem__
    torch.testing.assert_close(evaluate(parse("a | b"), leaf), torch.maximum(a, b))
    torch.testing.assert_close(evaluate(parse("a AND b"), leaf), torch.minimum(a, b))
    torch.testing.assert_close(evaluate(parse("a AND NOT b"), leaf), torch.minimum(a, 1 - b))


def test_negative_prompt():
    assert with_negative(parse("car"), "wheels | tyres") == And((Phrase("car"), Not(Or((Phrase("wheels"), Phrase("tyres"))))))
    assert with_negative(parse("car"), "  ") == Phrase("car")
    assert with_negative(parse("car"), "\u200b") == Phrase("car")  # nothing visible: no negative, as empty
    with pytest.raises(TextMaskError, match="negative mask prompt holds a byte"):
        with_negative(parse("car"), "\udcff")
    with pytest.raises(PromptSyntaxError):
        with_negative(parse("car"), "AND")

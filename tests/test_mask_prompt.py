"""Mask prompt language: parsing, precedence, errors with columns, and evaluation."""

import pytest
import torch

from textmask.errors import PromptSyntaxError, TextMaskError
from textmask.mask_prompt import And, Not, Or, Phrase, evaluate, parse, phrases, with_negative


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


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty(text):
    with pytest.raises(TextMaskError, match="empty"):
        parse(text)


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
    with pytest.raises(PromptSyntaxError):
        with_negative(parse("car"), "AND")

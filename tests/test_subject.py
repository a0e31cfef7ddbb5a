"""The referring-expression subject parser, on expressions in the style of RefCOCO, RefCOCO+, G-Ref and PhraseCut."""

import pytest

from textmask.errors import TextMaskError
from textmask.subject import names_several, subject, subject_phrase, with_article

TABLE = [
    # RefCOCO: short, positional
    ("the man on the left", "man"), ("left guy", "guy"), ("guy on right", "guy"), ("right zebra", "zebra"),
    ("middle cake", "cake"), ("woman in red", "woman"), ("kid with a red ball", "kid"), ("elephant far right", "elephant"),
    ("bottom left bowl", "bowl"), ("top right corner sandwich", "sandwich"), ("the one on the left", "one"),
    ("2nd guy from left", "guy"), ("closest giraffe", "giraffe"), ("table top left", "table"),
    ("man in white shirt", "man"), ("lady on right", "lady"), ("far left person", "person"), ("biggest broccoli", "broccoli"),
    ("pizza slice closest to you", "slice"), ("hot dog on left", "dog"),
    # RefCOCO+: appearance, no absolute position words
    ("black horse jumping", "horse"), ("white and black dog", "dog"), ("man wearing glasses", "man"),
    ("person sitting down", "person"), ("blurry thing", "thing"), ("tennis player in white", "player"),
    ("zebra facing away", "zebra"), ("guy with hat", "guy"), ("striped shirt", "shirt"), ("baby elephant", "elephant"),
    ("woman holding umbrella", "woman"), ("boy in blue jeans", "boy"), ("brown bear", "bear"), ("dark suitcase", "suitcase"),
    ("plaid shirt guy", "guy"), ("chair with pillow", "chair"), ("catcher", "catcher"), ("skier's legs", "legs"),
    # G-Ref: long sentences
    ("a woman in a blue dress holding an umbrella", "woman"), ("the brown horse that is behind the white one", "horse"),
    ("an elephant standing next to another elephant", "elephant"), ("the laptop computer on the desk", "computer"),
    ("a man riding a bike down the street", "man"), ("a young boy who is eating a sandwich", "boy"),
    ("the giraffe whose head is bent down", "giraffe"), ("a plate of food with broccoli and carrots", "plate"),
    ("a cat lying on a red blanket", "cat"), ("the larger of the two sheep", "sheep"),
    ("a silver car parked by the curb", "car"), ("the bus is red and white", "bus"),
    # PhraseCut: object phrases
    ("black car", "car"), ("white cloud in sky", "cloud"), ("large window", "window"), ("tree", "tree"),
    ("green grass", "grass"), ("wooden table", "table"), ("tall building", "building"), ("blue sky", "sky"),
    ("parked cars", "cars"), ("metal fence", "fence"), ("street sign", "sign"),
    # Shapes relational phrases
    ("the circle on the left", "circle"), ("the larger square", "square"), ("the smaller star", "star"),
    ("the triangle on the right", "triangle"),
]


def test_table_size():
    assert len(TABLE) >= 60


@pytest.mark.parametrize("expression,expected", TABLE)
def test_subject(expression, expected):
    assert subject(expression) == expected


def test_word_boundaries_and_case():
    assert subject("The WOMAN next to the man") == "woman"
    assert subject("man next to the woman") == "man"


@pytest.mark.parametrize("expression", ["left", "bottom left", "", "  ", "2nd from left", "on the right", "the top left",
                                        "AND NOT", "the 12th from the left"])
def test_no_noun(expression):
    with pytest.raises(TextMaskError, match="no noun"):
        subject(expression)


@pytest.mark.parametrize("expression,expected", [
    ("the second red car from the right", "red car"), ("the larger square", "square"), ("the red triangle", "red triangle"),
    ("white and black dog", "black dog"), ("the big red ball", "red ball"), ("hot dog on left", "hot dog"),
    ("the larger of the two sheep", "sheep"), ("the top left star", "star"), ("wooden table", "wooden table"),
    ("tennis player in white", "tennis player"), ("every red car", "red car"), ("the  Red   car", "red car"),
    ("red, car", "car"), ("skier's legs", "skier's legs"), ("far left person", "person"),
    ("the 12th red car from the left", "red car"), ("the twentieth car", "car"), ("3d printer", "3d printer"),
])
def test_subject_phrase(expression, expected):
    # the head noun and the words before it that say how it looks, as written: the refer path masks this phrase
    assert subject_phrase(expression) == expected
    assert subject_phrase(expression).split()[-1].removesuffix("'s") == subject(expression)


def test_subject_phrase_without_a_noun():
    with pytest.raises(TextMaskError, match="no noun"):
        subject_phrase("the top left")


@pytest.mark.parametrize("phrase, several", [
    ("cars", True), ("all cars", True), ("two dogs", True), ("3 cats", True), ("people", True),
    ("every star", True), ("dogs on the left", True), ("the cars' wheels", True),
    ("car", False), ("red circle", False), ("sky", False), ("glass", False), ("bus", False), ("grass", False),
    ("the man on the left", False), ("the", False), ("1 car", False), ("", False),
])
def test_names_several(phrase, several):
    assert names_several(phrase) == several


@pytest.mark.parametrize("expression, phrase", [
    ("the café on the left", "café"), ("the naïve circle", "naïve circle"), ("İstanbul", "İstanbul"),
    ("the 猫 on the left", "猫"), ("the cafe\u0301 on the right", "cafe\u0301"), ("The RED circle", "red circle"),
])
def test_subject_phrase_of_any_script_is_found_in_the_prompt(expression, phrase):
    """Words of any script, accents written either way and letters whose lower case is longer ("İ") stay whole,
    and the phrase is one the prompt's token lookup finds."""
    from textmask.tokens import phrase_pattern

    assert subject_phrase(expression) == phrase
    assert phrase_pattern(phrase).search(expression)


@pytest.mark.parametrize("phrase, written", [
    ("red car", "the red car"), ("sky", "the sky"), ("猫", "the 猫"), ("man on the left", "the man on the left"),
    ("the man on the left", "the man on the left"), ("A dog", "A dog"), ("an apple", "an apple"),
    ("two dogs", "two dogs"), ("3 cats", "3 cats"), ("one cat", "one cat"), ("every chair", "every chair"),
    ("my cat", "my cat"), ("John's hat", "John's hat"), ("another car", "another car"), ("theater", "the theater"),
])
def test_with_article(phrase, written):
    assert with_article(phrase) == written


def test_default_prompt_names_each_phrase_with_its_article():
    """``attention``'s prompt when none is given: each phrase as a noun phrase, listed, and every phrase found in it
    by the token lookup at its own place."""
    from textmask.methods.attention import attention_prompt
    from textmask.tokenizer import clip_tokenizer, tokenize
    from textmask.tokens import TokenMap

    assert attention_prompt(["red car"]) == "the red car"
    phrases = ["red circle", "two dogs", "the man on the left", "sky"]
    prompt = attention_prompt(phrases)
    assert prompt == "the red circle, two dogs, the man on the left, and the sky"
    tm = TokenMap(tokenize(clip_tokenizer(), prompt))
    found = [tm.find(p) for p in phrases]
    assert all(found) and len({i for f in found for i in f}) == sum(len(f) for f in found)
    assert found == sorted(found)  # in the order they are listed

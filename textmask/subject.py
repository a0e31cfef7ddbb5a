"""The subject of a referring expression: the head noun of its first noun phrase, by rules and word lists.

"the man on the left" -> "man", "black horse jumping" -> "horse", "left guy" -> "guy". The first noun
phrase ends at a preposition, a relative word, a verb form or a comma; its head is its last word that is
not a determiner, number, colour, size, position or other common modifier. If spaCy and an English model
happen to be installed, ``subject(..., use_spacy=True)`` asks spaCy instead (as the Ref-Diff reference does).
"""

from __future__ import annotations

import re

from .errors import TextMaskError

DETERMINERS = set("a an the this that these those its his her their our my your some any each every all no".split())
NUMBERS = set("one two three four five six seven eight nine ten first second third fourth fifth sixth seventh eighth "
              "ninth tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth "
              "nineteenth twentieth last both".split()) - {"one"}
NUMERAL = re.compile(r"\d+(?:st|nd|rd|th)?")  # "2", "12th": numbers and ordinals written in digits
COLOURS = set("red green blue yellow black white gray grey brown orange pink purple beige tan gold golden silver "
              "dark light bright pale navy maroon teal cyan violet blond blonde".split())
MODIFIERS = set(
    "left right top bottom middle center centre front back rear far near closest nearest farthest furthest upper "
    "lower leftmost rightmost topmost bottommost most more very upside big bigger biggest large larger largest small "
    "smaller smallest little tiny huge tall taller tallest short shorter shortest long longer longest wide narrow "
    "old older oldest young younger youngest new half whole partial partially only other another full empty open "
    "closed wooden metal plastic striped plaid spotted checkered blurry blurred fuzzy cut sliced visible hidden "
    "main second-from-the-left far-left far-right top-left top-right bottom-left bottom-right".split()
)
# Modifiers that say what a thing looks like, which an attention map can find (positions and sizes cannot).
LOOKS = set("wooden metal plastic striped plaid spotted checkered blurry blurred fuzzy".split())
BOUNDARIES = set(
    "on in at with near next by behind beside besides between under underneath over above below to from for "
    "without against across along around inside outside into onto toward towards of off who that which whose "
    "where while and or nor not but than like holding wearing".split()
)
VERBS = set("is are was were be being has have had rides holds sits stands looks wears eats plays walks runs "
            "jumps lies lays faces carries".split())
# A word: letters and digits of any script, with combining accents (decomposed text writes "é" as e + U+0301).
_LETTERS = r"(?:[^\W_]|[\u0300-\u036f])+"
WORD = re.compile(rf"{_LETTERS}(?:[-']{_LETTERS})*")
# Words that make a noun phrase name several things ("all cars", "two dogs", "these"), and plurals without an -s.
SEVERAL = set("all every each both these those many several few two three four five six seven eight nine ten".split())
IRREGULAR_PLURALS = set("people men women children mice feet teeth geese oxen sheep fish deer police".split())
# Words that already open a noun phrase, so it takes no article of its own ("two dogs", "another car").
OPENERS = DETERMINERS | NUMBERS | SEVERAL | set("one another either neither such much half".split())


def _lower(text: str) -> str:
    """``text`` lower-cased letter by letter, keeping the letters whose lower case is longer ("İ"), so that positions
    in it are positions in ``text`` and a phrase cut from it is found in the prompt as typed."""
    return "".join(c if len(low := c.lower()) != 1 else low for c in text)


def _spacy_subject(expression: str) -> str | None:
    try:
        import spacy

        nlp = spacy.load("en_core_web_sm")
    except Exception:  # not installed, or no English model: the rules answer
        return None
    for token in nlp(expression):
        if "ROOT" in token.dep_ or "subj" in token.dep_:
            return token.text.lower()
    return None


def _first_noun_phrase(expression: str) -> tuple[list[re.Match], int]:
    """The words of ``expression`` (matches on its lower-cased text) and the index of the first noun phrase's head
    among them; raises TextMaskError when there is none."""
    words = list(WORD.finditer(_lower(expression)))
    head = None
    for i, match in enumerate(words):
        w = match.group().removesuffix("'s")
        ends_phrase = w in BOUNDARIES or w in VERBS or (w.endswith("ing") and len(w) > 4 and head is not None)
        if ends_phrase and head is not None:
            break
        if ends_phrase or w in DETERMINERS or w in NUMBERS or NUMERAL.fullmatch(w) or w in COLOURS or w in MODIFIERS:
            continue
        if w.endswith("ed") and head is not None and len(w) > 4:  # "car parked ..."
            break
        head = i
    if head is None:
        raise TextMaskError(f"no noun found in '{expression}'; name the object, e.g. 'the man on the left'")
    return words, head


def subject(expression: str, use_spacy: bool = False) -> str:
    """The head noun of the first noun phrase; raises TextMaskError when the expression has none."""
    if use_spacy and (found := _spacy_subject(expression)):
        return found
    words, head = _first_noun_phrase(expression)
    return words[head].group().removesuffix("'s")


def subject_phrase(expression: str) -> str:
    """The head noun with the words right before it that say what it looks like (colours, materials, other nouns),
    as the expression writes them: "the second red car from the right" -> "red car", "the larger square" ->
    "square", "white and black dog" -> "black dog". Position, size and order words stay out: they pick among
    instances (``textmask.relations``), where a map cannot see them. Raises TextMaskError without a noun."""
    words, head = _first_noun_phrase(expression)
    text = _lower(expression)
    first = head
    while first > 0 and not text[words[first - 1].end() : words[first].start()].strip():  # only spaces between
        w = words[first - 1].group().removesuffix("'s")
        if w in DETERMINERS or w in NUMBERS or NUMERAL.fullmatch(w) or w in BOUNDARIES or w in VERBS \
                or (w in MODIFIERS and w not in LOOKS):
            break
        first -= 1
    return " ".join(w.group() for w in words[first : head + 1])


def names_several(phrase: str) -> bool:
    """Whether a phrase names several things: "cars", "all cars", "two dogs", "people" do; "car", "sky", "glass",
    "bus" do not. A plural head noun ends in -s but not in -ss, -us or -is; a phrase without a noun names one."""
    words = [w.removesuffix("'s") for w in WORD.findall(_lower(phrase))]
    if any(w in SEVERAL or w.isdigit() and w not in ("0", "1") for w in words):
        return True
    try:
        head = subject(phrase)
    except TextMaskError:
        return False
    if head in IRREGULAR_PLURALS:
        return True
    return len(head) > 3 and head.endswith("s") and not head.endswith(("ss", "us", "is"))


def with_article(phrase: str) -> str:
    """``phrase`` as a noun phrase of its own: "the " before it unless its first word already opens one (an article,
    a determiner, a number or a possessive): "red car" -> "the red car"; "the man on the left", "two dogs", "my
    cat" and "John's hat" stay as they are."""
    first = WORD.match(_lower(phrase.strip()))
    if first is not None and (first.group() in OPENERS or NUMERAL.fullmatch(first.group())
                              or first.group().endswith("'s")):
        return phrase
    return f"the {phrase}"


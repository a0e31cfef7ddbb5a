"""Token map: phrases to context positions, for split words, repeats, case and long prompts."""

import pytest

from textmask.errors import PhraseNotFoundError
from textmask.tokenizer import clip_tokenizer, tokenize
from textmask.tokens import CONTEXT, TokenMap, split_windows


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def positions_to_tokens(tok, tm, positions):
    flat = {tm._position[i]: tm.tokens.ids[i] for i in range(len(tm.tokens.ids))}
    return tok.convert_ids_to_tokens([flat[p] for p in positions])


def test_tokenizer_is_clip(tok):
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tokenize(tok, "a photo of a cat").ids == (320, 1125, 539, 320, 2368)


def test_single_and_multi_token_words(tok):
    tm = TokenMap(tokenize(tok, "a photo of a cat and a hippopotamus"))
    assert tm.find("cat") == [5]
    pos = tm.find("hippopotamus")
    assert len(pos) > 1 and pos == list(range(pos[0], pos[0] + len(pos)))
    assert "".join(positions_to_tokens(tok, tm, pos)).replace("</w>", "") == "hippopotamus"


def test_repeated_words_and_case(tok):
    tm = TokenMap(tokenize(tok, "A Dog chases a dog, and a DOG sleeps"))
    assert len(tm.find("dog")) == 3
    assert tm.find("Dog") == tm.find("DOG")


def test_word_boundaries(tok):
    tm = TokenMap(tokenize(tok, "a woman next to a man"))
    assert positions_to_tokens(tok, tm, tm.find("man")) == ["man</w>"]
    assert positions_to_tokens(tok, tm, tm.find("woman")) == ["woman</w>"]
    with pytest.raises(PhraseNotFoundError, match="'wom' is not in the prompt"):
        tm.find("wom")


def test_phrases_and_whitespace(tok):
    tm = TokenMap(tokenize(tok, "a red   car, a blue car"))
    assert positions_to_tokens(tok, tm, tm.find("red car")) == ["red</w>", "car</w>"]
    assert len(tm.find("car")) == 2


def test_long_prompt_windows(tok):
    words = [f"word{i}" for i in range(120)]
    text = " ".join(words[:100]) + " zebra " + " ".join(words[100:])
    tm = TokenMap(tokenize(tok, text))
    assert len(tm.windows) >= 2 and all(len(w) <= 75 for w in tm.windows)
    assert tm.context_length == CONTEXT * len(tm.windows)
    (pos,) = tm.find("zebra")
    assert pos >= CONTEXT  # lands in a later window
    assert pos % CONTEXT not in (0, CONTEXT - 1)  # never on BOS/EOS slots
    assert positions_to_tokens(tok, tm, [pos]) == ["zebra</w>"]


def test_windows_keep_short_words_whole(tok):
    # 74 one-token words then a multi-token word: the word must move whole into the next window.
    text = " ".join(["cat"] * 74) + " hippopotamus"
    tokens = tokenize(tok, text)
    windows = split_windows(tokens)
    word = tokens.words()[-1]
    assert len(word) > 1
    assert any(set(word) <= set(w) for w in windows)
    assert len(windows[0]) == 74


def test_empty_phrase_rejected(tok):
    tm = TokenMap(tokenize(tok, "a cat"))
    with pytest.raises(ValueError):
        tm.find("   ")

"""Token map: phrases to context positions, for split words, repeats, case, long prompts, and the hosts' own tokens."""

from types import SimpleNamespace

import pytest

from textmask.errors import PhraseNotFoundError
from textmask.hosts.webui import WebuiHost
from textmask.tokenizer import clip_tokenizer, t5_tokenizer, tokenize
from textmask.tokens import (
    BOS,
    CONTEXT,
    EOS,
    WINDOW,
    PromptTokens,
    TokenMap,
    split_windows,
    token_map_from_chunks,
    token_map_from_streams,
)


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


# Phrases with non-ASCII letters, emoji, hyphens and apostrophes, each in a prompt that contains it.
UNICODE_CASES = [("a photo of café", "café"), ("a red-car on a road", "red-car"), ("the car's door", "car's"),
                 ("a 猫 on a mat", "猫"), ("a 🐱 on a mat", "🐱"), ("a naïve cat", "naïve cat"),
                 ("die Straße bei Nacht", "Straße"), ("a man in a t-shirt", "t-shirt")]


def comfy_chunks(tok, text):
    """(id, piece) per context position as ComfyHost._token_map hands them over: 77-token chunks, None for BOS,
    EOS and padding."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = []
    for i in range(0, max(1, len(ids)), WINDOW):
        part = [(t, tok.convert_ids_to_tokens(t)) for t in ids[i : i + WINDOW]]
        chunks.append([(BOS, None), *part, (EOS, None)] + [(EOS, None)] * (WINDOW - len(part)))
    return chunks


def webui_map(tok, text):
    """The token map WebuiHost._token_map (A1111, Forge's SD1/SDXL) builds from a webui's tokenize_line chunks."""
    def tokenize_line(line):
        ids = tok(line, add_special_tokens=False)["input_ids"]
        parts = [ids[i : i + WINDOW] for i in range(0, max(1, len(ids)), WINDOW)]
        chunks = [SimpleNamespace(tokens=[BOS, *p, EOS] + [EOS] * (WINDOW - len(p)), fixes=[]) for p in parts]
        return chunks, len(ids)

    host = SimpleNamespace(_word_embedder=lambda: SimpleNamespace(tokenize_line=tokenize_line))
    return WebuiHost._token_map(host, text)


def dit_streams(tok, t5, text):
    """SD3's text streams as ComfyHost._dit_token_map hands them over: CLIP from position 1, then T5 from 77."""
    clip, t5_ids = tok(text, add_special_tokens=False)["input_ids"], t5(text, add_special_tokens=False)["input_ids"]
    return [[(t, tok.convert_ids_to_tokens(t), 1 + j) for j, t in enumerate(clip)],
            [(t, t5.convert_ids_to_tokens(t), CONTEXT + j) for j, t in enumerate(t5_ids)]]


def dit_reference(tok, t5, text):
    """The diffusers DiT host's map of the same streams, from the prompt itself (hosts/diffusers_dit.py)."""
    clip, t5_tokens = tokenize(tok, text), tokenize(t5, text)
    positions = [1 + j for j in range(len(clip.ids))] + [CONTEXT + j for j in range(len(t5_tokens.ids))]
    return TokenMap(PromptTokens(text, clip.ids + t5_tokens.ids, clip.spans + t5_tokens.spans), positions=positions)


@pytest.mark.parametrize("text, phrase", UNICODE_CASES)
def test_host_chunks_find_what_the_prompt_finds(tok, text, phrase):
    """ComfyUI's and the webui's chunks give a phrase the positions textmask's own tokenization gives it."""
    expected = TokenMap(tokenize(tok, text)).find(phrase)
    ids = tok(phrase, add_special_tokens=False)["input_ids"]
    flat = [t for chunk in comfy_chunks(tok, text) for t, _ in chunk]
    assert [flat[p] for p in expected] == ids  # the phrase's own tokens
    assert token_map_from_chunks(comfy_chunks(tok, text)).find(phrase) == expected
    assert webui_map(tok, text).find(phrase) == expected
    assert token_map_from_streams(dit_streams(tok, t5_tokenizer(), text)[:1], CONTEXT).find(phrase) == expected


@pytest.mark.parametrize("text, phrase", [t for t in UNICODE_CASES if t[1] in ("café", "red-car", "car's", "Straße")])
def test_dit_streams_find_what_the_prompt_finds(tok, text, phrase):
    """SD3's CLIP and T5 streams (ComfyUI) give a phrase the positions the diffusers DiT host gives it. Not for 猫, 🐱
    and ï, which T5 reads as <unk> (no text rebuilt from its pieces can hold them), nor "a t-shirt", where T5's lone
    "▁" before "t" joins the word in a rebuilt map and not in textmask's own tokenization."""
    t5 = t5_tokenizer()
    expected = dit_reference(tok, t5, text).find(phrase)
    assert min(expected) < CONTEXT <= max(expected)  # in both streams
    assert token_map_from_streams(dit_streams(tok, t5, text), CONTEXT + 256).find(phrase) == expected


@pytest.mark.parametrize("text", ["(car:1.2) on a road", "[car:sky:5] at dusk", "<lora:x:1> car, a dog"])
def test_webui_attention_syntax(tok, text):
    """The webui's syntax stays in the prompt its chunks come from: the phrase still finds just its word."""
    tm = webui_map(tok, text)
    assert tm.prompt == text
    assert positions_to_tokens(tok, tm, tm.find("car")) == ["car</w>"]


def test_rebuilt_prompt_reads_as_typed_and_missing_phrases_say_so_in_one_line(tok):
    text = "a photo of a café, a red-car and the car's (t-shirt:1.2)\nby 猫 🐱"
    for tm in (token_map_from_chunks(comfy_chunks(tok, text)), webui_map(tok, text),
               token_map_from_streams(dit_streams(tok, t5_tokenizer(), text), CONTEXT + 256)):
        with pytest.raises(PhraseNotFoundError) as e:
            tm.find("dog")
        assert str(e.value) == "'dog' is not in the prompt '" + " ".join(text.split()) + "'"


def test_digits_and_split_characters(tok):
    """CLIP's tokens lose the spaces around digits, so the rebuilt text may differ there from the prompt, yet a phrase
    finds the same tokens in both; a 3-byte character's tokens all belong to it; a phrase never starts inside a word."""
    text = "w1 w2 8k, 1024x768, a dog and 猫猫"
    tm, expected = token_map_from_chunks(comfy_chunks(tok, text)), TokenMap(tokenize(tok, text))
    for phrase in ("w2", "8k", "k", "2", "1024x768", "猫猫"):
        assert tm.find(phrase) == expected.find(phrase), phrase
    assert len(tm.find("猫猫")) == 6
    for phrase in ("og", "do", "an"):
        with pytest.raises(PhraseNotFoundError):
            tm.find(phrase)


def test_a_phrase_t5_reads_as_unknown_is_named_so_not_quoted_against_an_unknown_prompt():
    """Flux reads the prompt through T5 alone, which has no pieces for CJK: the map holds <unk>, and the refusal says
    so instead of quoting a prompt of '<unk>' the user never wrote."""
    t5 = t5_tokenizer()
    text = "the 红色汽车"
    ids = t5(text, add_special_tokens=False)["input_ids"]
    token_map = token_map_from_streams([[(t, t5.convert_ids_to_tokens(t), j) for j, t in enumerate(ids)]], 512)
    with pytest.raises(PhraseNotFoundError, match="reads some of the prompt's characters as <unk>") as e:
        token_map.find("红色汽车")
    assert "\n" not in str(e.value)

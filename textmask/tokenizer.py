"""The tokenizers of SD-family text encoders, built offline from files that ship with textmask: CLIP's BPE merges
(SD1, SD2, SDXL, SD3, Flux's CLIP-L) and T5's SentencePiece vocabulary as a tokenizers JSON (SD3's and Flux's
T5-XXL); their sources are in assets/README.md."""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from pathlib import Path

from .tokens import PromptTokens

BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
T5_FILE = Path(__file__).parent / "assets" / "t5_tokenizer.json.gz"


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-character table (same order as the original vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_vocab(directory: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json and merges.txt (49408 tokens) derived from the shipped BPE merges."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        return vocab_path, merges_path
    merges = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tmp = directory / f".tmp{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    os.replace(tmp / "vocab.json", vocab_path)
    os.replace(tmp / "merges.txt", merges_path)
    tmp.rmdir()
    return vocab_path, merges_path


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """A transformers CLIPTokenizerFast for SD's text encoders, built without any download."""
    from transformers import CLIPTokenizerFast

    from .defaults import cache_dir

    try:
        vocab, merges = write_clip_vocab(cache_dir() / "clip-bpe")
    except OSError:  # a read-only or missing home: the files are read once, so a passing folder serves as well
        with tempfile.TemporaryDirectory(prefix="textmask-clip-bpe-") as folder:
            vocab, merges = write_clip_vocab(Path(folder))
            return CLIPTokenizerFast(str(vocab), str(merges))
    return CLIPTokenizerFast(str(vocab), str(merges))


@functools.lru_cache(maxsize=1)
def t5_tokenizer():
    """A transformers T5TokenizerFast for T5-XXL (SD3's third and Flux's second text encoder), without any download."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    inner = Tokenizer.from_str(gzip.decompress(T5_FILE.read_bytes()).decode("utf-8"))
    return T5TokenizerFast(tokenizer_object=inner, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def tokenize(tokenizer, text: str) -> PromptTokens:
    """Tokenize ``text`` (no BOS/EOS) keeping each token's character span (without the whitespace a sentencepiece
    token carries in front)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for start, end in enc["offset_mapping"]:
        while start < end and text[start].isspace():
            start += 1
        spans.append((start, end))
    return PromptTokens(text=text, ids=tuple(enc["input_ids"]), spans=tuple(spans))

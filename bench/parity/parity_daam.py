"""DAAM parity: textmask's `aggregation="daam"` against castorini/daam's own heat-map code on identical attention.

    DAAM_ROOT=/path/to/daam python bench/parity/parity_daam.py [--write-fixture]

Written against castorini/daam@09564e0. It runs DAAM's own ``UNetCrossAttentionHooker._unravel_attn``,
``RawHeatMapCollection``, ``DiffusionHeatMapHooker.compute_global_heat_map`` and
``GlobalHeatMap.compute_word_heat_map`` on the per-head probabilities of ``tests/parity_daam.py``, with the
conditional rows after the unconditional ones as DAAM expects. Import fix: DAAM imports spacy and matplotlib for
plotting and parsing, which these functions never call; missing ones are replaced by empty modules.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import parity_daam as recipe  # noqa: E402
from common import command_line, relative_difference, stub_missing, write_fixture  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "daam.npz"


def main() -> None:
    args = command_line(__doc__, "DAAM_ROOT", "castorini/daam")
    import diffusers  # noqa: F401  (before the stubs: it probes which packages exist)

    stub_missing("spacy", "spacy.tokens", "matplotlib", "matplotlib.pyplot")
    sys.path.insert(0, args.reference)
    from daam.heatmap import GlobalHeatMap, RawHeatMapCollection
    from daam.trace import DiffusionHeatMapHooker, UNetCrossAttentionHooker

    from textmask.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    collection = RawHeatMapCollection()
    unravel = types.SimpleNamespace()
    for layer, probs in recipe.layers():
        n = layer.tokens
        factor = int(np.sqrt(4096 // n))
        if factor == 8:  # as UNetCrossAttentionHooker.__call__ skips them
            continue
        # DAAM's attention_probs: [batch · heads, N, 77], the unconditional half first
        both = torch.cat([torch.zeros_like(probs), probs])[:, :, :, :].reshape(2 * recipe.HEADS, n, recipe.TOKENS)
        maps = UNetCrossAttentionHooker._unravel_attn(unravel, both)
        for head, heat in enumerate(maps):
            collection.update(factor, layer.ordinal, head, heat)
    fake = types.SimpleNamespace(all_heat_maps=collection, latent_hw=4096, last_prompt=recipe.PROMPT,
                                 pipe=types.SimpleNamespace(tokenizer=tokenizer))
    global_map = DiffusionHeatMapHooker.compute_global_heat_map(fake, recipe.PROMPT)
    words, groups = [], []
    token_map = [t.replace("</w>", "") for t in tokenizer.tokenize(recipe.PROMPT.lower())]
    for word in recipe.WORDS:
        words.append(GlobalHeatMap.compute_word_heat_map(global_map, word).value)
        groups.append([i + 1 for i, t in enumerate(token_map) if t == word])  # +1: the start token
    reference = torch.stack(words)[None]
    ours = recipe.textmask_maps(groups)
    err = relative_difference(ours, reference)
    print(f"word heat maps {tuple(reference.shape)} for {recipe.WORDS} (tokens {groups}): max relative difference "
          f"{err:.1e}")
    if args.write_fixture:
        write_fixture(FIXTURE, maps=reference.numpy(), groups=np.array(groups))  # one token per word here


if __name__ == "__main__":
    main()

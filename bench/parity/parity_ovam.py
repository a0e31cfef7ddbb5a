"""OVAM parity: textmask's traces against vpulab/ovam's own hooker and re-query on one identical forward.

    OVAM_ROOT=/path/to/ovam python bench/parity/parity_ovam.py [--write-fixture]

Written against vpulab/ovam@12afd87. ``ovam.stable_diffusion.StableDiffusionHooker`` hooks a pipeline's ``attn2``
modules, keeps each one's input of the batch's first row (a CFG batch's unconditional one) and projects it with
``to_q`` when the pipeline post-processes its image; ``get_ovam_callable()`` gives each layer a
``CrossAttentionDAAMBlock`` (scale·q·kᵀ against the layer's own ``to_k`` of new text, softmax over the text's tokens,
summed over steps and heads) and sums the layers, bilinearly resized to the largest grid, the mid block left out.
This script traces the recipe's image with textmask under the empty prompt (``tests/parity_ovam.py``), replays the
UNet call the trace made as the unconditional row of a CFG batch under OVAM's hooks, and compares the two re-queried
with the same text, step by step; then it measures textmask's departures on purpose. No import fix is needed: OVAM's
code, written for diffusers 0.20, runs as it is on textmask's.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import parity_ovam as recipe
from common import command_line, relative_difference, write_fixture
from parity_recipe import spec_arrays

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "ovam.npz"


def main() -> None:
    args = command_line(__doc__, "OVAM_ROOT", "vpulab/ovam")
    sys.path.insert(0, args.reference)
    from ovam.stable_diffusion import StableDiffusionHooker

    from textmask import TextMasker
    from textmask.postprocess import normalize
    from textmask.tokenizer import clip_tokenizer

    pipe, spec = recipe.pipe()
    masker = TextMasker.from_pipe(pipe, resolution=recipe.RESOLUTION)
    calls = []  # the UNet's inputs in textmask's traced forward
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    trace = recipe.textmask_trace(masker)
    handle.remove()
    layers, ours_maps = recipe.requery(trace)
    cond = masker.host.encode_prompts([recipe.PROMPT])
    context = cond.context[0]  # [77, C]: the keys' text as textmask pads it, given to OVAM as embeddings
    tokens = list(range(len(clip_tokenizer()(recipe.PROMPT).input_ids)))  # <SoT>, the words, <EoT>
    groups = [cond.token_maps[0].find(w) for w in recipe.WORDS]

    # OVAM's pipeline, as far as its hooker reads it; postprocess is where it stores a generation's queries.
    ovam_pipe = types.SimpleNamespace(unet=pipe.unet, tokenizer=clip_tokenizer(), text_encoder=pipe.text_encoder,
                                      image_processor=types.SimpleNamespace(postprocess=lambda *a, **k: None))
    (x, t), kw = calls[0]
    cfg = dict(kw, encoder_hidden_states=torch.cat([kw["encoder_hidden_states"], cond.context]))

    def ovam_callable(middle: bool):
        with StableDiffusionHooker(ovam_pipe, locate_middle_block=middle) as hooker, torch.no_grad():
            pipe.unet(torch.cat([x, x]), t.expand(2), **cfg)  # rows: (the traced "", PROMPT)
            ovam_pipe.image_processor.postprocess(None)
        return hooker.get_ovam_callable()

    name_of = {id(m.to_k): name for name, m in masker.host.attention_modules()}
    every = ovam_callable(middle=True)
    blocks = {name_of[id(b.to_k)]: b for b in every.blocks.values()}
    assert sorted(blocks) == sorted(layers), "OVAM (with its mid block) and textmask read the same layers"
    with torch.no_grad():
        # 1. The kept queries: OVAM's [steps, heads, N, d] against the trace's [1, N, C].
        q_err = max(relative_difference(trace.queries[n].reshape(1, -1, b.heads, b.to_k.out_features // b.heads)
                                        .transpose(1, 2), b.hidden_states[0]) for n, b in blocks.items())
        print(f"queries, {len(blocks)} layers (OVAM: the CFG batch's unconditional row): max relative difference "
              f"{q_err:.1e}")
        # 2. Per layer: OVAM sums its heads' softmax over the given tokens; textmask averages them.
        reference, errs = {}, {}
        for name, probs in layers.items():
            layer = trace.layers[name]
            reference[name] = blocks[name](context)[0]  # [77, h, w]
            ours = probs[0].T.reshape(-1, *layer.size) * layer.heads
            errs[name] = relative_difference(ours, reference[name])
        worst = max(errs, key=errs.get)
        print(f"re-query per layer, 77 tokens: max relative difference {errs[worst]:.1e} ({worst}, "
              f"{trace.layers[worst].heads} heads)")
        # 3. The aggregate: OVAM's default callable (no mid block) against textmask's collector with its weights.
        default = ovam_callable(middle=False)
        aggregate = default(context)  # [1, 77, 16, 16]
        err = relative_difference(recipe.ovam_aggregate(trace, layers, list(range(77))), aggregate)
        print(f"aggregate {tuple(aggregate.shape)}, textmask's collector with OVAM's weights (heads, no mid block, "
              f"bilinear): max relative difference {err:.1e}")
        # 4. Departures on purpose, on the words' min-max normalised maps [1, 3, 16, 16].
        own = default(recipe.PROMPT)  # OVAM's text path: unpadded, the softmax over <SoT>, the words, <EoT> only
        keys_err = relative_difference(every.encode_text(recipe.PROMPT, remove_special_tokens=False),
                                       context[: len(tokens)])
        words, own_words = (normalize(torch.stack([a[:, g].mean(1) for g in groups], 1)) for a in (aggregate, own))
        for label, ours, ref in [("textmask's default aggregation (AggSD) against OVAM's, the same 77 keys", ours_maps,
                                  words),
                                 ((f"OVAM's {len(tokens)} keys of its own text path (embeddings equal to "
                                   f"{keys_err:.1e}) against the 77"), own_words, words),
                                 ("end to end: textmask's maps against OVAM's own text path", ours_maps, own_words)]:
            print(f"{label}: {recipe.WORDS} differ by max {(ours - ref).abs().max():.2f}, mean "
                  f"{(ours - ref).abs().mean():.3f}")
    if args.write_fixture:
        write_fixture(FIXTURE, **spec_arrays(spec), tokens=np.array(tokens), names=np.array(list(layers)),
                      layers=torch.cat([reference[n][tokens].flatten(1) for n in layers], 1).numpy(),
                      aggregate=aggregate[0, tokens].numpy())


if __name__ == "__main__":
    main()

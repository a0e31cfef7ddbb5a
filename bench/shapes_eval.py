"""Mask quality of every method on a Shapes split (test by default), against baselines and a ceiling.

    python bench/shapes_eval.py [--split test] [--scenes 200] [--model textmask/demo/model] [--sweep]

Rows: each method on each object's phrase ("red circle"; GT = every instance of it), scored with mean IoU
at the method's own threshold (Otsu), best single-threshold IoU, pixel ROC AUC, the pointing game and the boundary
F-score (DAVIS's, at 0.75% of the diagonal). "every X" phrases (a shape the scene holds twice or more) are scored by
instance: ``refer``'s instances matched one to one at IoU > 0.5. Absent phrases (one per object phrase, naming
nothing in the scene) are scored by the share given an empty mask and the mean area selected.
OVDiff builds prototypes for every test phrase (``--ovdiff-images`` support images each, cached by the
model's fingerprint) and is scored on its own labels, given each scene's phrases and given all of them at once.
The ``attention`` rows (plain and refined) are also broken down by phrase: whether another object in the
scene shares its colour or shape, whether it is the only object in the scene, and the smallest and largest
third of the objects by area.
Baselines: a centre prior, the map of a wrong phrase (sharing neither colour nor shape; under the
caption-prompt row, written as the captions write it), the same pipeline on a randomly initialised UNet, and
the ceiling (GT through the attention grid and back). ``--sweep``
adds the timestep and refinement settings behind the defaults in textmask/defaults.py, DiffSeg's τ and DiffCut's cut.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textmask import TextMasker  # noqa: E402
from textmask.demo.evaluate import (  # noqa: E402
    Scores, absent_phrases, auto_mask, ceiling_heatmap, centre_prior, every_phrases, hungarian_miou, instance_matches, margin_heatmap, object_phrases, phrase_groups, wrong_phrase)
from textmask.demo.model import MODEL_DIR, load_demo_masker  # noqa: E402
from textmask.demo.scenes import caption as caption_of  # noqa: E402
from textmask.demo.scenes import make_scene, split_seeds  # noqa: E402

METHODS = {
    "attention": dict(method="attention", refine=False),
    "attention (caption prompt)": dict(method="attention", refine=False, caption=True),
    "attention+refine": dict(method="attention", refine=True),
    "attention+refine, pamr=False": dict(method="attention", refine=True, pamr=False),
    "noise-diff": dict(method="noise-diff"),
}
# The wrong phrase's map under the same prompt style as each of these rows.
WRONG_WORD_ROWS = {"attention": "baseline-wrong-word", "attention (caption prompt)": "baseline-wrong-word (caption prompt)"}
BREAKDOWN_ROWS = ("attention", "attention+refine")  # also scored per group of phrases (evaluate.phrase_groups)
LDZNET_WEIGHTS = MODEL_DIR / "ldznet.safetensors"  # trained through train/ on the Shapes train split (MODEL_CARD.md)


def score_method(masker, scenes, kwargs, scores: Scores, wrong: Scores | None = None):
    kwargs = dict(kwargs)
    caption = kwargs.pop("caption", False)
    for scene in scenes:
        phrases = object_phrases(scene)
        out = masker.mask(scene.image, " | ".join(phrases), prompt=scene.caption if caption else None, **kwargs)
        for p in phrases:
            heat = out.terms[p][0]
            scores.add(heat.numpy(), auto_mask(heat, p, kwargs["method"]).numpy(), scene.phrase_mask(p))
        if wrong is not None:
            for p in phrases:
                w = wrong_phrase(scene, p)
                # Under the caption prompt the wrong phrase is written as the captions write it: "a green star".
                heat = masker.mask(scene.image, w, prompt=caption_of([w]) if caption else None, **kwargs).terms[w][0]
                wrong.add(heat.numpy(), auto_mask(heat, w, kwargs["method"]).numpy(), scene.phrase_mask(p))


def per_layer_auc(masker, scenes) -> dict[str, float]:
    """Mean pixel AUC of each cross-attention layer's phrase map: shows which layers point at the object."""
    from textmask import forward
    from textmask.capture import ProbsStore
    from textmask.demo.evaluate import roc_auc

    host, aucs = masker.host, {}
    for scene in scenes:
        cond = host.encode_prompts([scene.caption])
        pixels = torch.from_numpy(scene.image).permute(2, 0, 1)[None]
        latents = forward.encode(host, pixels, scene.image.shape[:2])
        x, sigma = forward.add_noise(host, latents, 300, 0)
        store = ProbsStore()
        forward.eps(host, x, sigma, cond, latents, [store])
        for name, p in store.probs.items():
            h, w = store.layers[name].size
            for phrase in object_phrases(scene):
                m = p[0][:, cond.token_maps[0].find(phrase)].mean(-1).reshape(h, w)
                gt = torch.nn.functional.adaptive_avg_pool2d(
                    torch.from_numpy(scene.phrase_mask(phrase)).float()[None, None], (h, w))[0, 0] > 0.5
                aucs.setdefault(f"{name} {h}x{w}", []).append(roc_auc(m.numpy(), gt.numpy()))
    return {k: float(np.mean(v)) for k, v in aucs.items()}


def random_unet_masker(masker):
    """The same pipeline on a randomly initialised denoiser (UNet or transformer) of the same config."""
    host = copy.copy(masker.host)
    torch.manual_seed(1234)
    name = "transformer" if is_dit(host) else "unet"
    model = getattr(host, name)
    setattr(host, name, type(model).from_config(model.config).eval())
    return TextMasker(host)


def is_dit(host) -> bool:
    return hasattr(host, "transformer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("val", "test"), default="test",
                    help="choose settings on val, report on test (default: test)")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--sweep", action="store_true", help="also sweep timestep, refinement and DiffSeg tau settings")
    ap.add_argument("--ldznet", type=Path, default=LDZNET_WEIGHTS, help="LD-ZNet weights for the ld-znet row")
    ap.add_argument("--ovdiff-images", type=int, default=8, help="OVDiff support images per phrase (the method's default: 32)")
    ap.add_argument("--only-ldznet", action="store_true", help="score only the ld-znet row")
    ap.add_argument("--only-segments", action="store_true", help="score only the segments and named-segments rows")
    ap.add_argument("--only-refer", action="store_true", help="score only the refer rows")
    ap.add_argument("--only-masks", action="store_true",
                    help="score only the mask methods' rows (with their breakdown and wrong phrase) and absent phrases")
    ap.add_argument("--only-absent", action="store_true", help="score only the absent phrases")
    ap.add_argument("--min-presence", type=float, default=0.0,
                    help="the absent-phrase rows' min_presence (default 0: off; choose it on val)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    masker = load_demo_masker(args.model)
    scenes = [make_scene(s) for s in split_seeds(args.split, args.scenes)]
    g = masker.host.geometry  # the largest attention grid: the latent (a UNet), the token grid (an MM-DiT)
    grid = g.resolution // (g.size_multiple if is_dit(masker.host) else g.latent_factor)
    rows: dict[str, dict] = {}
    t0 = time.time()
    methods = dict(METHODS)
    if args.ldznet.is_file() and not is_dit(masker.host):  # LD-ZNet reads UNets
        methods["ld-znet (trained on Shapes)"] = dict(method="ld-znet", ldznet=masker.load_ldznet(args.ldznet))
    if args.only_ldznet:
        methods = {k: v for k, v in methods.items() if v["method"] == "ld-znet"}
    if args.only_segments or args.only_refer or args.only_absent:
        methods = {}
    with torch.inference_mode():
        for name, kwargs in methods.items():
            s = Scores()
            wrong = Scores() if name in WRONG_WORD_ROWS else None
            score_method(masker, scenes, kwargs, s, wrong)
            rows[name] = s.summary()
            if name in BREAKDOWN_ROWS:  # where the IoU is lost
                for group, keep in phrase_groups(scenes).items():
                    if any(keep):
                        rows[f"{name} ({group})"] = s.subset(keep).summary()
            if wrong is not None:
                rows[WRONG_WORD_ROWS[name]] = wrong.summary()
    if args.only_segments or args.only_refer:
        with torch.inference_mode():
            rows.update(all_segment_rows(masker, scenes) if args.only_segments else refer_rows(masker, scenes))
    elif args.only_masks or args.only_absent:
        with torch.inference_mode():
            rows.update(absent_rows(masker, scenes, args.min_presence))
    elif not args.only_ldznet:
        other_rows(masker, scenes, grid, rows, args)
    report(masker, rows, scenes, args, time.time() - t0)


@torch.inference_mode()
def other_rows(masker, scenes, grid, rows, args) -> None:
    """The rows besides the mask methods: named segments, segments, refer, OVDiff, baselines, ceiling, sweeps."""
    rows.update(all_segment_rows(masker, scenes))
    rows.update(refer_rows(masker, scenes))
    rows.update(absent_rows(masker, scenes, args.min_presence))
    rows.update(ovdiff_rows(masker, scenes, args.ovdiff_images))
    rnd = Scores()
    score_method(random_unet_masker(masker), scenes, METHODS["attention"], rnd)
    rows["baseline-random-unet"] = rnd.summary()
    centre, ceiling = Scores(), Scores()
    prior = centre_prior(scenes[0].image.shape[0])
    for scene in scenes:
        for p in object_phrases(scene):
            gt = scene.phrase_mask(p)
            centre.add(prior, auto_mask(torch.from_numpy(prior)).numpy(), gt)
            ceil = ceiling_heatmap(gt, grid)
            ceiling.add(ceil, ceil > 0.5, gt)
    rows["baseline-centre"] = centre.summary()
    rows["ceiling"] = ceiling.summary()
    if args.sweep:
        sweep = scenes[: max(20, args.scenes // 4)]
        for t in (100, 200, 300, 400, 500, 600):
            s = Scores()
            score_method(masker, sweep, dict(method="attention", timestep=t), s)
            rows[f"sweep-attention-t{t}"] = s.summary()
        for tau in (0.02, 0.05, 0.2):
            rows.update(segment_rows(masker, sweep, f", sweep DiffSeg tau {tau}", segmenter="diffseg", tau=tau))
        if not is_dit(masker.host):
            for cut in (0.3, 0.7):
                rows.update(segment_rows(masker, sweep, f", sweep DiffCut cut {cut}", cut=cut))
        for mode in ("transpose", "forward"):
            for steps in (1, 2):
                s = Scores()
                score_method(masker, sweep, dict(method="attention", refine=True, refine_mode=mode, refine_steps=steps), s)
                rows[f"sweep-refine-{mode}-{steps}"] = s.summary()


def refer_rows(masker, scenes) -> dict[str, dict]:
    """``refer`` on relational phrases, on "the red circle" where the scene holds one (no relation, no CLIP), the
    same through Ref-Diff (its own proposals, no CLIP), and on "every X"."""
    from textmask.methods.refdiff import refer as refdiff

    relational, one, by_refdiff = Scores(), Scores(), Scores()
    for scene in scenes:
        for phrase, target in scene.relations:
            res = masker.refer(scene.image, phrase)
            relational.add(res.heatmaps[0].numpy(), res.masks[0].numpy(), scene.masks[target])
        for obj, gt in zip(scene.objects, scene.masks):
            if sum(o.phrase == obj.phrase for o in scene.objects) == 1:
                for scores, res in ((one, masker.refer(scene.image, f"the {obj.phrase}")),
                                    (by_refdiff, refdiff(masker.host, scene.image, f"the {obj.phrase}"))):
                    scores.add(res.heatmaps[0].numpy(), res.masks[0].numpy(), gt)
    return {"refer (relational phrases)": relational.summary(), 'refer ("the red circle": one object)': one.summary(),
            'Ref-Diff without CLIP ("the red circle")': by_refdiff.summary(), **every_rows(masker, scenes)}


def every_rows(masker, scenes) -> dict[str, dict]:
    """``refer`` on "every X": the union's IoU, and its instances' precision and recall at IoU > 0.5."""
    union, found, predicted, truth = Scores(), 0, 0, 0
    for scene in scenes:
        for phrase, objects in every_phrases(scene):
            res = masker.refer(scene.image, phrase)
            gt = [scene.masks[i] for i in objects]
            union.add(res.heatmaps[0].numpy(), res.masks[0].numpy(), np.any(gt, axis=0))
            pred = [m.numpy() for m in res.instances[0]]
            found, predicted, truth = found + instance_matches(pred, gt), predicted + len(pred), truth + len(gt)
    print(f'"every X": {union.summary()["n"]} phrases; instances at IoU > 0.5: precision '
          f"{found / max(predicted, 1):.3f}, recall {found / max(truth, 1):.3f} ({found} of {truth}, {predicted} predicted)")
    return {'refer "every X" (union)': union.summary()}


def absent_rows(masker, scenes, min_presence: float = 0.0) -> dict[str, dict]:
    """Absent phrases, each asked alone as the scene's object phrases are here, with ``min_presence`` (default 0:
    off): the share given an empty mask, and the mean area selected; the present phrases given an empty mask; the
    presence score's ROC AUC (present against absent), and the presence that keeps 95% of present phrases."""
    from textmask.demo.evaluate import roc_auc

    empty, area, lost, scores, present = [], [], [], [], []
    for scene in scenes:
        for phrases, is_present in ((absent_phrases(scene), False), (object_phrases(scene), True)):
            for phrase in phrases:
                out = masker.mask(scene.image, phrase, min_presence=min_presence)
                mask = out.masks[0]
                if is_present:
                    lost.append(float(not mask.any()))
                else:
                    empty.append(float(not mask.any()))
                    area.append(float(mask.float().mean()))
                if phrase in out.presence:
                    scores.append(float(out.presence[phrase][0]))
                    present.append(is_present)
    gray = np.full_like(scenes[0].image, 0.5)
    gray_mask = masker.mask(gray, object_phrases(scenes[0])[0], min_presence=min_presence).masks[0]
    gray_area = float(gray_mask.float().mean())
    print(f"absent phrases ({len(empty)}), min_presence {min_presence}: {np.mean(empty):.3f} given an empty mask; "
          f"mean area selected {np.mean(area):.3f}; present phrases given an empty mask: {np.mean(lost):.3f}; "
          f"a gray image: {gray_area:.3f} selected")
    if scores:
        scores, present = np.array(scores), np.array(present)
        print(f"presence: ROC AUC {roc_auc(scores, present):.3f}; 95% of present phrases at or above "
              f"{np.quantile(scores[present], 0.05):.4f}")
    return {}


def segment_rows(masker, scenes, label: str = "", **kwargs) -> dict[str, dict]:
    """Named segments per phrase, and the segments as Hungarian-matched mIoU over objects + background, with
    ``kwargs`` for both (segmenter, cut, tau, pamr); ``label`` names the settings in the rows' names."""
    named, miou, counts = Scores(), [], []
    for scene in scenes:
        phrases = object_phrases(scene)
        res = masker.named_segments(scene.image, phrases, **kwargs)
        for i, p in enumerate(phrases):
            m = res.masks[0, i].numpy()
            named.add(m, m, scene.phrase_mask(p))
        segs = masker.segments(scene.image, **kwargs).masks[0].numpy() > 0.5
        counts.append(len(segs))
        miou.append(hungarian_miou(segs, list(scene.masks) + [~scene.masks.any(0)]))
    print(f"segments{label or ' (defaults)'}: {np.mean(counts):.1f} per scene")
    segments = {"iou": float(np.mean(miou)), "best_iou": float("nan"), "auc": float("nan"), "pointing": float("nan"),
                "n": len(miou)}
    return {f"named-segments{label}": named.summary(), f"segments{label} (Hungarian mIoU)": segments}


def all_segment_rows(masker, scenes) -> dict[str, dict]:
    """The defaults (DiffCut with PAMR on UNets), DiffCut without PAMR, and DiffSeg at its paper's τ."""
    rows = segment_rows(masker, scenes)
    if not is_dit(masker.host):
        rows.update(segment_rows(masker, scenes, ", pamr=False", pamr=False))
    rows.update(segment_rows(masker, scenes, ", DiffSeg (tau 1.1)", segmenter="diffseg", tau=1.1))
    return rows


def ovdiff_rows(masker, scenes, images: int) -> dict[str, dict]:
    """OVDiff given the scene's own phrases (as named segments are), and given all of the test phrases at once."""
    vocabulary = sorted({p for scene in scenes for p in object_phrases(scene)})
    protos = masker.build_prototypes(vocabulary, images=images)  # cached by the model's fingerprint
    given, every = Scores(), Scores()
    for scene in scenes:
        phrases = object_phrases(scene)
        for classes, scores in ((phrases, given), (vocabulary, every)):
            res = masker.ovdiff(scene.image, protos, classes=classes)
            for p in phrases:
                i = classes.index(p) + 1
                # The label is an argmax over classes and background, so the heatmap is the margin over the rest.
                heat = margin_heatmap(res.scores[0], i)
                scores.add(heat.numpy(), res.masks[0, i - 1].numpy(), scene.phrase_mask(p))
    return {"ovdiff (scene phrases)": given.summary(), f"ovdiff (all {len(vocabulary)} phrases)": every.summary()}


def report(masker, rows, scenes, args, seconds) -> None:
    if args.sweep:
        print("Per-layer ROC AUC of the phrase tokens' cross-attention (caption prompt, t=300):")
        for name, auc in per_layer_auc(masker, scenes[:20]).items():
            print(f"  {name:<48} {auc:.2f}")
        print()
    if not rows:  # --only-absent prints its own lines
        print(f"Shapes {args.split} split: {len(scenes)} scenes, model {args.model.name}, {seconds:.0f}s")
        return
    print(f"Shapes {args.split} split: {len(scenes)} scenes, {next(iter(rows.values()))['n']} object phrases, "
          f"model {args.model.name}, {seconds:.0f}s")
    wide = max(len(name) for name in rows)
    print(f"| {'row':<{wide}} | {'IoU':>5} | {'best IoU':>8} | {'AUC':>5} | {'pointing':>8} | {'boundary F':>10} |")
    print(f"|{'-' * (wide + 2)}|{'-' * 7}|{'-' * 10}|{'-' * 7}|{'-' * 10}|{'-' * 12}|")
    for name, r in rows.items():
        print(f"| {name:<{wide}} | {r['iou']:>5.3f} | {r['best_iou']:>8.3f} | {r['auc']:>5.3f} | {r['pointing']:>8.3f} "
              f"| {r.get('boundary_f', float('nan')):>10.3f} |")
    print()
    for name, r in rows.items():
        key = name.replace(" (", "-").replace(")", "").replace(" ", "-").lower()
        print(f"{key}: iou={r['iou']:.2f} best_iou={r['best_iou']:.2f} auc={r['auc']:.2f} pointing={r['pointing']:.2f}")


if __name__ == "__main__":
    main()

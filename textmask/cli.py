"""Command line: ``textmask mask IMAGE|DIR "mask prompt" --checkpoint MODEL --out OUT``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import TextMaskError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class CliError(TextMaskError):
    """A usage problem found before any work starts."""


def _threshold(text: str):
    from .postprocess import parse_threshold  # lazily: keeps `textmask --help` free of torch

    try:
        return parse_threshold(text)
    except TextMaskError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {text!r}") from None


def add_mask_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every masking command (mirroring TextMasker.mask)."""
    from . import defaults
    from .methods import METHODS

    p.add_argument("--method", choices=METHODS, default="attention", help="how masks are decoded (default: attention)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=defaults.REFINE,
                   help=f"refine attention maps with self-attention (default: {'on' if defaults.REFINE else 'off'})")
    p.add_argument("--threshold", type=_threshold, default="auto", help="'auto' (Otsu) or a value in [0, 1]")
    p.add_argument("--soft", action="store_true", help="soft masks instead of binary")
    p.add_argument("--blur", type=float, default=0.0, metavar="PX", help="Gaussian feather, sigma in pixels")
    p.add_argument("--grow", type=float, default=0.0, metavar="PX", help="grow by PX pixels (negative shrinks)")
    p.add_argument("--fill-holes", action="store_true", help="fill holes inside masked regions")
    p.add_argument("--invert", action="store_true", help="invert the mask")
    p.add_argument("--negative", default=None, help="mask prompt to subtract")
    p.add_argument("--prompt", default=None, help="caption to condition on; phrases must occur in it")
    p.add_argument("--timestep", type=int, default=None,
                   help=f"noise level 0-999 (default {defaults.TIMESTEP}; {defaults.LDZNET_TIMESTEP} for ld-znet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="working resolution in pixels (default: the model's)")
    p.add_argument("--ldznet", default=None, metavar="PATH", help="LD-ZNet .safetensors, for --method ld-znet")
    p.add_argument("--template", default=None, help='LD-ZNet prompt template (default "a photo of a {}.")')


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="SD1/SD2/SDXL .safetensors (or .ckpt), or a diffusers folder")
    p.add_argument("--config", default=None, help="diffusers-format config folder overriding the shipped configs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--offload", nargs="?", const="sequential", choices=("model", "sequential"), default=None,
                   help="keep the weights in CPU memory: 'model' moves one component at a time to the device, "
                        "'sequential' (the default) streams each layer (least GPU memory, slowest)")


def add_ovdiff_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=32, help="support images per class (default 32)")
    p.add_argument("--steps", type=int, default=30, help="sampler steps per support image (default 30)")
    p.add_argument("--cfg", type=float, default=8.0, help="guidance scale (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="cache folder (default ~/.cache/textmask/ovdiff)")
    p.add_argument("--resolution", type=int, default=None, help="support image size in pixels (default: the model's)")


def build_parser() -> argparse.ArgumentParser:
    from . import defaults

    parser = argparse.ArgumentParser(prog="textmask", description="Text-prompted masks from a Stable Diffusion model.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("mask", *DEPRECATED):
        seg = sub.add_parser(name, help="mask an image or a folder of images" if name == "mask" else f"old name of '{DEPRECATED[name]}'")
        seg.add_argument("input", help="an image file or a folder of images")
        seg.add_argument("mask_prompt", help='e.g. "red car | truck AND NOT wheels"')
        seg.add_argument("--out", required=True, help="mask PNG (for one image) or a folder (for a folder)")
        seg.add_argument("--heatmap", default=None, help="heatmap overlay PNG (or folder, for a folder input)")
        add_model_options(seg)
        add_mask_options(seg)
    segs = sub.add_parser("segments", help="segment everything (DiffSeg): a label image and one mask per segment")
    segs.add_argument("input", help="an image file or a folder of images")
    segs.add_argument("--out", required=True, help="output folder: labels.png and segment-NNN.png per image")
    segs.add_argument("--tau", type=float, default=defaults.TAU,
                      help=f"KL merge threshold (default {defaults.TAU}; lower gives more segments)")
    segs.add_argument("--kmeans", action="store_true", help="refine segments with K-means")
    segs.add_argument("--timestep", type=int, default=defaults.TIMESTEP)
    segs.add_argument("--seed", type=int, default=0)
    segs.add_argument("--resolution", type=int, default=None)
    add_model_options(segs)
    ref = sub.add_parser("refer", help="mask the object a referring expression names (Ref-Diff)")
    ref.add_argument("input", help="an image file")
    ref.add_argument("expression", help='e.g. "the man on the left"')
    ref.add_argument("--out", required=True, help="mask PNG")
    ref.add_argument("--heatmap", default=None, help="attribution heatmap overlay PNG")
    ref.add_argument("--clip", default=None, help="local transformers CLIP folder, for the discriminative score")
    ref.add_argument("--alpha", type=float, default=0.5, help="weight of the generative score when --clip is given")
    ref.add_argument("--tau", type=float, default=defaults.TAU, help="DiffSeg merge threshold for the proposals")
    ref.add_argument("--timestep", type=int, default=defaults.REFER_TIMESTEP,
                     help=f"noise level (default {defaults.REFER_TIMESTEP})")
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--resolution", type=int, default=None)
    add_model_options(ref)
    conv = sub.add_parser("convert-ldznet", help="convert the official LDZNet_txt2mask.ckpt to textmask safetensors")
    conv.add_argument("input", help="the reference LatentSeg checkpoint (.ckpt), read with weights_only=True")
    conv.add_argument("output", help="output .safetensors")
    conv.add_argument("--no-ema", dest="ema", action="store_false", help="take the raw weights, not the EMA copy")
    conv.add_argument("--config", default=None, help="diffusers UNet config folder of the base model (default: SD1)")
    protos = sub.add_parser("prototypes", help="OVDiff prototypes: build (cached) or list the cache")
    psub = protos.add_subparsers(dest="action", required=True)
    build = psub.add_parser("build", help="build (or reuse) prototypes for class names")
    build.add_argument("classes", nargs="+", help="class names; 'sky:stuff' / 'tree:thing' override the stuff list")
    add_ovdiff_options(build)
    add_model_options(build)
    lst = psub.add_parser("list", help="list cached prototypes")
    lst.add_argument("--cache", default=None, help="cache folder (default ~/.cache/textmask/ovdiff)")
    ovd = sub.add_parser("ovdiff", help="segment images with OVDiff prototypes (built first if not cached)")
    ovd.add_argument("input", help="an image file or a folder of images")
    ovd.add_argument("--classes", required=True, help="comma-separated class names")
    ovd.add_argument("--out", required=True, help="output folder: labels.png and <class>.png per image")
    ovd.add_argument("--clip", default=None, help="local transformers CLIP folder, for the class pre-filter")
    add_ovdiff_options(ovd)
    add_model_options(ovd)
    app = sub.add_parser("app", help="the standalone web app (Gradio): upload, type, download masks")
    add_model_options(app)  # --checkpoint also takes 'shapes', the bundled model
    app.add_argument("--ldznet", default=None, metavar="PATH", help="LD-ZNet weights, to offer the ld-znet method")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=7860)
    demo = sub.add_parser("demo", help="mask a few Shapes scenes with the bundled tiny model (no download)")
    demo.add_argument("--out", default="textmask-demo", help="output folder (default: ./textmask-demo)")
    demo.add_argument("--scenes", type=int, default=4, help="how many test scenes (default 4)")
    return parser


def mask_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(
        method=args.method, refine=args.refine, threshold=args.threshold, soft=args.soft, blur=args.blur,
        grow=args.grow, fill_holes=args.fill_holes, invert=args.invert, negative=args.negative, prompt=args.prompt,
        timestep=args.timestep, seed=args.seed, resolution=args.resolution,
    )
    if args.template is not None:
        kwargs["template"] = args.template
    return kwargs


def load_masker(args: argparse.Namespace):
    import torch

    from .hosts import diffusers_loading
    from .masker import TextMasker

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CliError(f"unknown device '{device}'") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, True):
        raise CliError(f"device '{device}' is not available on this machine (torch {torch.__version__})")
    dtype_name = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    ckpt = Path(args.checkpoint)
    load_to = "cpu" if args.offload else device
    if ckpt.is_dir():
        host = diffusers_loading.from_pretrained(ckpt, device=load_to, dtype=dtype, show_progress=True)
    else:
        host = diffusers_loading.from_single_file(ckpt, device=load_to, dtype=dtype, config=args.config,
                                                  show_progress=True)
    if args.offload == "model":
        host.enable_model_cpu_offload(device)
    elif args.offload == "sequential":
        host.enable_sequential_cpu_offload(device)
    return TextMasker(host)


def _inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CliError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return files
    if not path.exists():
        raise CliError(f"input not found: {path}")
    return [path]


def _move_into(stage: Path, out: Path) -> None:
    """Move everything staged into the ``out`` folder, replacing earlier results of the same names."""
    out.mkdir(parents=True, exist_ok=True)
    for item in stage.iterdir():
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)


def _staging(out: Path) -> Path:
    """A temporary folder beside ``out``, so finished files move into place atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".textmask-", dir=out.parent))


def run_mask(args: argparse.Namespace) -> None:
    import torch

    from .images import check_image, load_image
    from .render import save_mask, save_overlay
    from .mask_prompt import parse, with_negative

    src, out = Path(args.input), Path(args.out)
    files = _inputs(src)
    folder = src.is_dir()
    if not folder and out.suffix.lower() != ".png":
        raise CliError(f"--out must be a .png file for a single image, got {out}")
    if folder and out.suffix:
        raise CliError(f"--out must be a folder for a folder input, got {out}")
    with_negative(parse(args.mask_prompt), args.negative)  # fail on syntax before loading a model
    for f in files:
        check_image(f)  # fail on an unreadable image before any work; pixels are decoded one at a time below
    if (args.method == "ld-znet") != (args.ldznet is not None):
        raise CliError("--method ld-znet and --ldznet PATH go together")
    if args.ldznet is not None and (not args.ldznet.strip() or not Path(args.ldznet).is_file()):
        raise CliError(f"LD-ZNet weights not found: '{args.ldznet}'")
    masker = load_masker(args)
    ldznet = masker.load_ldznet(args.ldznet) if args.ldznet else None

    stage = _staging(out)
    try:
        results = []
        bar = masker.host.progress(len(files), "images") if folder else None
        for f in files:
            img = load_image(f)
            res = masker.mask(img, args.mask_prompt, **mask_kwargs(args), **({"ldznet": ldznet} if ldznet else {}))
            name = f.stem + ".png"
            save_mask(res.masks[0], stage / ("mask-" + name))
            if args.heatmap:
                save_overlay(torch.from_numpy(img), res.heatmaps[0], stage / ("heat-" + name))
            results.append(name)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        # Everything succeeded: move files into place.
        heat = Path(args.heatmap) if args.heatmap else None
        if folder:
            out.mkdir(parents=True, exist_ok=True)
            if heat:
                heat.mkdir(parents=True, exist_ok=True)
        for name in results:
            os.replace(stage / ("mask-" + name), out / name if folder else out)
            if heat:
                os.replace(stage / ("heat-" + name), heat / name if folder else heat)
        print(f"wrote {len(results)} mask{'s' if len(results) != 1 else ''} to {out}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_segments(args: argparse.Namespace) -> None:
    from .images import check_image, load_image
    from .render import colour_labels, save_mask, save_rgb

    src, out = Path(args.input), Path(args.out)
    files = _inputs(src)
    if out.suffix:
        raise CliError(f"--out must be a folder, got {out}")
    if not args.tau > 0:
        raise CliError(f"--tau must be positive, got {args.tau}")
    for f in files:
        check_image(f)
    masker = load_masker(args)
    stage = _staging(out)
    try:
        for f in files:
            img = load_image(f)
            res = masker.segments(img, tau=args.tau, kmeans=args.kmeans, timestep=args.timestep, seed=args.seed,
                                  resolution=args.resolution)
            target = stage / f.stem if src.is_dir() else stage
            target.mkdir(parents=True, exist_ok=True)
            save_rgb(colour_labels(res.labels[0]), target / "labels.png")
            for k, m in enumerate(res.masks[0]):
                save_mask(m, target / f"segment-{k:03d}.png")
        _move_into(stage, out)
        print(f"wrote segments of {len(files)} image{'s' if len(files) != 1 else ''} to {out}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_refer(args: argparse.Namespace) -> None:
    import torch

    from .images import check_image, load_image
    from .render import save_mask, save_overlay
    from .subject import subject

    src, out = Path(args.input), Path(args.out)
    if not src.is_file():
        raise CliError(f"input not found: {src}")
    if out.suffix.lower() != ".png":
        raise CliError(f"--out must be a .png file, got {out}")
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha must be in [0, 1], got {args.alpha}")
    subject(args.expression)  # fail on an expression without a noun before loading a model
    check_image(src)
    image = load_image(src)
    masker = load_masker(args)
    stage = _staging(out)
    try:
        res = masker.refer(image, args.expression, clip=args.clip, alpha=args.alpha, tau=args.tau,
                           timestep=args.timestep, seed=args.seed, resolution=args.resolution)
        save_mask(res.masks[0], stage / "mask.png")
        if args.heatmap:
            save_overlay(torch.from_numpy(image), res.heatmaps[0], stage / "heat.png")
            os.replace(stage / "heat.png", args.heatmap)
        os.replace(stage / "mask.png", out)
        print(f"wrote the mask of '{res.subject}' to {out}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_convert_ldznet(args: argparse.Namespace) -> None:
    import json

    from .ldznet.weights import convert_reference, read_reference_checkpoint, save_ldznet

    out = Path(args.output)
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"output must be a .safetensors file, got {out}")
    config_dir = Path(args.config) if args.config else Path(__file__).resolve().parent / "configs" / "sd1"
    config_file = config_dir / "unet" / "config.json" if (config_dir / "unet").is_dir() else config_dir / "config.json"
    if not config_file.is_file():
        raise CliError(f"no UNet config.json in {config_dir}")
    state = read_reference_checkpoint(args.input)
    model = convert_reference(state, json.loads(config_file.read_text()), use_ema=args.ema)
    stage = _staging(out)
    try:
        save_ldznet(model, stage / out.name, {"source": Path(args.input).name})
        os.replace(stage / out.name, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote LD-ZNet ({model.architecture}, {model.trainable_parameters() / 1e6:.1f}M parameters) to {out}")


def _build_prototypes(masker, classes: list[str], args: argparse.Namespace):
    from .ovdiff import build_prototypes

    return build_prototypes(masker.host, classes, images=args.images, steps=args.steps, cfg=args.cfg, seed=args.seed,
                            cache_dir=args.cache, resolution=args.resolution)


def run_prototypes(args: argparse.Namespace) -> None:
    from .ovdiff import list_cache

    if args.action == "list":
        rows = list_cache(args.cache)
        if not rows:
            print("no cached prototypes")
        for r in rows:
            if r["status"] != "ok":
                print(f"{r['path']}: {r['status']}")
                continue
            print(f"{r['class']:<24} {'stuff' if r['stuff'] == 'True' else 'thing':<6} model {r['model'][:12]} "
                  f"{int(r['bytes']) / 1e6:.2f} MB  {r['settings']}")
        return
    masker = load_masker(args)
    protos = _build_prototypes(masker, list(args.classes), args)
    for c in protos.classes:
        print(f"{c.name}: {len(c.foreground())} foreground, {len(c.background())} background prototypes")


def run_ovdiff(args: argparse.Namespace) -> None:
    from .images import check_image, load_image
    from .render import colour_labels, save_mask, save_rgb
    from .ovdiff import label

    src, out = Path(args.input), Path(args.out)
    files = _inputs(src)
    if out.suffix:
        raise CliError(f"--out must be a folder, got {out}")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        raise CliError("--classes needs at least one name")
    for f in files:
        check_image(f)
    masker = load_masker(args)
    protos = _build_prototypes(masker, classes, args)
    stage = _staging(out)
    try:
        for f in files:
            res = label(protos, load_image(f), clip=args.clip, seed=args.seed)
            target = stage / f.stem if src.is_dir() else stage
            target.mkdir(parents=True, exist_ok=True)
            lab = res.labels[0]
            save_rgb(colour_labels(lab) * (lab > 0)[..., None], target / "labels.png")
            for i, name in enumerate(res.names):
                save_mask(res.masks[0, i], target / f"{name.replace('/', '_')}.png")
        _move_into(stage, out)
        print(f"wrote OVDiff masks of {len(files)} image{'s' if len(files) != 1 else ''} to {out}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_app(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CliError("the web app needs Gradio: pip install 'textmask[app]'") from None
    from .app import build_app

    if args.checkpoint == "shapes":
        from .demo.model import MODEL_DIR

        args.checkpoint = str(MODEL_DIR)
    masker = load_masker(args)
    ldznet = masker.load_ldznet(args.ldznet) if args.ldznet else None
    build_app(masker, ldznet).launch(server_name=args.host, server_port=args.port)


def run_demo(args: argparse.Namespace) -> None:
    from .demo.demo import run_demo as demo

    if args.scenes < 1:
        raise CliError("--scenes must be at least 1")
    demo(Path(args.out), scenes=args.scenes)


# Old command names that still work, with a one-line notice: users have scripts.
DEPRECATED = {"segment": "mask"}
COMMANDS = {"mask": run_mask, "segments": run_segments, "refer": run_refer, "demo": run_demo,
            "convert-ldznet": run_convert_ldznet, "prototypes": run_prototypes, "ovdiff": run_ovdiff,
            "app": run_app}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input prints one line and exits 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in DEPRECATED:
        print(f"textmask: note: '{args.command}' is now '{DEPRECATED[args.command]}'; the old name will go",
              file=sys.stderr)
        args.command = DEPRECATED[args.command]
    try:
        COMMANDS[args.command](args)
    except TextMaskError as e:
        print(f"textmask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("textmask: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

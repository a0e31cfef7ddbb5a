"""Command line: ``textmask mask IMAGE|DIR "mask prompt" --checkpoint MODEL --out OUT``."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from . import defaults, options
from .errors import TextMaskError, describe

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class CliError(TextMaskError):
    """A usage problem found before any work starts."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors in textmask's one line (argparse prints its usage first)."""

    def error(self, message: str):
        self.exit(2, f"textmask: error: {message} (see '{self.prog} --help')\n")


def checked(check: Callable, text_to=float) -> Callable[[str], object]:
    """An argparse type that reads a number and bounds it with an ``options`` check."""

    def parse(text: str):
        try:
            return check(text_to(text))
        except TextMaskError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        except OverflowError:  # a whole number too large for a float, e.g. 400 digits
            shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
            raise argparse.ArgumentTypeError(f"number too large: {shown}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None

    parse.__name__ = check.__name__  # argparse names the type in its messages
    return parse


def whole(text: str) -> int:
    """A whole number, also written 1e3 or 10.0; one with a fraction is refused as such, other text as no number."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise TextMaskError(f"not a whole number: {text!r}") from None
        return int(number)


def finite(name: str) -> Callable[[str], float]:
    """An argparse type for a finite number (its bounds are checked once the image's size is known)."""
    return checked(lambda value: options.in_range(name, value, -float("inf"), float("inf")))


def _threshold(text: str):
    from .postprocess import parse_threshold  # lazily: keeps `textmask --help` free of torch

    try:
        return parse_threshold(text)
    except TextMaskError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'otsu' or a number in [0, 1], got {text!r}") from None


def add_mask_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every masking command (mirroring TextMasker.mask)."""
    from .methods import METHODS

    p.add_argument("--method", choices=METHODS, default=defaults.METHOD,
                   help=f"how masks are decoded (default: {defaults.METHOD})")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=defaults.REFINE,
                   help=f"refine attention maps with self-attention (default: {'on' if defaults.REFINE else 'off'})")
    p.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=defaults.PAMR,
                   help="refine the maps along the image's own edges (PAMR) before thresholding "
                        f"(default: {'on' if defaults.PAMR else 'off'})")
    p.add_argument("--threshold", type=_threshold, default=defaults.THRESHOLD,
                   help="'auto' (Otsu's; a phrase naming one thing keeps only its strongest regions), 'otsu' (every "
                        "region above Otsu's) or a value in [0, 1]")
    p.add_argument("--soft", action="store_true", help="soft masks instead of binary")
    p.add_argument("--blur", type=finite("blur"), default=0.0, metavar="PX",
                   help="Gaussian feather, sigma in pixels (0 to the image's diagonal)")
    p.add_argument("--grow", type=finite("grow"), default=0.0, metavar="PX",
                   help="grow by PX pixels, negative shrinks (up to the image's diagonal)")
    p.add_argument("--fill-holes", action="store_true", help="fill holes inside masked regions")
    p.add_argument("--invert", action="store_true", help="invert the mask")
    p.add_argument("--negative", default=None, help="mask prompt to subtract")
    p.add_argument("--min-presence", type=checked(options.min_presence), default=defaults.MIN_PRESENCE, metavar="P",
                   help="a phrase whose presence score (0-1, attention only) is below P selects nothing (default 0: "
                        "off; docs/quality.md, \"Absence\")")
    p.add_argument("--prompt", default=None, help="caption to condition on; phrases must occur in it")
    p.add_argument("--timestep", type=checked(options.timestep, whole), default=None,
                   help=f"noise level 0-999 (default {defaults.TIMESTEP}; {defaults.LDZNET_TIMESTEP} for ld-znet)")
    add_seed_resolution(p)
    p.add_argument("--ldznet", default=None, metavar="PATH", help="LD-ZNet .safetensors, for --method ld-znet")
    p.add_argument("--template", default=None, help=f'LD-ZNet prompt template (default "{defaults.LDZNET_TEMPLATE}")')


def add_seed_resolution(p: argparse.ArgumentParser, what: str = "working resolution") -> None:
    p.add_argument("--seed", type=checked(options.seed, whole), default=0, help="noise seed (taken modulo 2^63)")
    p.add_argument("--resolution", type=checked(options.resolution, whole), default=None,
                   help=f"{what} in pixels, {options.MIN_RESOLUTION}-{options.MAX_RESOLUTION} (default: the model's)")


def add_image_options(p: argparse.ArgumentParser) -> None:
    from .images import MAX_PIXELS

    p.add_argument("--max-pixels", type=checked(lambda v: options.in_range("max-pixels", v, 1, 2**40, integer=True),
                                                whole), default=None,
                   help=f"refuse images with more pixels than this (default {MAX_PIXELS:,}, or $TEXTMASK_MAX_PIXELS)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="SD1/SD2/SDXL/SD3/Flux .safetensors (or .ckpt), or a diffusers folder")
    p.add_argument("--config", default=None, help="diffusers-format config folder overriding the shipped configs")
    p.add_argument("--components", default=None,
                   help="SD3/Flux single files: the model's diffusers folder, for the VAE and text encoders the file lacks")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--offload", nargs="?", const="sequential", choices=("model", "sequential"), default=None,
                   help="keep the weights in CPU memory: 'model' moves one component at a time to the device, "
                        "'sequential' (the default) streams each layer (least GPU memory, slowest)")


CACHE_HELP = "prototype cache folder (default: $TEXTMASK_CACHE/ovdiff, else ~/.cache/textmask/ovdiff)"


def add_ovdiff_options(p: argparse.ArgumentParser) -> None:
    images = checked(lambda v: options.count("images", v, options.MAX_SUPPORT_IMAGES), whole)
    steps = checked(lambda v: options.count("steps", v, options.MAX_STEPS), whole)
    p.add_argument("--images", type=images, default=defaults.OVDIFF_IMAGES,
                   help=f"support images per class (default {defaults.OVDIFF_IMAGES})")
    p.add_argument("--steps", type=steps, default=defaults.OVDIFF_STEPS,
                   help=f"sampler steps per support image (default {defaults.OVDIFF_STEPS})")
    p.add_argument("--cfg", type=checked(options.cfg), default=defaults.OVDIFF_CFG,
                   help=f"guidance scale, 0-{options.MAX_CFG:g} (default {defaults.OVDIFF_CFG:g})")
    p.add_argument("--cache", default=None, help=CACHE_HELP)
    add_seed_resolution(p, "support image size")


def build_parser() -> argparse.ArgumentParser:

    parser = Parser(prog="textmask", description="Text-prompted masks from a Stable Diffusion model.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in ("mask", *DEPRECATED):
        what = "mask an image or a folder of images" if name == "mask" else f"old name of '{DEPRECATED[name]}'"
        seg = sub.add_parser(name, help=what)
        seg.add_argument("input", help="an image file or a folder of images")
        seg.add_argument("mask_prompt", help='e.g. "red car | truck AND NOT wheels"')
        seg.add_argument("--out", required=True, help="mask PNG (for one image) or a folder (for a folder)")
        seg.add_argument("--heatmap", default=None, help="heatmap overlay PNG (or folder, for a folder input)")
        add_model_options(seg)
        add_mask_options(seg)
        add_image_options(seg)
    segs = sub.add_parser("segments", help="segment everything (DiffCut, or DiffSeg): a label image and one mask per "
                                           "segment")
    segs.add_argument("input", help="an image file or a folder of images")
    segs.add_argument("--out", required=True, help="output folder: labels.png and segment-NNN.png per image")
    segs.add_argument("--segmenter", choices=options.SEGMENTERS, default=defaults.SEGMENTER,
                      help=f"how segments are found (default: {defaults.SEGMENTER})")
    segs.add_argument("--cut", type=checked(options.cut), default=defaults.CUT,
                      help=f"DiffCut's normalised-cut threshold (default {defaults.CUT}; higher gives more segments)")
    segs.add_argument("--tau", type=checked(options.tau), default=defaults.TAU,
                      help=f"DiffSeg's KL merge threshold (default {defaults.TAU}; lower gives more segments)")
    segs.add_argument("--kmeans", action="store_true",
                      help="refine DiffSeg's segments with K-means (its reference's optional step; with --segmenter "
                           "diffseg)")
    segs.add_argument("--timestep", type=checked(options.timestep, whole), default=None,
                      help=f"noise level (default: the segmenter's, {defaults.DIFFCUT_TIMESTEP} for DiffCut and "
                           f"{defaults.TIMESTEP} for DiffSeg)")
    segs.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=defaults.PAMR,
                      help="refine the segments along the image's edges (PAMR; default on)")
    add_seed_resolution(segs)
    add_model_options(segs)
    add_image_options(segs)
    ref = sub.add_parser("refer", help="mask the object a referring expression names (its subject's instances; "
                                          "Ref-Diff with --clip)")
    ref.add_argument("input", help="an image file")
    ref.add_argument("expression", help='e.g. "the man on the left"')
    ref.add_argument("--out", required=True, help="mask PNG")
    ref.add_argument("--heatmap", default=None, help="attribution heatmap overlay PNG")
    ref.add_argument("--clip", default=None, help="local transformers CLIP folder, for the discriminative score")
    ref.add_argument("--alpha", type=checked(options.alpha), default=defaults.REFER_ALPHA,
                     help="weight of the generative score when --clip is given, 0-1")
    ref.add_argument("--tau", type=checked(options.tau), default=defaults.TAU,
                     help="DiffSeg merge threshold for Ref-Diff's proposals (with --clip)")
    ref.add_argument("--timestep", type=checked(options.timestep, whole), default=defaults.REFER_TIMESTEP,
                     help=f"noise level of Ref-Diff's forward (with --clip; default {defaults.REFER_TIMESTEP}); "
                          f"the subject's instances use the attention method's ({defaults.TIMESTEP})")
    add_seed_resolution(ref)
    add_model_options(ref)
    add_image_options(ref)
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
    lst.add_argument("--cache", default=None, help=CACHE_HELP)
    ovd = sub.add_parser("ovdiff", help="segment images with OVDiff prototypes (built first if not cached)")
    ovd.add_argument("input", help="an image file or a folder of images")
    ovd.add_argument("--classes", required=True, help="comma-separated class names")
    ovd.add_argument("--out", required=True, help="output folder: labels.png and <class>.png per image")
    ovd.add_argument("--clip", default=None, help="local transformers CLIP folder, for the class pre-filter")
    add_ovdiff_options(ovd)
    add_model_options(ovd)
    add_image_options(ovd)
    app = sub.add_parser("app", help="the standalone web app (Gradio): upload, type, download masks")
    add_model_options(app)  # --checkpoint also takes 'shapes', the bundled model
    app.add_argument("--ldznet", default=None, metavar="PATH", help="LD-ZNet weights, to offer the ld-znet method")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=checked(lambda v: options.in_range("port", v, 1, 65535, integer=True), whole),
                     default=7860, help="port to listen on, 1-65535 (default 7860)")
    demo = sub.add_parser("demo", help="mask a few Shapes scenes with the bundled tiny model (no download)")
    demo.add_argument("--out", default="textmask-demo", help="output folder (default: ./textmask-demo)")
    demo.add_argument("--scenes", type=checked(lambda v: options.count("scenes", v, 500), whole), default=4,
                      help="how many test scenes, 1-500 (default 4)")
    return parser


def mask_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(
        method=args.method, refine=args.refine, threshold=args.threshold, soft=args.soft, blur=args.blur,
        grow=args.grow, fill_holes=args.fill_holes, invert=args.invert, negative=args.negative, prompt=args.prompt,
        timestep=args.timestep, seed=args.seed, resolution=args.resolution, pamr=args.pamr,
        min_presence=args.min_presence,
    )
    if args.template is not None:
        kwargs["template"] = args.template
    return kwargs


class Shard:
    """This process's place in a run sharded by ``accelerate launch`` or ``torchrun`` (RANK and WORLD_SIZE set): it
    takes inputs rank, rank + count, ...; one process (rank 0) shows progress and reports. A single process is the
    only shard."""

    def __init__(self, count: int | None = None, rank: int | None = None):
        self.count = int(os.environ.get("WORLD_SIZE", "1")) if count is None else count
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self.part = self.rank if self.count > 1 else None
        self._state = None
        if self.count > 1:
            from accelerate import PartialState

            self._state = PartialState()

    def total(self, mine: int) -> int:
        """The sum of every process's ``mine``, once all of them got here; the process group's last use."""
        if self._state is None:
            return mine
        import torch
        import torch.distributed as dist

        count = torch.tensor([mine], device=self._state.device)
        dist.all_reduce(count)
        # The group's last use: gloo's threads torn down at interpreter exit instead sometimes abort (SIGABRT).
        dist.destroy_process_group()
        return int(count.item())


def load_masker(args: argparse.Namespace, shard: Shard | None = None):
    import torch

    from .hosts import diffusers_loading
    from .masker import TextMasker

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if shard is not None and shard.count > 1 and device == "cuda":
        device = f"cuda:{shard.local_rank}"  # one GPU per process
    options.device(device)
    dtype_name = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    ckpt = Path(args.checkpoint)
    load_to = "cpu" if args.offload else device
    show = shard is None or shard.rank == 0  # one process's bars in a sharded run
    if ckpt.is_dir():
        given = [flag for flag, value in (("--config", args.config), ("--components", args.components)) if value]
        if given:
            raise CliError(f"{' and '.join(given)} complete a single checkpoint file; the diffusers folder "
                           f"{ckpt} holds its own")
        host = diffusers_loading.from_pretrained(ckpt, device=load_to, dtype=dtype, show_progress=show)
    else:
        host = diffusers_loading.from_single_file(ckpt, device=load_to, dtype=dtype, config=args.config,
                                                  components=args.components, show_progress=show)
    if args.offload == "model":
        host.enable_model_cpu_offload(device)
    elif args.offload == "sequential":
        host.enable_sequential_cpu_offload(device)
    return TextMasker(host)


def input_files(path: Path) -> list[Path]:
    """The images a command reads: the file itself, or a folder's image files (``images.IMAGE_SUFFIXES``)."""
    from .images import IMAGE_SUFFIXES

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CliError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        return files
    if not path.exists():
        raise CliError(f"input not found: {path}")
    return [path]


def output_names(files: list[Path]) -> dict[Path, str]:
    """Each input's output name in a folder run: its stem, or its whole name where inputs share a stem
    (a.png and a.jpg give a.png.png and a.jpg.png)."""
    stems = Counter(f.stem for f in files)
    names = {f: f.stem if stems[f.stem] == 1 else f.name for f in files}
    clash = [n for n, c in Counter(names.values()).items() if c > 1]
    if clash:
        raise CliError(f"inputs {', '.join(str(f) for f in files if names[f] == clash[0])} would share the output "
                       f"'{clash[0]}'; rename one")
    return names


def check_output_name(flag: str, value: str | None, folder: bool) -> None:
    """``--out`` and ``--heatmap`` alike name a .png file for a single image and a folder for a folder input; one line
    otherwise (an empty path, which would be the current folder, is refused when the path is planned)."""
    if value is None:
        return
    png = Path(value).suffix.lower() == ".png"
    if folder and png:
        raise CliError(f"{flag} must be a folder for a folder input, got {value}")
    if not folder and not png:
        raise CliError(f"{flag} must be a .png file for a single image, got {value or repr(value)}")


def check_clip_flag(path: str | None) -> None:
    """``--clip`` names a local transformers CLIP folder (its config.json there): one line before any model loads
    otherwise, whether or not this input's path reads it."""
    from .clip import folder_problem

    problem = None if path is None else folder_problem(path)
    if problem:
        raise CliError(f"--clip '{path}' {problem}; name a local transformers CLIP folder")


def checked_images(files: list[Path], args: argparse.Namespace) -> list[tuple[int, int]]:
    """Every input's (H, W), each image decoded and checked, and the options bounded by an image's size checked
    against it: all before any model loads."""
    from .images import check_image

    sizes = [check_image(f) for f in files]
    for size in sizes:
        if getattr(args, "blur", None) is not None:
            options.blur(args.blur, size)
        if getattr(args, "grow", None) is not None:
            options.grow(args.grow, size)
    return sizes


def settings_fingerprint(args: argparse.Namespace) -> str:
    """What makes a folder run's outputs what they are: every option but where they go and how the model is run."""
    skip = {"input", "out", "heatmap", "device", "offload", "debug", "func", "max_pixels", "cache"}
    items = {k: v for k, v in vars(args).items() if k not in skip}
    ckpt = Path(str(items.get("checkpoint", "")))
    if ckpt.exists():
        stat = ckpt.stat()
        items["checkpoint"] = [str(ckpt.resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_mask(args: argparse.Namespace) -> None:
    import torch

    from .images import load_image
    from .mask_prompt import parse, with_negative
    from .outputs import FolderRun, Outputs, input_identity
    from .render import save_mask, save_overlay

    src = Path(args.input)
    files = input_files(src)
    folder = src.is_dir()
    check_output_name("--out", args.out, folder)
    check_output_name("--heatmap", args.heatmap, folder)
    with_negative(parse(args.mask_prompt), args.negative)  # fail on syntax before loading a model
    options.text("--prompt", args.prompt)
    checked_images(files, args)  # unreadable, truncated or too large images fail before any work
    if (args.method == "ld-znet") != (args.ldznet is not None):
        raise CliError("--method ld-znet and --ldznet PATH go together")
    if args.min_presence > 0 and args.method != "attention":
        raise CliError(f"--min-presence reads the presence that --method attention measures; {args.method} measures "
                       "none")
    if args.ldznet is not None and (not args.ldznet.strip() or not Path(args.ldznet).is_file()):
        raise CliError(f"LD-ZNet weights not found: '{args.ldznet}'")
    with Outputs(inputs=files) as outputs:
        out = outputs.folder(args.out, "--out") if folder else outputs.file(args.out, "--out")
        heat = None
        if args.heatmap is not None:
            heat = outputs.folder(args.heatmap, "--heatmap") if folder else outputs.file(args.heatmap, "--heatmap")
        names = output_names(files) if folder else {files[0]: None}
        for flag, where in (("--out", out), ("--heatmap", heat)):
            if folder and where is not None:
                outputs.targets([where / f"{names[f]}.png" for f in files], flag)
        shard = Shard() if folder else Shard(1, 0)
        runs = [FolderRun(d, settings_fingerprint(args), shard.part) for d in (out, heat) if folder and d is not None]
        mine = files[shard.rank::shard.count]  # this process's share of a sharded run (all of it otherwise)
        sources = {f: input_identity(f) for f in mine} if folder else {}
        todo = [f for f in mine
                if not (folder and all(r.done([Path(r.folder) / f"{names[f]}.png"], sources[f]) for r in runs))]
        masker = load_masker(args, shard) if todo else None
        ldznet = {"ldznet": masker.load_ldznet(args.ldznet)} if todo and args.ldznet else {}
        shown = folder and todo and shard.rank == 0
        with masker.host.progress(len(todo), "images") if shown else contextlib.nullcontext() as bar:
            for f in todo:  # the bar clears its line however the loop ends, so a last message starts clean
                img = load_image(f)
                res = masker.mask(img, args.mask_prompt, **mask_kwargs(args), **ldznet)
                targets = [out / f"{names[f]}.png" if folder else out]
                save_mask(res.masks[0], outputs.stage(targets[0]))
                if heat is not None:
                    targets.append(heat / f"{names[f]}.png" if folder else heat)
                    save_overlay(torch.from_numpy(img), res.heatmaps[0], outputs.stage(targets[1]))
                outputs.commit()
                for run, target in zip(runs, targets):
                    run.record([target], source=sources[f])
                if bar is not None:
                    bar.update(1)
        done = shard.total(len(todo))  # every process's, once all are done
        if shard.rank == 0:
            for run in runs:
                run.finish()
    if shard.rank == 0:
        skipped = len(files) - done
        print(f"wrote {done} mask{'s' if done != 1 else ''} to {out}"
              + (f" ({skipped} already there with these settings)" if skipped else "")
              + (f", in {shard.count} processes" if shard.count > 1 else ""))


def run_segments(args: argparse.Namespace) -> None:
    from .images import load_image
    from .outputs import FolderRun, Outputs
    from .render import colour_labels, save_mask, save_rgb

    if args.kmeans and args.segmenter != "diffseg":
        raise CliError("--kmeans refines DiffSeg's segments: add --segmenter diffseg")
    src = Path(args.input)
    files = input_files(src)
    if Path(args.out).suffix.lower() == ".png":
        raise CliError(f"--out must be a folder, got {args.out}")
    checked_images(files, args)
    with Outputs(inputs=files) as outputs:
        out = outputs.folder(args.out, "--out")
        names = output_names(files) if src.is_dir() else {files[0]: ""}
        outputs.targets([out / names[f] / "labels.png" for f in files], "--out")
        run = FolderRun(out, settings_fingerprint(args))
        masker = load_masker(args)
        for f in files:
            res = masker.segments(load_image(f), segmenter=args.segmenter, cut=args.cut, tau=args.tau,
                                  kmeans=args.kmeans, timestep=args.timestep, seed=args.seed,
                                  resolution=args.resolution, pamr=args.pamr)
            target = out / names[f]
            written = [target / "labels.png"] + [target / f"segment-{k:03d}.png" for k in range(len(res.masks[0]))]
            save_rgb(colour_labels(res.labels[0]), outputs.stage(written[0]))
            for m, path in zip(res.masks[0], written[1:]):
                save_mask(m, outputs.stage(path))
            outputs.commit()
            run.record(written, group=names[f])
        run.finish()
    print(f"wrote segments of {len(files)} image{'s' if len(files) != 1 else ''} to {out}")


def run_refer(args: argparse.Namespace) -> None:
    import torch

    from .images import load_image
    from .outputs import Outputs
    from .render import save_mask, save_overlay
    from .subject import subject

    src = Path(args.input)
    if not src.is_file():
        raise CliError(f"input not found: {src}")
    check_output_name("--out", args.out, folder=False)
    check_output_name("--heatmap", args.heatmap, folder=False)
    check_clip_flag(args.clip)
    options.expression(args.expression)
    subject(args.expression)  # fail on an expression without a noun before loading a model
    checked_images([src], args)
    with Outputs(inputs=[src]) as outputs:
        out = outputs.file(args.out, "--out")
        heat = outputs.file(args.heatmap, "--heatmap") if args.heatmap is not None else None
        image = load_image(src)
        masker = load_masker(args)
        res = masker.refer(image, args.expression, clip=args.clip, alpha=args.alpha, tau=args.tau,
                           timestep=args.timestep, seed=args.seed, resolution=args.resolution)
        save_mask(res.masks[0], outputs.stage(out))
        if heat is not None:
            save_overlay(torch.from_numpy(image), res.heatmaps[0], outputs.stage(heat))
        outputs.commit()
    print(f"wrote the mask of '{res.subject}' to {out}")


def run_convert_ldznet(args: argparse.Namespace) -> None:
    import json

    from .ldznet.weights import convert_reference, read_reference_checkpoint, save_ldznet

    from .outputs import Outputs

    if Path(args.output).suffix.lower() != ".safetensors":
        raise CliError(f"output must be a .safetensors file, got {args.output}")
    config_dir = Path(args.config) if args.config else Path(__file__).resolve().parent / "configs" / "sd1"
    config_file = config_dir / "unet" / "config.json" if (config_dir / "unet").is_dir() else config_dir / "config.json"
    if not config_file.is_file():
        raise CliError(f"no UNet config.json in {config_dir}")
    with Outputs(inputs=[Path(args.input)]) as outputs:
        out = outputs.file(args.output, "output")
        state = read_reference_checkpoint(args.input)
        try:
            config = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CliError(f"cannot read {config_file} as JSON ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(config, dict):
            raise CliError(f"{config_file} holds a {type(config).__name__}, not a UNet config object")
        model = convert_reference(state, config, use_ema=args.ema)
        save_ldznet(model, outputs.stage(out), {"source": Path(args.input).name})
        outputs.commit()
    print(f"wrote LD-ZNet ({model.architecture}, {model.trainable_parameters() / 1e6:.1f}M parameters) to {out}")


def _build_prototypes(masker, classes: list[str], args: argparse.Namespace):
    from .ovdiff import build_prototypes

    return build_prototypes(masker.host, classes, images=args.images, steps=args.steps, cfg=args.cfg, seed=args.seed,
                            cache_dir=args.cache, resolution=args.resolution)


def run_prototypes(args: argparse.Namespace) -> None:
    from .ovdiff import list_cache
    from .ovdiff.prototypes import writable_folder

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
    writable_folder(args.cache)  # before the model loads
    options.names(list(args.classes), "class names", "class name")
    masker = load_masker(args)
    protos = _build_prototypes(masker, list(args.classes), args)
    for c in protos.classes:
        print(f"{c.name}: {len(c.foreground())} foreground, {len(c.background())} background prototypes")


def class_files(classes: list[str]) -> list[str]:
    """Each class's mask file name beside labels.png; one line where two would share a file or one is too long."""
    from .outputs import NAME_MAX

    # separators become "_", and so does a leading dot: ".." would be a hidden "...png"
    files = [re.sub(r"^\.", "_", c.replace("/", "_").replace("\\", "_")) + ".png" for c in classes]
    for c, f in zip(classes, files):
        if len(os.fsencode(f)) > NAME_MAX:
            raise CliError(f"class '{c[:40]}...' is too long for its mask's file name ({len(os.fsencode(f))} bytes, "
                           f"at most {NAME_MAX} with '.png'); shorten it")
    taken = Counter(f.lower() for f in files + ["labels.png"])
    clash = [c for c, f in zip(classes, files) if taken[f.lower()] > 1]
    if clash:
        raise CliError(f"class '{clash[0]}' would share a file with another output (labels.png or a class of the "
                       "same name); rename it")
    return files


def run_ovdiff(args: argparse.Namespace) -> None:
    from .images import load_image
    from .outputs import FolderRun, Outputs
    from .ovdiff import label
    from .ovdiff.prototypes import writable_folder
    from .render import colour_labels, save_mask, save_rgb

    src = Path(args.input)
    files = input_files(src)
    if Path(args.out).suffix.lower() == ".png":
        raise CliError(f"--out must be a folder, got {args.out}")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        raise CliError("--classes needs at least one name")
    options.names(classes, "class names", "class name")  # unreadable text or duplicates, before the model loads
    mask_files = class_files([c.rpartition(":")[0] if c.endswith((":stuff", ":thing")) else c for c in classes])
    check_clip_flag(args.clip)
    checked_images(files, args)
    writable_folder(args.cache)
    with Outputs(inputs=files) as outputs:
        out = outputs.folder(args.out, "--out")
        names = output_names(files) if src.is_dir() else {files[0]: ""}
        outputs.targets([out / names[f] / m for f in files for m in ["labels.png", *mask_files]], "--out")
        run = FolderRun(out, settings_fingerprint(args))
        masker = load_masker(args)
        protos = _build_prototypes(masker, classes, args)
        for f in files:
            res = label(protos, load_image(f), clip=args.clip, seed=args.seed)
            target = out / names[f]
            lab = res.labels[0]
            written = [target / "labels.png"] + [target / m for m in mask_files]
            save_rgb(colour_labels(lab) * (lab > 0)[..., None], outputs.stage(written[0]))
            for i, path in enumerate(written[1:]):
                save_mask(res.masks[0, i], outputs.stage(path))
            outputs.commit()
            run.record(written, group=names[f])
        run.finish()
    print(f"wrote OVDiff masks of {len(files)} image{'s' if len(files) != 1 else ''} to {out}")


def check_address(host: str, port: int) -> None:
    """One line, before the model loads, when the app could not listen on ``host:port``."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise CliError(f"cannot listen on {host}:{port}: the address does not resolve ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as e:
            raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run_app(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise CliError("the web app needs Gradio: pip install 'textmask[app]'")
    from .app import build_app

    check_address(args.host, args.port)
    if args.checkpoint == "shapes":
        from .demo.model import MODEL_DIR

        args.checkpoint = str(MODEL_DIR)
    masker = load_masker(args)
    ldznet = masker.load_ldznet(args.ldznet) if args.ldznet else None
    app = build_app(masker, ldznet)
    try:
        app.launch(server_name=args.host, server_port=args.port)
    except OSError as e:  # taken between the check and the launch
        raise CliError(f"cannot listen on {args.host}:{args.port}: {str(e).splitlines()[0]}") from None


def run_demo(args: argparse.Namespace) -> None:
    from .demo.demo import run_demo as demo
    from .outputs import FolderRun, Outputs
    from .ovdiff.prototypes import writable_folder

    check_output_name("--out", args.out, folder=True)
    with Outputs() as outputs:
        out = outputs.folder(args.out, "--out")
        writable_folder(None)  # the demo's OVDiff prototypes, before the model loads
        summary_stage = outputs.stage_folder(out)
        demo(summary_stage, scenes=args.scenes, echo=lambda line: print(line.replace(str(summary_stage), str(out))))
        run = FolderRun(out, settings_fingerprint(args))
        run.record(outputs.commit(), group="")
        run.finish()


# Old command names that still work, with a one-line notice: users have scripts.
DEPRECATED = {"segment": "mask"}
COMMANDS = {"mask": run_mask, "segments": run_segments, "refer": run_refer, "demo": run_demo,
            "convert-ldznet": run_convert_ldznet, "prototypes": run_prototypes, "ovdiff": run_ovdiff,
            "app": run_app}


_interrupted: list[int] = []  # the signals received: whatever error an interrupted import then raises, it was one


_raising: list[bool] = [False]  # off while torch imports: an exception raised inside its C++ start-up aborts


def _interrupt(signum, frame) -> None:
    _interrupted.append(signum)
    if _raising[0]:
        raise KeyboardInterrupt  # SIGTERM and SIGHUP unwind like Ctrl-C: staging is removed, nothing partial is left


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: bad input prints one line and exits 2, an interruption (Ctrl-C, SIGTERM, SIGHUP) one line and
    exits 130, any other failure one line and exits 1; ``--debug`` shows the traceback instead."""
    import signal

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    _interrupted.clear()
    _raising[0] = False
    previous = {}
    try:
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                previous[getattr(signal, name)] = signal.signal(getattr(signal, name), _interrupt)
    except ValueError:  # not the main thread (an embedding host): its own handlers stay
        pass
    try:
        return _run(argv, debug)
    finally:
        for signum, handler in previous.items():  # as they were for whoever called main()
            signal.signal(signum, handler)


def _run(argv: Sequence[str] | None, debug: bool) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command in DEPRECATED:
            print(f"textmask: note: '{args.command}' is now '{DEPRECATED[args.command]}'; the old name will go",
                  file=sys.stderr)
            args.command = DEPRECATED[args.command]
        import torch  # noqa: F401  (imported while a signal only marks itself, then acted on)

        from .images import pixel_limit

        _raising[0] = True
        if _interrupted:
            raise KeyboardInterrupt
        with pixel_limit(getattr(args, "max_pixels", None)):
            COMMANDS[args.command](args)
    except TextMaskError as e:
        if debug:
            raise
        print(f"textmask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("textmask: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: its one line is printed already
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except Exception as e:  # noqa: BLE001  (the last resort: one line, never a traceback)
        if debug:
            raise
        if _interrupted:  # e.g. a module whose import the signal cut short, failing when imported again
            print("textmask: interrupted", file=sys.stderr)
            return 130
        print(f"textmask: error: {describe(e)} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

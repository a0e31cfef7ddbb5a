"""Fit LD-ZNet (or ZNet, ``--znet``) on PhraseCut with HF accelerate; one GPU, many, or CPU.

    python -m train.train_ldznet --base MODEL --data PHRASECUT_DIR --out runs/ldznet
    accelerate launch --multi_gpu --num_processes 8 -m train.train_ldznet --base MODEL --data DIR --out DIR

MODEL is an SD checkpoint file, a diffusers folder, or ``shapes`` (the bundled demo model). The frozen host
UNet's features are computed on the fly. Checkpoints (``checkpoint-STEP/``) hold the full training state;
``--resume`` continues from the newest one bit-exactly. Every checkpoint also exports ``ldznet.safetensors``
(the EMA weights when ``--ema`` > 0) for the ComfyUI node and ``--ldznet``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from textmask import options
from textmask.cli import checked, whole
from textmask.errors import TextMaskError
from textmask.ldznet import LDZNet, load_ldznet, save_ldznet, znet_config
from textmask.ldznet.inference import TRAIN_TIMESTEPS, ldznet_logits

from .data import ReferringDataset, load_split

MOST = 10**9  # steps, intervals: more than any run takes


def number(name: str, lo: float, hi: float, *, integer: bool = False, above: bool = False, below: bool = False):
    """An argparse type: a finite number in [lo, hi] (whole with ``integer``), ``lo`` itself refused with ``above``
    and ``hi`` with ``below``; one line naming the bounds otherwise."""
    def check(value):
        value = options.in_range(name, value, lo, hi, integer=integer)
        if (above and value == lo) or (below and value == hi):
            raise TextMaskError(f"{name} must be {f'above {lo:g}' if value == lo else f'below {hi:g}'}, got {value!r}")
        return value

    check.__name__ = name
    return checked(check, whole if integer else float)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="SD checkpoint file, diffusers folder, or 'shapes'")
    ap.add_argument("--data", required=True, help="PhraseCut folder (refer_*.json, image_data_split.json, images/)")
    ap.add_argument("--format", default="phrasecut", choices=["phrasecut", "refcoco"])
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, ldznet.safetensors")
    ap.add_argument("--steps", type=number("steps", 1, MOST, integer=True), default=100_000, help="optimizer steps")
    ap.add_argument("--batch-size", type=number("batch-size", 1, 4096, integer=True), default=4, help="per device")
    ap.add_argument("--grad-accum", type=number("grad-accum", 1, 4096, integer=True), default=1)
    ap.add_argument("--lr", type=number("lr", 0, 1), default=1e-5)
    ap.add_argument("--warmup", type=number("warmup", 0, MOST, integer=True), default=0, help="linear warm-up steps")
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                    help="learning rate after warm-up: constant (reference) or cosine decay to 0 at --steps")
    ap.add_argument("--weight-decay", type=number("weight-decay", 0, 10), default=1e-2)
    ap.add_argument("--dice", type=number("dice", 0, 1000), default=0.0, help="weight of an added Dice loss (reference: 0)")
    ap.add_argument("--ema", type=number("ema", 0, 1, below=True), default=0.9999, help="EMA decay; 0 disables")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--resolution", type=number("resolution", 64, 4096, integer=True), default=384,
                    help="square crop side in pixels, a multiple of the base model's (64 for SD)")
    ap.add_argument("--znet", action="store_true", help="train ZNet: latents and text only, no host features")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from these LD-ZNet weights (e.g. a run at a lower --resolution) instead of the host UNet's")
    ap.add_argument("--no-init", dest="init", action="store_false", help="do not start ZNet from the host UNet's weights")
    ap.add_argument("--save-every", type=number("save-every", 1, MOST, integer=True), default=1000)
    ap.add_argument("--log-every", type=number("log-every", 1, MOST, integer=True), default=10)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--num-workers", type=number("num-workers", 0, 1024, integer=True), default=2)
    ap.add_argument("--seed", type=checked(options.seed, whole), default=0)
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic GPU kernels, so a resumed run matches an unbroken one bit for bit (slower)")
    ap.add_argument("--max-minutes", type=number("max-minutes", 0, 1e7, above=True), default=None, help="stop (and checkpoint) after this wall time")
    return ap.parse_args(argv)


def load_host(base: str, device, dtype):
    """The frozen host model through textmask's diffusers host."""
    from textmask.hosts import diffusers_loading

    if base == "shapes":
        from textmask.demo.model import MODEL_DIR

        base = str(MODEL_DIR)
    path = Path(base)
    if path.is_dir():
        host = diffusers_loading.from_pretrained(path, device=device, dtype=dtype)
    else:
        host = diffusers_loading.from_single_file(path, device=device, dtype=dtype)
    for m in (host.unet, host.vae, host.text_encoder, host.text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval()
    return host


def init_from_weights(path: Path, base_config: dict, upsample_steps: int, znet: bool, resolution: int) -> LDZNet:
    """Trainable LD-ZNet from a textmask safetensors file made for this base, its pools resampled to ``resolution``."""
    model = load_ldznet(path).requires_grad_(True)
    if model.with_features == znet:
        kind = "ZNet" if znet else "LD-ZNet"
        raise ValueError(f"--init-from {path.name} is not a {kind} model; drop --znet or pick other weights")
    def as_json(config: dict) -> dict:  # tuples and lists compare equal
        return json.loads(json.dumps(config, sort_keys=True))

    if as_json(model.config) != as_json(base_config) or model.upsample_steps != upsample_steps:
        raise ValueError(f"--init-from {path.name} was trained on another base model than --base")
    model.set_train_resolution(resolution)
    return model


class EpochSampler(torch.utils.data.Sampler):
    """A permutation per epoch from (seed, epoch): resumable without saving sampler state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def collate(items: list[dict]) -> dict:
    return {"pixels": torch.stack([i["pixels"] for i in items]), "mask": torch.stack([i["mask"] for i in items]),
            "prompt": [i["prompt"] for i in items]}


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def save_ema(ema, path: Path) -> None:
    """EMA shadow weights as safetensors (never a pickle), with the step count in the metadata."""
    from safetensors.torch import save_file

    tensors = {f"{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)}
    save_file(tensors, str(path), metadata={"optimization_step": str(ema.optimization_step), "decay": str(ema.decay)})


def load_ema(ema, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(f.get_tensor(f"{i}"))
        ema.optimization_step = int(f.metadata()["optimization_step"])


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    return found[-1] if found else None


def step_randomness(seed: int, step: int, micro: int, process: int) -> tuple[int, int]:
    """(timestep, noise seed) for one micro-batch: a function of the step, so resuming repeats it exactly."""
    key = ((seed * 1_000_003 + step) * 1009 + micro) * 257 + process
    g = torch.Generator().manual_seed(key)
    return int(torch.randint(*TRAIN_TIMESTEPS, (1,), generator=g)), key * 64


def lr_factor(step: int, warmup: int, steps: int, schedule: str) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up, then constant or cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return 1.0


def train(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from textmask.outputs import check_folder

    out = check_folder(args.out, "--out")
    samples = load_split(args.data, args.split, args.format)  # bad data fails before anything is written
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed, deterministic=args.deterministic)
    host_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if accelerator.device.type == "cpu":
        host_dtype = torch.float32
    host = load_host(args.base, accelerator.device, host_dtype)
    if args.resolution % host.geometry.size_multiple:
        raise ValueError(f"--resolution must be a multiple of {host.geometry.size_multiple} for this base model, got "
                         f"{args.resolution}")
    steps_up = int(math.log2(host.geometry.latent_factor))
    if args.init_from is not None:
        base_config = znet_config(host.unet.config, int(host.vae.config.latent_channels))
        model = init_from_weights(args.init_from, base_config, steps_up, args.znet, args.resolution)
    else:
        model = LDZNet.from_unet(host.unet, latent_channels=int(host.vae.config.latent_channels), upsample_steps=steps_up,
                                 with_features=not args.znet, init_weights=args.init, train_resolution=args.resolution)
    model.train()
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    ema = EMAModel(model.parameters(), decay=args.ema) if args.ema > 0 else None

    dataset = ReferringDataset(samples, size=args.resolution, train=True, seed=args.seed)
    sampler = EpochSampler(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                                         num_workers=args.num_workers, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"the split has {len(dataset)} samples, fewer than one batch of {args.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.schedule))
    out.mkdir(parents=True, exist_ok=True)  # only now: bad data, a bad model or setting leaves no run folder behind
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    if ema is not None:
        ema.to(accelerator.device)
    core = accelerator.unwrap_model(model)

    step = 0
    if args.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            accelerator.load_state(str(ckpt))
            step = json.loads((ckpt / "progress.json").read_text())["step"]
            if ema is not None:
                load_ema(ema, ckpt / "ema.safetensors")
            accelerator.print(f"resumed from {ckpt} at step {step}")

    def save(step: int) -> None:
        ckpt = out / f"checkpoint-{step}"
        accelerator.save_state(str(ckpt))
        if accelerator.is_main_process:
            (ckpt / "progress.json").write_text(json.dumps({"step": step}))
            if ema is not None:
                save_ema(ema, ckpt / "ema.safetensors")
            export(ckpt / "ldznet.safetensors")

    def export(path: Path) -> None:
        if ema is not None:
            ema.store(core.parameters())
            ema.copy_to(core.parameters())
        try:
            save_ldznet(core, path, {"base": Path(args.base).name, "steps": str(step)})
        finally:
            if ema is not None:
                ema.restore(core.parameters())

    per_epoch = len(loader) // args.grad_accum
    bar = tqdm(total=args.steps, initial=step, desc="ld-znet", disable=not accelerator.is_local_main_process)
    log = (out / "log.jsonl").open("a") if accelerator.is_main_process else None
    start, running = time.time(), []
    try:
        while step < args.steps:
            epoch, done_in_epoch = divmod(step, per_epoch)
            sampler.epoch = dataset.epoch = epoch
            batches = accelerator.skip_first_batches(loader, done_in_epoch * args.grad_accum) if done_in_epoch else loader
            for micro, batch in enumerate(batches):
                t, noise_seed = step_randomness(args.seed, step, micro % args.grad_accum, accelerator.process_index)
                with accelerator.accumulate(model):
                    logits = ldznet_logits(host, core, batch["pixels"], batch["prompt"], t, noise_seed, forward=model)
                    target = batch["mask"].to(logits.device, logits.dtype)
                    if target.shape[-2:] != logits.shape[-2:]:
                        target = F.interpolate(target, logits.shape[-2:], mode="nearest")
                    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
                    if args.dice:
                        loss = loss + args.dice * dice_loss(logits.float(), target.float())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                running.append(accelerator.gather(loss.detach().float().reshape(1)).mean().item())  # all ranks'
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if ema is not None:
                    ema.step(core.parameters())
                bar.update(1)
                if step % args.log_every == 0 or step == args.steps:
                    mean = sum(running) / len(running)
                    running.clear()
                    bar.set_postfix(loss=f"{mean:.4f}")
                    if log is not None:
                        log.write(json.dumps({"step": step, "loss": round(mean, 6), "lr": schedule.get_last_lr()[0],
                                              "minutes": round((time.time() - start) / 60, 2)}) + "\n")
                        log.flush()
                over_time = args.max_minutes is not None and (time.time() - start) / 60 >= args.max_minutes
                if step % args.save_every == 0 or step == args.steps or over_time:
                    save(step)
                if step >= args.steps or over_time:
                    break
            if args.max_minutes is not None and (time.time() - start) / 60 >= args.max_minutes:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    accelerator.wait_for_everyone()
    final = out / "ldznet.safetensors"
    if accelerator.is_main_process:
        export(final)
    return final


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        path = train(args)
    except (FileNotFoundError, ValueError, TextMaskError) as e:  # bad data or model paths: one line, no traceback
        raise SystemExit(f"train_ldznet: error: {e}") from None
    finally:
        torch.use_deterministic_algorithms(was_deterministic)  # a global switch: leave the caller's as it was
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

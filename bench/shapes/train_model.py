"""Train the tiny Shapes model (VAE, CLIP text encoder, UNet) that ships as textmask's demo model.

    python bench/shapes/train_model.py --out textmask/demo/model --vae-from BASE \
        --frozen-text --no-token-mixing --qk-gain 2.5 --self-qk-gain 2.5 --lr 7e-4 --unet-minutes 62

(the exact commands behind the bundled model are in its MODEL_CARD.md)

Everything is regenerated from seeds: the scenes (textmask.demo.scenes, train split), the initial weights
and the data order. The output is a diffusers-format folder with fp16 safetensors, the loss curves and
the model card's numbers (train_log.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from textmask.demo.scenes import COLOURS, SHAPES, caption, make_scene, split_seeds  # noqa: E402
from textmask.schedule import ddpm_alphas_cumprod  # noqa: E402
from textmask.tokens import BOS, EOS  # noqa: E402
from textmask.tokenizer import clip_tokenizer  # noqa: E402

CONFIGS = {
    "vae": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 64], latent_channels=4,
                layers_per_block=1, norm_num_groups=16, sample_size=128),
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[48, 64, 96],
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64,
                 attention_head_dim=4, norm_num_groups=16),
    "text_encoder": dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS),
}


# The 32×32 and 16×16 levels only, the mid block at 16×16 (`--two-levels`; tried, see the model card).
TWO_LEVEL_UNET = {**CONFIGS["unet"], "block_out_channels": [48, 96], "down_block_types": ["CrossAttnDownBlock2D"] * 2,
                  "up_block_types": ["CrossAttnUpBlock2D"] * 2}


def unet_config(args) -> dict:
    """The UNet config the command line asks for: release 3's, or two levels, with any channels or heads given."""
    config = dict(TWO_LEVEL_UNET if args.two_levels else CONFIGS["unet"])
    if args.unet_channels:
        config["block_out_channels"] = list(args.unet_channels)
    if args.unet_heads:
        config["attention_head_dim"] = args.unet_heads  # diffusers' name for the number of heads
    return config


def channel_list(value: str) -> list[int]:
    """--unet-channels: comma-separated integers, e.g. 64,96,144."""
    return [int(c) for c in value.split(",")]


def _render(seed: int):
    s = make_scene(seed)
    return (s.image * 255 + 0.5).astype(np.uint8), [o.phrase for o in s.objects]


def scene_pool(count: int, workers: int = 2):
    """The first ``count`` train scenes as uint8 images and their objects' phrases, in drawing order."""
    with Pool(workers) as pool:
        items = pool.map(_render, list(split_seeds("train", count)), chunksize=64)
    images = torch.from_numpy(np.stack([i for i, _ in items])).permute(0, 3, 1, 2).contiguous()
    return images, [p for _, p in items]


def partial_phrases(phrases: list[str], gen: torch.Generator) -> list[str]:
    """A true but incomplete naming: the phrases of a random non-empty proper subset of the scene's distinct phrases.

    Every instance of a kept phrase stays named, so no named phrase points at only some of its objects.
    A scene with one distinct phrase keeps all its phrases.
    """
    distinct = list(dict.fromkeys(phrases))
    if len(distinct) < 2:
        return list(phrases)
    k = int(torch.randint(1, len(distinct), (1,), generator=gen))
    keep = {distinct[i] for i in torch.randperm(len(distinct), generator=gen)[:k].tolist()}
    return [p for p in phrases if p in keep]


def with_distractor(named: list[str], scene: list[str], gen: torch.Generator) -> list[str]:
    """``named`` with one phrase absent from the ``scene`` inserted at a random place.

    The absent object has no pixels, so reading its words can only hurt the denoising: the UNet must learn to
    leave a word unread when nothing matches it, which captions that are always true never teach.
    """
    present = set(scene)
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    extra = absent[int(torch.randint(len(absent), (1,), generator=gen))]
    at = int(torch.randint(len(named) + 1, (1,), generator=gen))
    return named[:at] + [extra] + named[at:]


@torch.no_grad()
def zero_token_mixing(text) -> None:
    """Zero every self-attention output of the text encoder, so no token reads another."""
    for name, module in text.named_modules():
        if name.endswith("self_attn.out_proj"):
            module.weight.zero_()
            module.bias.zero_()


# Angular frequencies of the positional code that lets one head find the previous token: picked by random search to
# keep the summed cosine at every other offset within the sequence at or below 0.33 of its peak.
PREVIOUS_TOKEN_FREQUENCIES = (0.066, 0.369, 0.684, 1.220, 1.518, 1.756, 1.980, 2.472)


def previous_token_head(text, carried: list[int], mix: float, sharpness: float = 4.0, radius: float = 0.057) -> None:
    """Leave one token-mixing head in the text encoder: layer 0's head 0 copies a `carried` word into the next token."""
    # Binds "red" into the "circle" after it, as a trained CLIP binds an adjective to its noun. Where: the last 16
    # embedding dimensions carry a sinusoidal position code only; the head's query is that code rotated back one
    # position and its key the code itself, so each token attends to the one before it (mass >= 0.9999 after the
    # causal mask). What: the head's values read only the span of the carried words' embeddings, which every other
    # token and position is made orthogonal to, so "and" after "circle" and the first EOS after the last shape stay
    # as they were. (Copying every word made the function words and the first EOS carry the shapes, and the maps
    # came out inverted.) Every other head's output is zeroed (zero_token_mixing).
    freqs = torch.tensor(PREVIOUS_TOKEN_FREQUENCIES)
    n = len(freqs)
    pos = text.get_submodule("embeddings.position_embedding").weight
    tok = text.get_input_embeddings().weight
    attn = text.get_submodule("encoder.layers.0.self_attn")
    width, hd = pos.shape[1], attn.head_dim
    code = width - 2 * n
    cos_dims, sin_dims = torch.arange(code, width - n), torch.arange(width - n, width)
    at = torch.arange(pos.shape[0]).float()[:, None] * freqs
    query, key = torch.zeros(hd, width), torch.zeros(hd, width)
    rows = torch.arange(n)
    query[rows, cos_dims], query[rows, sin_dims] = freqs.cos(), freqs.sin()  # cos((i - 1) w)
    query[n + rows, cos_dims], query[n + rows, sin_dims] = -freqs.sin(), freqs.cos()  # sin((i - 1) w)
    key[rows, cos_dims], key[n + rows, sin_dims] = 1.0, 1.0
    with torch.no_grad():
        tok[:, code:] = 0
        pos[:, code:] = radius * torch.cat([at.cos(), at.sin()], 1)
        words = tok[carried, :code] - tok[carried, :code].mean(1, keepdim=True)  # orthogonal to LayerNorm's mean
        tok[carried, :code] = words
        basis = torch.linalg.qr(words.T).Q.T  # [len(carried), code]
        others = torch.ones(len(tok), dtype=torch.bool)
        others[carried] = False
        tok[others, :code] -= (tok[others, :code] @ basis.T) @ basis
        pos[:, :code] -= (pos[:, :code] @ basis.T) @ basis
        value = torch.zeros(hd, width)
        value[: len(carried), :code] = basis
        attn.q_proj.weight[:hd], attn.q_proj.bias[:hd] = sharpness * query, 0
        attn.k_proj.weight[:hd], attn.k_proj.bias[:hd] = key, 0
        attn.v_proj.weight[:hd], attn.v_proj.bias[:hd] = value, 0
        head0 = attn.out_proj.weight[:, :hd].clone()
        zero_token_mixing(text)
        attn.out_proj.weight[:, :hd] = mix * head0


def token_ids(captions: list[str]) -> torch.Tensor:
    """SD-style ids: BOS, tokens, EOS, then EOS padding to 77."""
    tok = clip_tokenizer()
    rows = []
    for c in captions:
        ids = tok(c, add_special_tokens=False)["input_ids"][:75]
        rows.append([BOS] + ids + [EOS] * (76 - len(ids)))
    return torch.tensor(rows)


class Log:
    def __init__(self):
        self.curves: dict[str, list[tuple[int, float]]] = {}

    def add(self, name: str, step: int, value: float):
        self.curves.setdefault(name, []).append((step, round(value, 5)))


def lr_at(step_frac: float, base: float, warmup: float = 0.03) -> float:
    if step_frac < warmup:
        return base * step_frac / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step_frac - warmup) / (1 - warmup))))


def train_vae(images: torch.Tensor, minutes: float, batch: int, log: Log, seed: int, device: str = "cpu"):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**CONFIGS["vae"]).train().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start, step, ema = time.time(), 0, None
    budget = minutes * 60
    while (elapsed := time.time() - start) < budget:
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / budget, 1e-3)
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx].to(device).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        # The sample's noise is drawn on the CPU, so a run's random stream is the same on every device.
        eps = torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(post.mean + post.std * eps).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            log.add("vae_loss", step, ema)
            print(f"vae step {step} loss {ema:.4f} ({elapsed / 60:.1f} min)", flush=True)
        step += 1
    return vae.eval().cpu(), step


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch: int = 64, device: str = "cpu") -> torch.Tensor:
    vae = vae.to(device)
    out = [vae.encode(images[i : i + batch].to(device).float() / 127.5 - 1).latent_dist.mean.cpu()
           for i in range(0, len(images), batch)]
    vae.cpu()
    return torch.cat(out)


def train_unet(latents, ids, minutes: float, batch: int, log: Log, seed: int, dropout: float = 0.1, on_checkpoint=None,
               checkpoint_minutes: float = 15, lr: float = 5e-4, frozen_text: bool = False, qk_gain: float = 1.0,
               token_mixing: bool = True, phrases: list[list[str]] | None = None, partial: float = 0.0,
               init_from: Path | None = None, distractors: float = 0.0, self_qk_gain: float = 1.0,
               previous_token: float = 0.0, unet_config: dict | None = None, device: str = "cpu",
               steps: int | None = None):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if init_from is not None:
        unet = UNet2DConditionModel.from_pretrained(init_from / "unet", torch_dtype=torch.float32).train()
    else:
        unet = UNet2DConditionModel(**(unet_config or CONFIGS["unet"])).train()
    if init_from is None:
        # Default init gives cross-attention logits of std ~0.3: near-uniform over 77 tokens, which a tiny model
        # reads as a bag of words and never sharpens on a CPU budget. Larger Q/K weights start it selective.
        # Self-attention starts flat over the latent grid too, and release 2's stayed so (relative entropy 0.97).
        with torch.no_grad():
            for name, module in unet.named_modules():
                gain = qk_gain if name.endswith("attn2") else self_qk_gain if name.endswith("attn1") else 1.0
                if gain != 1.0:
                    module.to_q.weight.mul_(gain)
                    module.to_k.weight.mul_(gain)
    if init_from is not None:
        text = CLIPTextModel.from_pretrained(init_from / "text_encoder", torch_dtype=torch.float32)
    else:
        text = CLIPTextModel(CLIPTextConfig(**CONFIGS["text_encoder"]))
    params = list(unet.parameters())
    if previous_token > 0 and init_from is None:
        colours = [i for word in clip_tokenizer()(list(COLOURS), add_special_tokens=False)["input_ids"] for i in word]
        previous_token_head(text, colours, previous_token)
    elif not token_mixing:
        # Each token's embedding then depends on that token and its position only, so the EOS padding is the same
        # for every caption and carries nothing. Heads whose object pixels read the padding then learn nothing, and
        # the padding is left as the background's sink, the role BOS plays in SD.
        zero_token_mixing(text)
    if frozen_text:
        # As in SD, the UNet learns to read a fixed text encoder. Trained jointly (the first release), the encoder
        # and UNet settled on near-uniform cross-attention that reads the caption as a bag of words.
        text.eval().requires_grad_(False)
    else:
        text.train()
        params += list(text.parameters())
    unet.to(device), text.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    alphas = ddpm_alphas_cumprod().float()
    empty = token_ids([""])[0]
    gen = torch.Generator().manual_seed(seed + 1)
    cache: dict[str, torch.Tensor] = {}  # partial caption -> token ids
    start, step, ema = time.time(), 0, None
    budget = minutes * 60
    next_checkpoint = checkpoint_minutes * 60

    def progress() -> float:
        # A step budget makes the schedule the same on any machine; a wall-time budget follows the machine's pace.
        if steps is not None:
            return step / steps
        return (time.time() - start) / budget if budget > 0 else 1.0

    while (frac := progress()) < 1:
        elapsed = time.time() - start
        if on_checkpoint is not None and elapsed > next_checkpoint:
            next_checkpoint += checkpoint_minutes * 60
            on_checkpoint(unet.eval(), text.eval(), step)
            unet.train(), text.train(not frozen_text)
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, lr)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z0 = latents[idx]
        drop = torch.rand(batch, generator=gen) < dropout  # 10% caption dropout, for classifier-free guidance
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        tok = ids[idx].clone()
        if (partial > 0 or distractors > 0) and phrases is not None:
            # Name only some of the objects, as a mask prompt does: the pixels of unnamed objects must then learn
            # to leave the named words alone, which full captions never teach. A distractor names an absent object.
            for row, i in enumerate(idx.tolist()):
                named = phrases[i]
                if partial > 0 and float(torch.rand(1, generator=gen)) < partial:
                    named = partial_phrases(named, gen)
                if distractors > 0 and float(torch.rand(1, generator=gen)) < distractors:
                    named = with_distractor(named, phrases[i], gen)
                if named is not phrases[i]:
                    words = caption(named)
                    if words not in cache:
                        cache[words] = token_ids([words])[0]
                    tok[row] = cache[words]
        tok[drop] = empty
        with torch.set_grad_enabled(not frozen_text):
            ctx = text(tok.to(device)).last_hidden_state
        pred = unet(zt.to(device), t.to(device), encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        if step % 25 == 0:
            log.add("unet_loss", step, ema)
            print(f"unet step {step} loss {ema:.4f} ({elapsed / 60:.1f} min)", flush=True)
        step += 1
    return unet.eval().cpu(), text.eval().cpu(), step


def save(out: Path, vae, unet, text, scaling: float, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, model in [("vae", vae), ("unet", unet), ("text_encoder", text)]:
        half = copy.deepcopy(model).to(torch.float16)  # never round the weights still being trained
        if name == "vae":
            half.register_to_config(scaling_factor=scaling)
        half.save_pretrained(out / name, safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000, "prediction_type": "epsilon"}, indent=2))
    (out / "train_log.json").write_text(json.dumps(info, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "textmask" / "demo" / "model")
    ap.add_argument("--scenes", type=int, default=12000)
    ap.add_argument("--vae-minutes", type=float, default=10)
    ap.add_argument("--unet-minutes", type=float, default=85)
    ap.add_argument("--unet-steps", type=int, help="a UNet budget in steps instead of --unet-minutes: the same schedule anywhere")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the random stream is drawn on the CPU either way)")
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--unet-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak UNet learning rate (cosine decay)")
    ap.add_argument("--checkpoint-minutes", type=float, default=15, help="write the model every so many minutes")
    ap.add_argument("--qk-gain", type=float, default=1.0, help="scale of the cross-attention Q and K initial weights")
    ap.add_argument("--self-qk-gain", type=float, default=1.0, help="scale of the self-attention Q and K initial weights")
    ap.add_argument("--no-token-mixing", dest="token_mixing", action="store_false",
                    help="zero the text encoder's self-attention outputs (with --frozen-text: padding carries no caption)")
    ap.add_argument("--previous-token", type=float, default=0.0,
                    help="the text encoder's only mixing: one head copies a colour word into the token after it, at "
                         "this scale (0.045 balances it against the token's own identity); not with --init-from, "
                         "whose encoder is kept")
    ap.add_argument("--frozen-text", action="store_true", help="keep the text encoder at its seeded initialisation")
    ap.add_argument("--vae-from", type=Path, help="reuse this model folder's VAE and scaling factor instead of training one")
    ap.add_argument("--init-from", type=Path, help="start the UNet and text encoder from this model folder")
    ap.add_argument("--partial-captions", type=float, default=0.0,
                    help="probability that a caption names only some of the scene's objects")
    ap.add_argument("--distractors", type=float, default=0.0,
                    help="probability that a caption also names one object absent from the scene")
    ap.add_argument("--two-levels", action="store_true",
                    help="a UNet with the 32x32 and 16x16 levels only, its mid block at 16x16 (no 8x8 level); "
                         "not with --init-from, whose UNet is kept")
    ap.add_argument("--unet-channels", type=channel_list,
                    help="the UNet's channels per level, e.g. 64,96,144 (default 48,64,96); not with --init-from")
    ap.add_argument("--unet-heads", type=int, help="attention heads per transformer (default 4); not with --init-from")
    args = ap.parse_args()
    if args.unet_channels is not None and (len(args.unet_channels) != (2 if args.two_levels else 3)
                                           or any(c <= 0 or c % 16 for c in args.unet_channels)):
        ap.error(f"--unet-channels: one positive multiple of 16 per level, got {args.unet_channels}")
    if args.unet_heads is not None:
        channels = args.unet_channels or unet_config(args)["block_out_channels"]
        if args.unet_heads < 1 or any(c % args.unet_heads for c in channels):
            ap.error(f"--unet-heads: a positive divisor of every level's channels {channels}, got {args.unet_heads}")
    shaping = [f for f, on in (("--two-levels", args.two_levels), ("--unet-channels", args.unet_channels),
                                ("--unet-heads", args.unet_heads), ("--previous-token", args.previous_token)) if on]
    if args.init_from and shaping:
        ap.error(f"--init-from keeps its model's UNet and text encoder, so {', '.join(shaping)} would do nothing")
    if args.unet_steps is not None and args.unet_steps < 1:
        ap.error(f"--unet-steps must be at least 1, got {args.unet_steps}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device: unknown device '{args.device}' (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is available")  # before the scene pool, not after it
    torch.set_num_threads(args.threads)
    t0 = time.time()
    images, phrases = scene_pool(args.scenes, workers=max(2, args.threads))
    print(f"{len(images)} scenes in {time.time() - t0:.0f}s", flush=True)
    log = Log()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae", torch_dtype=torch.float32).eval()
        vae_steps = json.loads((args.vae_from / "train_log.json").read_text())["vae_steps"]
        latents = encode_pool(vae, images, device=args.device)
        scaling = float(vae.config.scaling_factor)
    else:
        vae, vae_steps = train_vae(images, args.vae_minutes, args.vae_batch, log, args.seed, device=args.device)
        latents = encode_pool(vae, images, device=args.device)
        scaling = float(1.0 / latents.std())
    latents = latents * scaling
    ids = token_ids([caption(p) for p in phrases])
    def describe(unet_steps, unet=None, text=None):
        return {
            "command": "python bench/shapes/train_model.py " + " ".join(sys.argv[1:]),
            "seed": args.seed, "scenes": args.scenes, "vae_steps": vae_steps, "unet_steps": unet_steps,
            "vae_batch": args.vae_batch, "unet_batch": args.unet_batch, "lr": args.lr, "frozen_text": args.frozen_text,
            "qk_gain": args.qk_gain, "self_qk_gain": args.self_qk_gain, "token_mixing": args.token_mixing,
            "previous_token": args.previous_token, "scaling_factor": scaling,
            "partial_captions": args.partial_captions, "distractors": args.distractors, "two_levels": args.two_levels,
            "unet_channels": args.unet_channels, "unet_heads": args.unet_heads,
            "init_from": str(args.init_from) if args.init_from else None,
            "unet_step_budget": args.unet_steps, "device": args.device,
            "minutes": round((time.time() - t0) / 60, 1), "threads": args.threads, "torch": torch.__version__,
            "params": {n: sum(p.numel() for p in m.parameters()) for n, m in [("vae", vae), ("unet", unet), ("text_encoder", text)]},
            "curves": log.curves,
        }

    def checkpoint(unet, text, steps):
        save(args.out, vae, unet, text, scaling, describe(steps, unet, text))
        print(f"checkpoint at step {steps}", flush=True)

    unet, text, unet_steps = train_unet(latents, ids, args.unet_minutes, args.unet_batch, log, args.seed,
                                        on_checkpoint=checkpoint, lr=args.lr, frozen_text=args.frozen_text,
                                        qk_gain=args.qk_gain, checkpoint_minutes=args.checkpoint_minutes,
                                        token_mixing=args.token_mixing, phrases=phrases,
                                        partial=args.partial_captions, init_from=args.init_from,
                                        distractors=args.distractors, self_qk_gain=args.self_qk_gain,
                                        previous_token=args.previous_token,
                                        unet_config=unet_config(args),
                                        device=args.device, steps=args.unet_steps)
    info = describe(unet_steps, unet, text)
    save(args.out, vae, unet, text, scaling, info)
    print(f"saved to {args.out} after {info['minutes']} min", flush=True)


if __name__ == "__main__":
    main()

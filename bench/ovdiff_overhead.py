"""OVDiff's cost beyond the host's own work (full-size SD1.5 UNet, random weights).

    python bench/ovdiff_overhead.py [--size 512] [--images 2] [--steps 4] [--device cuda --dtype float16]

Prototype building: the sampler's plain time against the whole build of one class, split into attribution
captured during sampling (a per-forward cost, measured as the median of alternating hooked and plain
forwards) and the per-image work after it (features, DiffSeg, K-means). The ratio at the reference's 30
steps is computed from those parts and printed beside the one-shot measurement at a few steps. Segmenting: one image through the windows and the full image, against the same number of plain
UNet forwards. Also the prototype storage per class.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from overhead import add_device_arguments, build_host, parsed_device  # noqa: E402


def stable_prompts(host):
    """Contexts seeded by the prompt text, so the conditional rows can be told apart as on a real model."""
    from textmask.hosts.contract import Conditioning
    from textmask.tokenizer import tokenize
    from textmask.tokens import TokenMap

    def encode(prompts):
        ctx = [torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
        return Conditioning(torch.cat(ctx).to(host.device, host.dtype), [TokenMap(tokenize(host.tokenizer, p)) for p in prompts])

    host.encode_prompts = encode
    return host


def capture_overhead(host, n: int, size: int, repeats: int = 5) -> float:
    """Extra time of one CFG sampler forward with the attribution capture on, as a fraction (median of
    alternating runs: single 30-step runs differ by ±10% on a shared CPU, far more than the capture costs)."""
    import statistics

    from textmask import forward
    from textmask.capture import AttentionCapture
    from textmask.ovdiff import support

    cond = host.encode_prompts([support.PROMPT.format("cat")])
    both = host.encode_prompts([support.NEGATIVE, support.PROMPT.format("cat")]).select([0] * n + [1] * n)
    x = torch.randn(2 * n, 4, size // 8, size // 8).to(host.device, host.dtype)
    sigma = host.sigma(500).to(host.device).expand(2 * n)
    positions = cond.token_maps[0].find("cat")

    def plain():
        forward.eps(host, x, sigma, both, x)

    def hooked():
        sink = support.AttributionSum(positions, n, (size // 8, size // 8), support.context_matcher(cond.context))
        with AttentionCapture(host.attention_modules(), (size // 8, size // 8), [sink]):
            forward.eps(host, x, sigma, both, x)

    a, b = [], []
    with torch.inference_mode():
        plain(), hooked()
        for _ in range(repeats):
            a.append(timed(plain)[0])
            b.append(timed(hooked)[0])
    return max(0.0, statistics.median(b) / statistics.median(a) - 1)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU kernels are queued, not done, when fn returns
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    add_device_arguments(ap)
    args = ap.parse_args()
    device, dtype = parsed_device(ap, args)
    torch.set_num_threads(2)
    from textmask import forward
    from textmask.ovdiff import build_prototypes, support
    from textmask.ovdiff import label as segment

    host = stable_prompts(build_host(args.size, device, dtype))
    n, steps = args.images, args.steps
    with torch.inference_mode():
        # The sampler's own time is that of the batches the build samples in (sample_support's default).
        batch = inspect.signature(support.sample_support).parameters["batch_size"].default
        # Warm-up: a whole build at one step, so that no timed run pays for a first call's kernel setup (on a GPU
        # the first build took a second longer, and the first plain sampling ran slower than the hooked one).
        with tempfile.TemporaryDirectory() as cache:
            build_prototypes(host, ["dog"], images=min(batch, n), steps=1, cache_dir=cache)

        def sample_plain():
            for start in range(0, n, batch):
                host.sample(support.PROMPT.format("cat"), support.NEGATIVE, min(batch, n - start), steps=steps,
                            cfg=8.0, seed=start)

        plain, _ = timed(sample_plain)
        hooked, _ = timed(lambda: support.sample_support(host, "cat", n, steps=steps, cfg=8.0, seed=0))
        with tempfile.TemporaryDirectory() as cache:
            total, protos = timed(lambda: build_prototypes(host, ["cat"], images=n, steps=steps, cache_dir=cache))
            stored = sum(p.stat().st_size for p in Path(cache).glob("*.safetensors"))
        after = total - hooked  # features + DiffSeg + K-means (+ one fingerprint forward)
        per_step = plain / steps
        capture = capture_overhead(host, n, args.size)  # per sampler forward, median of alternating runs
        projected = capture + after / (per_step * 30)
        image = torch.rand(1, args.size, args.size, 3)
        segment(protos, image)  # warm-up: the first call on a device also pays for its kernels' setup
        seg_time, _ = timed(lambda: segment(protos, image))  # the default: 4 windows to a forward
        seg_single, _ = timed(lambda: segment(protos, image, batch_size=1))
        from textmask.ovdiff.segmentation import window_boxes

        forwards = len(window_boxes(args.size, args.size, args.size / 512))
        empty = host.encode_prompts([""])
        lat = torch.randn(1, 4, args.size // 8, args.size // 8).to(host.device, host.dtype)

        lat_sigma = host.sigma(200).to(host.device).expand(1)

        def plain_forwards():
            for _ in range(forwards):
                forward.eps(host, lat, lat_sigma, empty, lat)

        plain_seg, _ = timed(plain_forwards)
    d = protos.classes[0].fg["mean"].shape[1]
    full = (1 + 32 + 32) * 2 * d * 2  # 32 images, K=32, fg and bg, fp16
    where = torch.cuda.get_device_name() if host.device.type == "cuda" else "CPU 2 threads"
    print(f"SD1.5 UNet (random weights), {args.dtype}, {args.size}px, {where}; {n} support images x {steps} steps, "
          f"sampled {batch} at a time")
    print(f"sampler alone: {plain:.1f}s; with attribution capture: {hooked:.1f}s; whole build: {total:.1f}s "
          f"(after sampling: {after:.1f}s for {n} images)")
    print(f"attribution capture per sampler forward: +{capture:.1%} (median of alternating runs)")
    print(f"| what | measured ({steps} steps, one run) | at 30 steps, from the parts | target |")
    print("|---|---|---|---|")
    print(f"| building beyond the sampler's own time | {(total - plain) / plain:.0%} | {projected:.0%} | <= 15% |")
    print(f"| segmenting one {args.size}px image vs {forwards} plain forwards | {seg_time / plain_seg:.2f}x | | <= 1.3x |")
    print(f"| the same, one window per forward | {seg_single / plain_seg:.2f}x | | |")
    print(f"prototype storage per class: {stored / 1e6:.2f} MB here ({n} images, K={min(32, n * 4096)}), "
          f"{full / 1e6:.2f} MB at 32 images and K=32 (feature width {d}, fp16); reference 0.39 MB")


if __name__ == "__main__":
    main()

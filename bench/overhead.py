"""Overhead of textmask's methods against one plain UNet forward (full-size SD1.5 UNet, random weights).

    python bench/overhead.py [--size 512] [--repeats 3] [--device cuda --dtype float16] [--kernels]

Each row times exactly what TextMasker.mask runs per batch once latents exist: the hooked UNet forward plus
the method's decoding (textmask.methods.attention.AttentionDecoder); the "+pamr" row adds the default PAMR edge
refinement of its maps (textmask.postprocess.edge_refined). Peak extra memory is the RSS peak above the plain
forward's own peak, sampled every 2 ms, as a share of the UNet's weight bytes; on CUDA it is the peak of
allocated GPU memory above the plain forward's.

``--kernels`` also counts, with PyTorch's profiler, what each row launches beyond the plain forward: CUDA kernels on
a GPU (where a forward is bound by launches), and on the CPU the operators that compute (views and metadata
excluded), which are the kernels a GPU would launch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def build_host(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from textmask.hosts.diffusers import CONFIGS, DiffusersHost

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd1" / "unet" / "config.json").read_text()))
    unet = unet.eval() if (torch.device(device).type, dtype) == ("cpu", torch.float32) else unet.eval().to(device, dtype)
    # The VAE and text encoder are not timed (contexts are random); tiny stand-ins keep memory for the UNet.
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1))
    class BenchHost(DiffusersHost):
        """Random latents and contexts (VAE and text encoder are not timed), real token maps."""

        def encode_images(self, pixels):
            g = torch.Generator().manual_seed(1)
            z = torch.randn(pixels.shape[0], 4, pixels.shape[-2] // 8, pixels.shape[-1] // 8, generator=g)
            return z.to(self.device, self.dtype)

        def encode_prompts(self, prompts):
            from textmask.hosts.contract import Conditioning
            from textmask.tokenizer import tokenize
            from textmask.tokens import TokenMap

            g = torch.Generator().manual_seed(2)
            maps = [TokenMap(tokenize(self.tokenizer, p)) for p in prompts]
            return Conditioning(torch.randn(len(prompts), 77, 768, generator=g).to(self.device, self.dtype), maps)

    return BenchHost(unet, vae, te, resolution=size)


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    """--device and --dtype, shared by the benchmarks."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="the UNet's dtype")


def parsed_device(ap: argparse.ArgumentParser, args) -> tuple[torch.device, torch.dtype]:
    """The benchmark's device and dtype, or a one-line argparse error before any model is built."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device: unknown device '{args.device}' (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is available")
    return device, getattr(torch, args.dtype)


VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::slice", "aten::select",
         "aten::transpose", "aten::permute", "aten::t", "aten::alias", "aten::detach", "aten::as_strided",
         "aten::unsqueeze", "aten::squeeze", "aten::unflatten", "aten::flatten", "aten::split", "aten::chunk",
         "aten::narrow", "aten::unbind", "aten::contiguous", "aten::empty", "aten::empty_strided", "aten::lift_fresh",
         "aten::result_type", "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::is_nonzero",
         "aten::item", "aten::_local_scalar_dense", "aten::size", "aten::stride", "aten::numel", "aten::to",
         "aten::_to_copy", "aten::matmul", "aten::linear", "aten::new_empty"}
# No work of their own: views and allocations; to/_to_copy copy only on a change, counted by their aten::copy_;
# matmul/linear are counted by the mm/bmm/addmm they dispatch to.


def launches(fn, cuda: bool) -> int:
    """Kernels one call of ``fn`` launches (CUDA), or computing operators it runs (CPU): see the module docstring."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    count = 0
    for e in prof.events():  # innermost computing operators: an op whose children compute is counted through them
        if not e.name.startswith("aten::") or e.name in VIEWS:
            continue
        if not any(c.name.startswith("aten::") and c.name not in VIEWS for c in e.cpu_children):
            count += 1
    return count


class PeakCUDA:
    """``peak`` is the most GPU memory allocated above the level at entry (CUDA's own peak counter)."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self.base


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the maximum above the level at entry."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def main() -> None:
    from textmask import defaults, forward
    from textmask.hosts.contract import Conditioning
    from textmask.methods.attention import AttentionDecoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", action="store_true", help="also count each row's kernels beyond the plain forward")
    add_device_arguments(ap)
    args = ap.parse_args()
    device, dtype = parsed_device(ap, args)
    cuda = device.type == "cuda"
    peak_memory = PeakCUDA if cuda else PeakRSS

    host = build_host(args.size, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in host.unet.parameters())
    side = args.size // 8
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, side, side, generator=g).to(device, dtype)
    x, sigma = forward.add_noise(host, latents, defaults.TIMESTEP, 0)
    cond = Conditioning(torch.randn(1, 77, 768, generator=g).to(device, dtype), [None])
    one = [[5]]
    eight = [[5 + i] for i in range(8)]  # eight short phrases fit one 77-token context, listed or joined

    def plain():
        forward.eps(host, x, sigma, cond, latents)

    def attention(groups, refine):
        return AttentionDecoder(cond, groups, refine, defaults.REFINE_MODE, defaults.REFINE_STEPS)(host, latents, x, sigma)

    from textmask.methods.refdiff import refer
    from textmask.methods.segments import segment_everything

    image = torch.rand(1, args.size, args.size, 3, generator=g)
    from textmask.postprocess import edge_refined

    images = forward.prepare_images(host, image, args.size, host.geometry.size_multiple)
    region = (0, 0, *images.size)
    rows = {
        "plain": plain,
        "attention": lambda: attention(one, False),
        "attention+refine": lambda: attention(one, True),
        "attention+refine+pamr": lambda: edge_refined(attention(one, True), images.pixels, images.working, images.size,
                                                      region, host.geometry.latent_factor),
        "attention-8-phrases": lambda: attention(eight, False),
        "segments": lambda: segment_everything(host, image),
        "segments-diffseg": lambda: segment_everything(host, image, segmenter="diffseg", pamr=False),
        "refer": lambda: refer(host, image, "the man on the left"),
    }
    # DiffCut's cuts run on the CPU after the forward, and their count depends on the weights: random ones cut nearly
    # every cell apart, trained ones a handful of segments. Timed apart, so a GPU run shows what is the cut's.
    from textmask.methods import segments as segments_module

    real_cut, cut_seconds, cut_segments = segments_module.recursive_ncut, [], []

    def timed_cut(*a, **k):
        t0 = time.perf_counter()
        labels = real_cut(*a, **k)
        cut_seconds.append(time.perf_counter() - t0)
        cut_segments.append(int(labels.max()) + 1)
        return labels

    segments_module.recursive_ncut = timed_cut
    times = {k: [] for k in rows}
    peaks = {k: 0 for k in rows}
    with torch.inference_mode():
        plain()  # warm-up
        for _ in range(args.repeats):
            for name, fn in rows.items():  # interleaved, so drift hits every row alike
                with peak_memory() as mem:
                    t0 = time.perf_counter()
                    fn()
                    if cuda:
                        torch.cuda.synchronize()  # kernels are queued, not done, when fn returns
                    times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], mem.peak)

    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"SD1.5 UNet, random weights, {args.dtype}, {args.size}x{args.size} ({side}x{side} latent), {where}, "
          f"median of {args.repeats}; weights {weight_bytes / 2**30:.2f} GiB")
    print(f"{'row':<22}{'seconds':>9}{'ratio':>8}{'peak +MiB':>11}")  # ratio against one plain forward
    for k in rows:
        print(f"{k:<22}{med[k]:>9.2f}{med[k] / med['plain']:>7.2f}x{peaks[k] / 2**20:>11.0f}")
    extra = max(peaks["attention"], peaks["attention+refine"], peaks["attention-8-phrases"]) - peaks["plain"]
    # refer runs cond and uncond as a batch of two: its activations double by design, so its row shows what
    # it adds beyond those (peak minus twice the plain forward's own peak).
    extra_segments = peaks["segments"] - peaks["plain"]
    extra_refer = peaks["refer"] - 2 * peaks["plain"]
    print()
    print(f"attention: {med['attention'] / med['plain']:.2f}x")
    print(f"attention+refine: {med['attention+refine'] / med['plain']:.2f}x")
    print(f"attention+refine+pamr: {med['attention+refine+pamr'] / med['plain']:.2f}x")
    print(f"8-phrases: {med['attention-8-phrases'] / med['attention']:.2f}x")
    print(f"extra-memory: {100 * max(0, extra) / weight_bytes:.0f}%")
    cut = statistics.median(cut_seconds)
    print(f"segments: {med['segments'] / med['plain']:.2f}x (DiffCut's CPU cuts {cut:.3f} s of it, "
          f"{statistics.median(cut_segments)} segments: {cut / med['plain']:.2f} of a plain forward)")
    print(f"segments-diffseg: {med['segments-diffseg'] / med['plain']:.2f}x")
    print(f"refer: {med['refer'] / med['plain']:.2f}x")
    print(f"segments-extra-memory: {100 * max(0, extra_segments) / weight_bytes:.0f}%")
    print(f"refer-extra-memory: {100 * max(0, extra_refer) / weight_bytes:.0f}%")
    if args.kernels:
        with torch.inference_mode():
            counts = {k: launches(fn, cuda) for k, fn in rows.items()}
        what = "CUDA kernels" if cuda else "computing operators"
        print(f"\n{what} per call, and beyond the plain forward's {counts['plain']}:")
        for k in rows:
            if k != "plain":
                print(f"{k}-kernels: {counts[k]} (+{counts[k] - counts['plain']})")


if __name__ == "__main__":
    main()

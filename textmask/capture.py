"""Read-only capture: forward hooks that recompute head-averaged softmax(QKᵀ) for the layers collectors read,
and keep chosen modules' outputs (all of them, or the last at the coarsest grid).

Fused attention backends (SDPA, xformers, sliced) never materialise the probabilities, so the hooks
record the outputs of each attention module's ``to_q`` and ``to_k`` projections (or of diffusers' fused
``to_qkv`` / ``to_kv``) and recompute the probabilities in fp32, in query chunks, only for the layers
some collector reads, streaming each chunk to them. Hooks read activations only: the model's outputs are
untouched, and every hook is removed when the context exits, also on an exception or an interrupt.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Protocol, Sequence

import torch
from torch import nn

from .errors import CaptureError, TextMaskError

Kind = Literal["self", "cross"]


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module as seen during a forward."""

    name: str  # qualified module name inside the UNet
    kind: Kind
    ordinal: int  # 1-based position among all attention calls along down -> mid -> up
    kind_ordinal: int  # 1-based position among layers of the same kind
    size: tuple[int, int]  # spatial size (h, w) of the queries
    heads: int

    @property
    def tokens(self) -> int:
        return self.size[0] * self.size[1]


# root -> (its children's ids, its attention modules, downsamplers before the first): walking a UNet's ~1 400
# modules per mask would cost as much Python as a GPU forward's launch budget allows the whole capture
# (docs/benchmarks.md).
_FOUND: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list[tuple[str, nn.Module]], int]]" = \
    weakref.WeakKeyDictionary()


def _walk(root: nn.Module) -> tuple[list[tuple[str, nn.Module]], int]:
    """(attention modules, downsamplers registered before the first of them), remembered per root module while its
    top-level children stay the same modules."""
    stamp = tuple(id(m) for m in root.children())
    known = _FOUND.get(root)
    if known is not None and known[0] == stamp:
        return known[1], known[2]
    found, downsamplers = [], 0
    for n, m in root.named_modules():
        # Submodule lookups in _modules: hasattr on every module of a UNet would raise an AttributeError each.
        if "to_q" in m._modules and "to_k" in m._modules and hasattr(m, "heads"):
            found.append((n, m))
        elif not found and "Downsample" in type(m).__name__:  # diffusers' Downsample2D, ldm's and ComfyUI's Downsample
            downsamplers += 1
    if not found and any(hasattr(m, "to_qkv") for m in root.modules()):
        raise CaptureError("this UNet has fused QKV projections; call unfuse_qkv_projections() before masking")
    _FOUND[root] = (stamp, found, downsamplers)
    return found, downsamplers


def find_attention_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules of a UNet: diffusers ``Attention`` and ldm/ComfyUI ``CrossAttention`` alike.

    Remembered per root module; the projections are looked up again at every install, so a LoRA wrapping ``to_q``
    or fused projections are still read.
    """
    return list(_walk(root)[0])


def finest_attention_grid(root: nn.Module, latent_size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) of the finest grid a UNet's attention runs at for latents of ``latent_size``, from its structure alone
    (no forward): the latent halved once per downsampler before the first attention module, as diffusers and ldm
    register a UNet's encoder in the order it runs (SD1 and SD2: the latent's own grid; SDXL: half of it). None for
    a model without attention modules."""
    found, downsamplers = _walk(root)
    if not found:
        return None
    f = 2**downsamplers
    return math.ceil(latent_size[0] / f), math.ceil(latent_size[1] / f)


def find_transformer_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Spatial transformers of a UNet (diffusers ``Transformer2DModel``, ldm/ComfyUI ``SpatialTransformer``)."""
    return [(n, m) for n, m in root.named_modules() if hasattr(m, "transformer_blocks") and hasattr(m, "proj_in")]


def spatial_size(tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """Infer the (h, w) grid of ``tokens`` queries from the latent size, trying each power-of-two stride."""
    h, w = latent_size
    for level in range(8):
        f = 2**level
        hh, ww = math.ceil(h / f), math.ceil(w / f)
        if hh * ww == tokens:
            return hh, ww
        if hh * ww < tokens:
            break
    raise CaptureError(f"cannot map {tokens} attention queries onto latent size {h}x{w}")


def default_chunk_bytes(device: torch.device) -> int:
    """Score-chunk budget: cache-sized on CPU (the work is memory-bound), large on accelerators."""
    # 64 MiB on accelerators: the softmax doubles it, and 256 MiB cost 41% of an fp16 SD1.5 UNet's weight memory.
    return (2 << 20) if device.type == "cpu" else (64 << 20)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, max_chunk_bytes: int | None = None, logits: bool = False,
    per_head: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_row, probs) chunks of head-averaged softmax(q kᵀ · scale) in fp32; probs is [B, rows, keys].

    With ``logits`` the chunks hold the head-averaged scores q kᵀ · scale before the softmax instead; with
    ``per_head`` every head's probabilities, [B, heads, rows, keys].
    """
    b, n, c = q.shape
    m = k.shape[1]
    d = c // heads
    budget = max_chunk_bytes or default_chunk_bytes(q.device)
    # Head-strided views, not copies: matmul reads them as they are, and only a dtype change copies. Every
    # kernel counts: on a GPU a UNet forward is bound by kernel launches, not arithmetic.
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kt = k.float().reshape(b, m, heads, d).permute(0, 2, 3, 1)
    if b > 1:  # (batch, head) fold into one dimension, a view only if contiguous: copy once, not per chunk
        qh, kt = qh.contiguous(), kt.contiguous()
    qh, kt = qh.reshape(b * heads, n, d), kt.reshape(b * heads, d, m)
    unused = qh.new_empty(())  # baddbmm's addend, ignored at beta=0: the scale rides on the product, not a kernel
    rows = max(1, budget // max(1, b * heads * m * 4))
    for i in range(0, n, rows):
        scores = torch.baddbmm(unused, qh[:, i : i + rows], kt, beta=0, alpha=scale).view(b, heads, -1, m)
        out = scores if logits else scores.softmax(dim=-1)
        yield i, out if per_head else out.mean(dim=1)


def attention_scale(module: nn.Module, layer: AttentionLayer, q: torch.Tensor) -> float:
    """The softmax scale of an attention module: its own ``scale`` where it has one, else 1/√(head dim)."""
    return float(getattr(module, "scale", None) or (q.shape[-1] // layer.heads) ** -0.5)


@dataclass(frozen=True)
class Need:
    """What a collector reads: which layer kinds, which values, and which batch rows.

    ``values``: "probs" (head-averaged softmax(QKᵀ)), "head_probs" (every head's, [B, heads, rows, keys]), "logits"
    (the head-averaged scores before the softmax) or "queries" (the layer's projected queries [B, N, C], delivered
    once per call as (layer, 0, q)).
    ``rows``: the batch rows to compute (None: all). ``context_rows`` (cross layers only): a function of the key
    input (the text context) that picks rows, for hosts that batch cond and uncond rows in an order of their own
    (ComfyUI's samplers); an empty selection skips the call.
    """

    kinds: tuple[Kind, ...] = ("cross",)
    values: Literal["probs", "head_probs", "logits", "queries"] = "probs"
    rows: slice | None = None
    context_rows: Callable[[torch.Tensor], torch.Tensor | None] | None = None


def context_matcher(target: torch.Tensor):
    """A ``context_rows`` function: the batch rows whose text context is ``target`` [1, L, D].

    Every cross-attention layer of a forward passes the same context tensor, and a sampler usually passes one
    for all its steps, so the rows are found once per tensor: finding them syncs a GPU (``nonzero``).
    """
    ref = target[0].float()
    last: list = [None, None]  # the context tensor last seen and its rows

    def rows(context: torch.Tensor) -> torch.Tensor:
        if context is last[0]:
            return last[1]
        ctx = context.float()
        n = min(ctx.shape[1], ref.shape[0])
        scale = ref.abs().amax().clamp_min(1e-6)
        diff = (ctx[:, :n] - ref[:n].to(ctx.device)).abs().amax(dim=(1, 2)) / scale
        last[:] = [context, torch.nonzero(diff < 1e-2).flatten()]
        return last[1]

    return rows


class Collector(Protocol):
    """A streaming consumer of captured attention: ``need`` says what it reads, each chunk is passed to it."""

    need: Need

    def __call__(self, layer: AttentionLayer, start: int, values: torch.Tensor) -> None: ...


# The most query tokens a self-attention layer may have for textmask to read it: 128×128 cells (SD at 1024 px, SDXL
# at 2048 px), where a [tokens, tokens] map takes 1 GiB in fp32; twice the side takes 16 times the memory and time.
MAX_SELF_TOKENS = 128 * 128
# Each attention module's (kind, ordinal, kind ordinal), learned from the first forward that hooked all of a model's
# modules, so later captures hook only the kinds their collectors read. Weak keys: a model that goes, goes.
_INVENTORY: "weakref.WeakKeyDictionary[nn.Module, tuple[Kind, int, int]]" = weakref.WeakKeyDictionary()


def check_self_attention_size(size: tuple[int, int]) -> None:
    """Refuse in one line a self-attention grid ``size`` = (h, w) over ``MAX_SELF_TOKENS`` cells, whose map would not
    fit; the forward engine asks before any image is encoded, the capture again at each layer."""
    h, w = size
    if h * w > MAX_SELF_TOKENS:
        raise TextMaskError(f"self-attention over {w}x{h} cells is too large to read (at most {MAX_SELF_TOKENS} "
                            "cells, a 1 GiB map per image); lower the resolution, or mask with method attention and "
                            "refine off, which reads no self-attention")


class Hooks:
    """Forward hooks installed on entry and removed on exit, on an exception or an interrupt; ``install`` adds them."""

    def __init__(self):
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


class AttentionCapture(Hooks):
    """Context manager that feeds the attention of one or more UNet forwards to collectors.

    Each collector's ``need`` says which layers and values it reads; a layer nobody reads costs only its
    inventory entry. Collectors that need the same values of the same rows share one computation.

    >>> maps = CrossAttentionMaps(token_groups)
    >>> with AttentionCapture(find_attention_modules(unet), (64, 64), [maps]):
    ...     unet(x, t, context)
    """

    def __init__(self, attention_modules: Sequence[tuple[str, nn.Module]], latent_size: tuple[int, int],
                 collectors: Iterable[Collector] = (), *, max_chunk_bytes: int | None = None):
        if not attention_modules:
            raise CaptureError("no attention modules found in this model")
        super().__init__()
        self._modules = list(attention_modules)
        self._collectors = list(collectors)
        self.latent_size = tuple(latent_size)
        self._max_chunk_bytes = max_chunk_bytes
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._selective = False  # hooks only on the kinds read, from the learned inventory
        self._plans: dict[Kind, list] = {}  # kind -> its readers, grouped by need (``_plan``)
        self.layers: list[AttentionLayer] = []  # inventory, in execution order of the first forward
        self._by_name: dict[str, AttentionLayer] = {}

    def install(self) -> None:
        read = {kind for c in self._collectors for kind in c.need.kinds}
        known = [_INVENTORY.get(module) for _, module in self._modules]
        self._selective = all(k is not None for k in known)
        for (name, module), seen in zip(self._modules, known):
            if self._selective and seen[0] not in read:
                continue  # a layer nobody reads gets no hook (its kind is known from an earlier forward)
            self._handles.append(module.to_q.register_forward_hook(self._on_q(name)))
            self._handles.append(module.to_k.register_forward_hook(self._on_k(name, module)))
            # diffusers' fuse_qkv_projections(): self-attention then calls to_qkv, cross-attention to_q and to_kv.
            # The separate projections stay, so both paths are hooked and whichever runs is read.
            if isinstance(module._modules.get("to_qkv"), nn.Module):
                self._handles.append(module.to_qkv.register_forward_hook(self._on_qkv(name, module)))
            if isinstance(module._modules.get("to_kv"), nn.Module):
                self._handles.append(module.to_kv.register_forward_hook(self._on_k(name, module, parts=2)))

    def remove(self) -> None:
        super().remove()
        self._pending.clear()
        if not self._selective and len(self.layers) == len(self._modules):  # a whole forward was seen: learn it
            modules = dict(self._modules)
            for layer in self.layers:
                _INVENTORY[modules[layer.name]] = (layer.kind, layer.ordinal, layer.kind_ordinal)

    def layer(self, name: str) -> AttentionLayer:
        return self._by_name[name]

    def _on_q(self, name: str):
        def hook(_mod, args, out):
            self._pending[name] = (args[0], out)

        return hook

    def _on_k(self, name: str, module: nn.Module, parts: int = 1):
        def hook(_mod, args, k):
            pending = self._pending.pop(name, None)
            if pending is None:
                return
            q_in, q = pending
            if parts > 1:  # a fused K/V projection: K is its first part
                k = k[..., : k.shape[-1] // parts]
            self._on_qk(name, module, q_in, q, args[0], k)

        return hook

    def _on_qkv(self, name: str, module: nn.Module):
        def hook(_mod, args, qkv):
            third = qkv.shape[-1] // 3
            self._on_qk(name, module, args[0], qkv[..., :third], args[0], qkv[..., third : 2 * third])

        return hook

    def _plan(self, kind: Kind) -> list[tuple[str, slice | None, Callable | None, list[Collector]]]:
        """The readers of ``kind``'s layers, grouped by what they need: (values, rows, context_rows, collectors).
        Made once per capture: collectors and their needs do not change between layers."""
        plan = self._plans.get(kind)
        if plan is None:
            groups: dict[tuple, tuple[str, slice | None, Callable | None, list[Collector]]] = {}
            for c in self._collectors:
                need = c.need
                if kind not in need.kinds:
                    continue
                pick = need.context_rows if kind == "cross" else None
                rows = need.rows
                key = (need.values, None if rows is None else (rows.start, rows.stop, rows.step), id(pick))
                groups.setdefault(key, (need.values, rows, pick, []))[3].append(c)
            plan = self._plans[kind] = list(groups.values())
        return plan

    def _on_qk(self, name: str, module: nn.Module, q_in, q: torch.Tensor, k_in, k: torch.Tensor) -> None:
        """One attention call's queries and keys (and the inputs they were projected from)."""
        if q.dim() != 3 or k.dim() != 3:
            return  # not the (batch, tokens, channels) layout of a spatial transformer
        layer = self._register(name, module, kind="self" if k_in is q_in else "cross", tokens=q.shape[1])
        plan = self._plan(layer.kind)
        if not plan:
            return
        if layer.kind == "self":
            check_self_attention_size(layer.size)
        q, k = q.detach(), k.detach()
        picked_for: dict[int, torch.Tensor | None] = {}  # context_rows function -> its rows for this call
        for values, rows, pick, members in plan:
            qs, ks = q, k
            if pick is not None:
                if id(pick) not in picked_for:
                    picked_for[id(pick)] = pick(k_in)
                picked = picked_for[id(pick)]
                if picked is not None:
                    if picked.numel() == 0:
                        continue
                    qs, ks = q.index_select(0, picked.to(q.device)), k.index_select(0, picked.to(k.device))
            if rows is not None:
                qs, ks = qs[rows], ks[rows]
            if values == "queries":
                for c in members:
                    c(layer, 0, qs)
                continue
            chunks = attention_probs(qs, ks, layer.heads, attention_scale(module, layer, q), self._max_chunk_bytes,
                                     values == "logits", values == "head_probs")
            for start, chunk in chunks:
                for c in members:
                    c(layer, start, chunk)

    def _register(self, name: str, module: nn.Module, kind: Kind, tokens: int) -> AttentionLayer:
        layer = self._by_name.get(name)
        if layer is None:
            known = _INVENTORY.get(module) if self._selective else None
            ordinal, kind_ordinal = known[1:] if known is not None else (
                len(self.layers) + 1, sum(1 for l in self.layers if l.kind == kind) + 1)
            layer = AttentionLayer(
                name=name,
                kind=kind,
                ordinal=ordinal,
                kind_ordinal=kind_ordinal,
                size=spatial_size(tokens, self.latent_size),
                heads=int(module.heads),
            )
            self.layers.append(layer)
            self._by_name[name] = layer
        return layer


class ProbsStore:
    """A collector that keeps whole head-averaged probabilities [B, N, keys] per layer (tests, small models)."""

    def __init__(self, kinds: tuple[Kind, ...] = ("cross",), values: Literal["probs", "logits"] = "probs"):
        self.need = Need(kinds=kinds, values=values)
        self.probs: dict[str, torch.Tensor] = {}
        self.layers: dict[str, AttentionLayer] = {}

    def __call__(self, layer: AttentionLayer, start: int, chunk: torch.Tensor) -> None:
        self.layers[layer.name] = layer
        store = self.probs.get(layer.name)
        if store is None or start == 0:
            store = self.probs[layer.name] = torch.empty(chunk.shape[0], layer.tokens, chunk.shape[2],
                                                         dtype=torch.float32, device=chunk.device)
        store[:, start : start + chunk.shape[1]] = chunk


class QueryStore:
    """A collector that keeps each layer's projected queries [B, N, C] (OVDiff's features)."""

    def __init__(self, kinds: tuple[Kind, ...] = ("cross",)):
        self.need = Need(kinds=kinds, values="queries")
        self.queries: dict[str, torch.Tensor] = {}
        self.layers: dict[str, AttentionLayer] = {}

    def __call__(self, layer: AttentionLayer, start: int, q: torch.Tensor) -> None:
        self.queries[layer.name] = q
        self.layers[layer.name] = layer


class OutputCapture(Hooks):
    """Context manager that keeps the outputs of chosen modules (LD-ZNet reads the spatial transformers').

    Hooks read activations only and come off on exit. ``outputs`` holds each module's last output, keyed by name
    in first-call order.
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]]):
        super().__init__()
        self._modules = list(modules)
        self.outputs: dict[str, torch.Tensor] = {}

    def install(self) -> None:
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_mod, _args, out):
            self.outputs[name] = (out[0] if isinstance(out, tuple) else out).detach()

        return hook


class CoarsestOutput(Hooks):
    """Context manager that keeps the output [B, N, C] of the module that runs last at the coarsest token grid,
    among ``modules``, in one forward (DiffCut's features: ``methods.diffcut.encoder_features``).

    Hooks read activations only and come off on exit. ``output`` is None until a module ran.
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]], latent_size: tuple[int, int]):
        super().__init__()
        self._modules = list(modules)
        self.latent_size = latent_size
        self.output: torch.Tensor | None = None
        self.name: str | None = None

    def install(self) -> None:
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_mod, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            # Later modules at the same or a coarser grid replace earlier ones: the last at the coarsest grid stays.
            if self.output is None or out.shape[1] <= self.output.shape[1]:
                self.output, self.name = out.detach(), name

        return hook

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the kept output's tokens; refuses in one line if no module ran (a compiled model)."""
        if self.output is None:
            raise CaptureError("the model ran but no hooked module was seen: it is compiled (torch.compile) or "
                               "replayed as a CUDA graph, which hooks cannot read; run it uncompiled")
        return spatial_size(self.output.shape[1], self.latent_size)

"""Attention capture: forward hooks that recompute head-averaged softmax(QKᵀ) for chosen layers.

Fused attention backends (SDPA, xformers, sliced) never materialise the probabilities, so the hooks
record the outputs of each attention module's ``to_q`` and ``to_k`` projections (or of diffusers' fused
``to_qkv`` / ``to_kv``) and recompute the probabilities in fp32, in query chunks, only for the layers
asked for. Hooks read activations only: the model's outputs are untouched, and every hook is removed
when the context exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from .errors import CaptureError

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


LayerFilter = Callable[[AttentionLayer], bool]
# A sink receives query-row chunks of head-averaged probabilities: (layer, first_row, probs[B, rows, keys]).
ProbsSink = Callable[[AttentionLayer, int, torch.Tensor], None]


def find_attention_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules of a UNet: diffusers ``Attention`` and ldm/ComfyUI ``CrossAttention`` alike."""
    # Submodule lookups in _modules: hasattr on every module of a UNet costs a raised AttributeError each (~1 ms).
    found = [(n, m) for n, m in root.named_modules() if "to_q" in m._modules and "to_k" in m._modules and hasattr(m, "heads")]
    if not found and any(hasattr(m, "to_qkv") for m in root.modules()):
        raise CaptureError("this UNet has fused QKV projections; call unfuse_qkv_projections() before masking")
    return found


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
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, max_chunk_bytes: int | None = None, logits: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_row, probs) chunks of head-averaged softmax(q kᵀ · scale) in fp32; probs is [B, rows, keys].

    With ``logits`` the chunks hold the head-averaged scores q kᵀ · scale before the softmax instead.
    """
    b, n, c = q.shape
    m = k.shape[1]
    d = c // heads
    budget = max_chunk_bytes or default_chunk_bytes(q.device)
    # Head-strided views, not copies: matmul reads them as they are, and only a dtype change copies. Every
    # kernel counts: on a GPU a UNet forward is bound by kernel launches, not arithmetic.
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kt = (k.float() * scale).reshape(b, m, heads, d).permute(0, 2, 3, 1)
    if b > 1:  # matmul folds (batch, head) into one dimension, a view only if contiguous: copy once, not per chunk
        qh, kt = qh.contiguous(), kt.contiguous()
    rows = max(1, budget // max(1, b * heads * m * 4))
    for i in range(0, n, rows):
        scores = torch.matmul(qh[:, :, i : i + rows], kt)
        yield i, (scores if logits else scores.softmax(dim=-1)).mean(dim=1)


class AttentionCapture:
    """Context manager that captures attention from one or more UNet forwards.

    >>> with AttentionCapture(find_attention_modules(unet), latent_size=(64, 64), probs=lambda l: l.kind == "cross") as cap:
    ...     unet(x, t, context)
    >>> cap.probs["down_blocks.0.attentions.0.transformer_blocks.0.attn2"].shape  # [B, 4096, 77]
    """

    def __init__(
        self,
        attention_modules: Sequence[tuple[str, nn.Module]],
        latent_size: tuple[int, int],
        *,
        probs: LayerFilter | None = None,
        sink: ProbsSink | None = None,
        queries: LayerFilter | None = None,
        outputs: Iterable[tuple[str, nn.Module]] = (),
        max_chunk_bytes: int | None = None,
        logits: LayerFilter | None = None,
        rows: Callable[[AttentionLayer], slice | None] | None = None,
        context_rows: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ):
        if not attention_modules:
            raise CaptureError("no attention modules found in this model")
        self._modules = list(attention_modules)
        self._output_modules = list(outputs)
        self.latent_size = tuple(latent_size)
        self._want_probs = probs or (lambda layer: False)
        self._sink = sink
        self._want_queries = queries or (lambda layer: False)
        self._want_logits = logits or (lambda layer: False)  # these layers yield pre-softmax scores
        self._rows = rows or (lambda layer: None)  # batch rows to compute, per layer (None: all)
        # Cross layers only: rows chosen from the key input (the text context), for hosts that batch cond and
        # uncond rows in an order of their own (ComfyUI's samplers). An empty selection skips the call.
        self._context_rows = context_rows
        self._max_chunk_bytes = max_chunk_bytes
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: list[AttentionLayer] = []  # inventory, in execution order of the first forward
        self._by_name: dict[str, AttentionLayer] = {}
        self.probs: dict[str, torch.Tensor] = {}  # filled only when no sink is given
        self.queries: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "AttentionCapture":
        try:
            for name, module in self._modules:
                self._handles.append(module.to_q.register_forward_hook(self._on_q(name)))
                self._handles.append(module.to_k.register_forward_hook(self._on_k(name, module)))
                # diffusers' fuse_qkv_projections(): self-attention then calls to_qkv, cross-attention to_q and to_kv.
                # The separate projections stay, so both paths are hooked and whichever runs is read.
                if isinstance(module._modules.get("to_qkv"), nn.Module):
                    self._handles.append(module.to_qkv.register_forward_hook(self._on_qkv(name, module)))
                if isinstance(module._modules.get("to_kv"), nn.Module):
                    self._handles.append(module.to_kv.register_forward_hook(self._on_k(name, module, parts=2)))
            for name, module in self._output_modules:
                self._handles.append(module.register_forward_hook(self._on_output(name)))
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
        self._pending.clear()

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

    def _on_qk(self, name: str, module: nn.Module, q_in, q: torch.Tensor, k_in, k: torch.Tensor) -> None:
        """One attention call's queries and keys (and the inputs they were projected from)."""
        if q.dim() != 3 or k.dim() != 3:
            return  # not the (batch, tokens, channels) layout of a spatial transformer
        layer = self._register(name, module, kind="self" if k_in is q_in else "cross", tokens=q.shape[1])
        if self._want_queries(layer):
            self.queries[name] = q.detach()
        if self._want_probs(layer):
            if self._context_rows is not None and layer.kind == "cross":
                picked = self._context_rows(k_in)
                if picked is not None:
                    if picked.numel() == 0:
                        return
                    q, k = q.index_select(0, picked.to(q.device)), k.index_select(0, picked.to(k.device))
            self._compute(layer, module, q.detach(), k.detach())

    def _on_output(self, name: str):
        def hook(_mod, _args, out):
            self.outputs[name] = (out[0] if isinstance(out, tuple) else out).detach()

        return hook

    def _register(self, name: str, module: nn.Module, kind: Kind, tokens: int) -> AttentionLayer:
        layer = self._by_name.get(name)
        if layer is None:
            same_kind = sum(1 for l in self.layers if l.kind == kind)
            layer = AttentionLayer(
                name=name,
                kind=kind,
                ordinal=len(self.layers) + 1,
                kind_ordinal=same_kind + 1,
                size=spatial_size(tokens, self.latent_size),
                heads=int(module.heads),
            )
            self.layers.append(layer)
            self._by_name[name] = layer
        return layer

    def _compute(self, layer: AttentionLayer, module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
        scale = getattr(module, "scale", None) or (q.shape[-1] // layer.heads) ** -0.5
        rows = self._rows(layer)
        if rows is not None:
            q, k = q[rows], k[rows]
        store = None
        if self._sink is None:
            store = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
            self.probs[layer.name] = store
        chunks = attention_probs(q, k, layer.heads, float(scale), self._max_chunk_bytes, self._want_logits(layer))
        for start, chunk in chunks:
            if store is not None:
                store[:, start : start + chunk.shape[1]] = chunk
            else:
                self._sink(layer, start, chunk)

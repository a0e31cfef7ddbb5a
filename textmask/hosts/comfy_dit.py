"""Read-only joint attention capture for ComfyUI's own MM-DiT blocks: Flux (``comfy.ldm.flux``) and SD3/SD3.5
(``comfy.ldm.modules.diffusionmodules.mmdit``), and for Forge's Flux (``backend.nn.flux``), which has ComfyUI's
block layout: ``BlockLineage`` names the classes and the ``apply_rope`` of the copy in use.

ComfyUI computes q and k inside block forwards (no projection module per stream), so the hooks sit on the last
modules the queries and keys pass through before the attention call:

- Flux ``DoubleStreamBlock``: the ``QKNorm`` of ``img_attn`` and ``txt_attn`` return normalised (q, k)
  [B, H, S, D]; a pre-hook keeps the block's ``pe`` (rotary embedding over the attention's own sequence: text
  first unless ``flipped_img_txt``), applied with ComfyUI's ``apply_rope`` as ``flux.math.attention`` does;
- Flux ``SingleStreamBlock``: its ``QKNorm`` returns (q, k) of one text-then-image sequence; the text length is the
  ``txt`` the double blocks were called with (``txt_in``'s output where there are none);
- SD3 ``JointBlock``: ``attn.ln_q``/``attn.ln_k`` (an ``nn.Identity`` without qk-norm) return q, k [B, S, H, D]
  of each stream in ``pre_attention``; ``block_mixing`` concatenates context first, then x.

The probabilities come from ``capture_mmdit.joint_probs`` with ``JointAttentionCapture``'s delivery, so layer names
(the block's name, + ".self") and the collectors' protocol are the diffusers capture's. Weights are never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
from torch import nn

from ..capture import Collector
from ..capture_mmdit import JointAttentionCapture
from ..errors import CaptureError
from .common import comfy_module


@dataclass(frozen=True)
class BlockLineage:
    """One copy of the Flux/SD3 reference blocks: its block classes by the capture kind that reads them, and the
    ``apply_rope(q, k, pe)`` its attention applies."""

    kinds: dict
    apply_rope: Callable | None


def comfy_lineage() -> BlockLineage:
    """ComfyUI's blocks, those this ComfyUI ships."""
    try:
        rope = comfy_module("ldm.flux.math").apply_rope
    except (ImportError, AttributeError):
        rope = None
    return BlockLineage(_block_kinds(), rope)


def _block_kinds() -> dict[type, str]:
    """ComfyUI's joint block classes that this ComfyUI ships, by the capture kind that reads them."""
    kinds: dict[type, str] = {}
    try:
        flux = comfy_module("ldm.flux.layers")
        kinds[flux.DoubleStreamBlock] = "double"
        kinds[flux.SingleStreamBlock] = "single"
    except (ImportError, AttributeError):
        pass
    try:
        kinds[comfy_module("ldm.modules.diffusionmodules.mmdit").JointBlock] = "joint"
    except (ImportError, AttributeError):
        pass
    return kinds


def find_comfy_joint_blocks(root: nn.Module, kinds: dict[type, str] | None = None) -> list[tuple[str, nn.Module, str]]:
    """(name, block, kind) of every Flux double/single block and SD3 joint block under ``root``, in execution order
    (ComfyUI and Forge run ``double_blocks`` before ``single_blocks`` and register them in that order)."""
    kinds = _block_kinds() if kinds is None else kinds
    return [(name, m, kinds[type(m)]) for name, m in root.named_modules() if type(m) in kinds]


def _heads(block: nn.Module) -> int:
    """Attention heads of a Flux block (``num_heads``) or an SD3 joint block (its x stream's ``attn``)."""
    x_block = getattr(block, "x_block", None)
    return int(x_block.attn.num_heads if x_block is not None else block.num_heads)


def _arg(args: tuple, kwargs: dict, index: int, key: str):
    """A block forward's argument, passed by keyword (ComfyUI's models) or by position (block patches)."""
    if key in kwargs:
        return kwargs[key]
    return args[index] if len(args) > index else None


class ComfyJointCapture(JointAttentionCapture):
    """Context manager that feeds the joint attention of ComfyUI Flux/SD3 forwards to collectors (read-only).

    ``diffusion_model``: ``model.model.diffusion_model``; ``latent_size``: (h, w) of the latents the forward runs on;
    ``lineage``: whose block classes to read (ComfyUI's by default, or Forge's).

    >>> with ComfyJointCapture(base.diffusion_model, (64, 64), [maps]):
    ...     base.apply_model(x, s, **conds)
    """

    def __init__(self, diffusion_model: nn.Module, latent_size: tuple[int, int], collectors: Iterable[Collector] = (),
                 *, max_chunk_bytes: int | None = None, lineage: BlockLineage | None = None):
        lineage = lineage or comfy_lineage()
        blocks = find_comfy_joint_blocks(diffusion_model, lineage.kinds)
        if not blocks:
            raise CaptureError("no Flux or SD3 joint attention blocks found in this model")
        super().__init__(diffusion_model, latent_size, collectors, modules=[(n, m) for n, m, _ in blocks],
                         max_chunk_bytes=max_chunk_bytes)
        self._blocks = blocks
        self._apply_rope = lineage.apply_rope

    def install(self) -> None:
        # The forward's text context (``context=``), for collectors that pick rows by it.
        self._handles.append(self.transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True))
        if not {kind for c in self._collectors for kind in c.need.kinds}:
            return
        txt_in = getattr(self.transformer, "txt_in", None)
        if isinstance(txt_in, nn.Module):  # Flux's text length where it has no double blocks
            self._handles.append(txt_in.register_forward_hook(self._on_text))
        for name, block, kind in self._blocks:
            self._handles.append(block.register_forward_pre_hook(self._on_block(name, kind), with_kwargs=True))
            if kind == "double":
                self._handles.append(block.img_attn.norm.register_forward_hook(self._keep_pair(name, "img")))
                self._handles.append(block.txt_attn.norm.register_forward_hook(self._keep_pair(name, "txt")))
            elif kind == "single":
                self._handles.append(block.norm.register_forward_hook(self._keep_pair(name, "all")))
            else:
                attn = block.x_block.attn
                self._handles.append(attn.ln_q.register_forward_hook(self._keep(name, "q")))
                self._handles.append(attn.ln_k.register_forward_hook(self._keep(name, "k")))
                self._handles.append(block.context_block.attn.ln_k.register_forward_hook(self._keep(name, "text_k")))
            self._handles.append(block.register_forward_hook(self._on_done(name, block)))

    def _on_text(self, _mod, _args, out):
        self._text_length = int(out.shape[1])

    def _on_block(self, name: str, kind: str):
        def hook(_mod, args, kwargs):
            pending = {"kind": kind}
            if kind == "double":
                txt = _arg(args, kwargs, 1, "txt")
                self._text_length = int(txt.shape[1])  # what the single blocks that follow concatenate first
                pending["pe"] = _arg(args, kwargs, 3, "pe")
            elif kind == "single":
                pending["pe"] = _arg(args, kwargs, 2, "pe")
            self._pending[name] = pending

        return hook

    def _keep_pair(self, name: str, key: str):
        def hook(_mod, _args, out):
            pending = self._pending.get(name)
            if pending is not None:
                pending[key] = (out[0].detach(), out[1].detach())

        return hook

    def _on_done(self, name: str, module: nn.Module):
        def hook(_mod, _args, _out):
            pending = self._pending.pop(name, None)
            if pending is not None and any(k in pending for k in ("img", "all", "q")):
                self._deliver(name, module, pending)

        return hook

    def _register(self, name: str, kind: str, tokens: int, module: nn.Module):
        # the shared registration reads ``module.heads``, which ComfyUI's blocks call ``num_heads``
        return super()._register(name, kind, tokens, SimpleNamespace(heads=_heads(module)))

    # -----------------------------------------------------------------------------------------------------------
    def _streams(self, name: str, module: nn.Module, pending: dict):
        """(image queries, image keys, text keys) [B, S, H, D] as the block's attention reads them."""
        kind = pending["kind"]
        if kind == "joint":  # SD3: q, k already [B, S, H, D], normalised; no rotary embedding
            missing = {"q", "k", "text_k"} - set(pending)
            if missing:
                raise CaptureError(f"SD3 block {name} ran without its {', '.join(sorted(missing))} projection")
            return pending["q"], pending["k"], pending["text_k"]
        if kind == "double":
            if "txt" not in pending:
                raise CaptureError(f"Flux block {name} ran without its text stream")
            (img_q, img_k), (txt_q, txt_k) = pending["img"], pending["txt"]
            length, flipped = txt_q.shape[2], bool(getattr(module, "flipped_img_txt", False))
            q_all = torch.cat((img_q, txt_q) if flipped else (txt_q, img_q), dim=2)
            k_all = torch.cat((img_k, txt_k) if flipped else (txt_k, img_k), dim=2)
        else:
            length, flipped = self._text_length, False
            if length is None:
                raise CaptureError(f"Flux block {name} ran before any text stream; cannot split its tokens")
            q_all, k_all = pending["all"]
        pe = pending.get("pe")
        if pe is not None:  # the rotary embedding over the attention's own order, as flux.math.attention applies it
            q_all, k_all = self._apply_rope(q_all.float(), k_all.float(), pe)
        n = q_all.shape[2] - length
        if flipped:
            q, image_k, text_k = q_all[:, :, :n], k_all[:, :, :n], k_all[:, :, n:]
        else:
            q, image_k, text_k = q_all[:, :, length:], k_all[:, :, length:], k_all[:, :, :length]
        return q.transpose(1, 2), image_k.transpose(1, 2), text_k.transpose(1, 2)  # [B, H, S, D] -> [B, S, H, D]


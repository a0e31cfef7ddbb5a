"""Read-only capture for MM-DiT joint attention: SD3's ``JointTransformerBlock`` and Flux's double- and
single-stream blocks (diffusers), where image and text tokens attend over one concatenated sequence.

Hooks keep the outputs of each joint attention module's ``to_q``/``to_k`` (the image stream; in Flux's single
blocks the whole text-then-image sequence) and ``add_k_proj`` (the text stream), and a pre-hook keeps the rotary
embedding the module is called with. When the module returns, its image queries' probabilities are recomputed in
fp32, in query chunks, as the model computes them: the module's own ``norm_q``/``norm_k``/``norm_added_k`` are
called (never their weights read), Flux's rotary embedding is applied with diffusers' ``apply_rotary_emb``, and each
image query's softmax runs over all keys, text and image. Collectors (``capture.Need``) read the result per kind:

- ``cross``: [B, rows, L] the text keys' share of each image query's row (joint normaliser: a row sums to the mass
  the query puts on text, not to 1); layer name = the module's name;
- ``self``: [B, rows, N] the image keys' share, renormalised to sum 1 per row (what refinement and DiffSeg read);
  layer name = the module's name + ``.self``.

``logits`` give the head-averaged scores before the softmax, ``head_probs`` every head's probabilities, ``queries``
the image queries [B, N, C] after normalisation and rotary embedding. Hooks come off on exit, on an exception or an
interrupt; the model's output is untouched.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .capture import AttentionLayer, Collector, Hooks, spatial_size, default_chunk_bytes
from .errors import CaptureError


def find_joint_attention_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Joint attention modules of an MM-DiT: SD3's and Flux's double-stream attention (``add_k_proj``: a text
    stream of its own) and Flux's single-stream attention (one sequence, text first), in execution order."""
    found = []
    for name, m in root.named_modules():
        sub = m._modules
        if getattr(m, "fused_projections", False) or "to_qkv" in sub and "to_q" not in sub:
            raise CaptureError("this transformer has fused QKV projections; call unfuse_qkv_projections() before masking")
        if "to_q" in sub and "to_k" in sub and hasattr(m, "heads"):
            # Flux's single-stream blocks sit in ``single_transformer_blocks``: one sequence, text and image at once.
            if "add_k_proj" in sub or name.startswith("single_transformer_blocks."):
                found.append((name, m))
    return found


class JointAttentionCapture(Hooks):
    """Context manager that feeds the joint attention of one or more MM-DiT forwards to collectors.

    ``transformer``: the MM-DiT (its forward's ``encoder_hidden_states`` gives the text length, which Flux's single
    blocks need); ``latent_size``: (h, w) of the latents, for the image tokens' grid.

    >>> maps = CrossAttentionMaps(token_groups)
    >>> with JointAttentionCapture(transformer, (64, 64), [maps]):
    ...     transformer(x, encoder_hidden_states=context, ...)
    """

    def __init__(self, transformer: nn.Module, latent_size: tuple[int, int], collectors: Iterable[Collector] = (),
                 *, modules: Sequence[tuple[str, nn.Module]] | None = None, max_chunk_bytes: int | None = None):
        super().__init__()
        self.transformer = transformer
        self._modules = list(modules) if modules is not None else find_joint_attention_modules(transformer)
        if not self._modules:
            raise CaptureError("no joint attention modules found in this transformer (is it SD3 or Flux?)")
        self._collectors = list(collectors)
        self.latent_size = tuple(latent_size)
        self._max_chunk_bytes = max_chunk_bytes
        self._text_length: int | None = None
        # The text context the transformer was called with: the text stream changes from block to block, so a
        # collector's ``context_rows`` picks rows by this, once per forward.
        self._context: torch.Tensor | None = None
        self._pending: dict[str, dict] = {}
        self.layers: list[AttentionLayer] = []
        self._by_name: dict[str, AttentionLayer] = {}

    def install(self) -> None:
        self._handles.append(self.transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True))
        read = {kind for c in self._collectors for kind in c.need.kinds}
        if not read:
            return
        for name, module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._on_call(name), with_kwargs=True))
            self._handles.append(module.to_q.register_forward_hook(self._keep(name, "q")))
            self._handles.append(module.to_k.register_forward_hook(self._keep(name, "k")))
            if "add_k_proj" in module._modules:
                self._handles.append(module.add_k_proj.register_forward_hook(self._keep(name, "text_k")))
            self._handles.append(module.register_forward_hook(self._on_done(name, module)))

    def remove(self) -> None:
        super().remove()
        self._pending.clear()

    def _on_transformer(self, _mod, args, kwargs):
        context = kwargs.get("encoder_hidden_states", kwargs.get("context"))  # diffusers' name, ComfyUI's
        if context is None and len(args) > 1 and torch.is_tensor(args[1]):
            context = args[1]
        self._context = context
        self._text_length = None if context is None else int(context.shape[1])

    def _on_call(self, name: str):
        def hook(_mod, _args, kwargs):
            self._pending[name] = {"rope": kwargs.get("image_rotary_emb")}

        return hook

    def _keep(self, name: str, key: str):
        def hook(_mod, _args, out):
            pending = self._pending.get(name)
            if pending is not None:
                pending[key] = out.detach()

        return hook

    def _on_done(self, name: str, module: nn.Module):
        def hook(_mod, _args, _out):
            pending = self._pending.pop(name, None)
            if pending is not None and "q" in pending and "k" in pending:
                self._deliver(name, module, pending)

        return hook

    # -----------------------------------------------------------------------------------------------------------
    def _streams(self, name: str, module: nn.Module, pending: dict):
        """(image queries, image keys, text keys) [B, S, H, D] as the attention reads them, and the text-first flag."""
        heads = int(module.heads)
        q, k = pending["q"], pending["k"]
        d = q.shape[-1] // heads
        q, k = q.unflatten(-1, (heads, d)), k.unflatten(-1, (heads, d))
        if getattr(module, "norm_q", None) is not None:
            q = module.norm_q(q)
        if getattr(module, "norm_k", None) is not None:
            k = module.norm_k(k)
        rope = pending.get("rope")
        if "text_k" in pending:  # a double-stream block: a text stream of its own
            text_k = pending["text_k"].unflatten(-1, (heads, d))
            if getattr(module, "norm_added_k", None) is not None:
                text_k = module.norm_added_k(text_k)
            # Flux (it passes a rotary embedding) puts text first; SD3 puts the image first.
            text_first = rope is not None
            k_all = torch.cat([text_k, k], 1) if text_first else torch.cat([k, text_k], 1)
            length = text_k.shape[1]
        else:  # Flux's single stream: one sequence, text first
            length = self._text_length
            if length is None:
                raise CaptureError("the transformer was called without encoder_hidden_states; cannot split its tokens")
            text_first, k_all = True, k
            q = q[:, length:]
        if rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = rope
            k_all = apply_rotary_emb(k_all, (cos, sin), sequence_dim=1)
            q = apply_rotary_emb(q, (cos[length:], sin[length:]), sequence_dim=1)
        if text_first:
            text_k, image_k = k_all[:, :length], k_all[:, length:]
        else:
            image_k, text_k = k_all[:, : k_all.shape[1] - length], k_all[:, k_all.shape[1] - length :]
        return q, image_k, text_k

    def _deliver(self, name: str, module: nn.Module, pending: dict) -> None:
        q, image_k, text_k = self._streams(name, module, pending)
        cross = self._register(name, "cross", q.shape[1], module)
        selfl = self._register(name + ".self", "self", q.shape[1], module)
        readers = [(c, layer) for c in self._collectors for layer in (cross, selfl) if layer.kind in c.need.kinds]
        if not readers:
            return
        b, n, heads, d = q.shape
        scale = float(getattr(module, "scale", None) or d**-0.5)
        groups: dict[tuple, list[tuple[Collector, AttentionLayer]]] = {}
        picked_for: dict[int, torch.Tensor] = {}  # context_rows function -> its rows for this forward
        for c, layer in readers:
            need = c.need
            picked = None
            if need.context_rows is not None:
                if self._context is None:
                    raise CaptureError("the transformer was called without a text context to pick rows by")
                if id(need.context_rows) not in picked_for:
                    picked_for[id(need.context_rows)] = need.context_rows(self._context)
                picked = picked_for[id(need.context_rows)]
                if picked.numel() == 0:
                    continue
            rows = need.rows
            key = (need.values, None if rows is None else (rows.start, rows.stop, rows.step),
                   None if picked is None else id(picked))
            groups.setdefault(key, []).append((c, layer))
        for (values, _, picked_id), members in groups.items():
            need = members[0][0].need
            qs, ik, tk = q, image_k, text_k
            if picked_id is not None:
                idx = picked_for[id(need.context_rows)].to(q.device)
                qs, ik, tk = qs.index_select(0, idx), ik.index_select(0, idx), tk.index_select(0, idx)
            if need.rows is not None:
                qs, ik, tk = qs[need.rows], ik[need.rows], tk[need.rows]
            if values == "queries":
                flat = qs.flatten(2)
                for c, layer in members:
                    if layer.kind == "cross":
                        c(layer, 0, flat)
                continue
            for start, text_part, image_part in joint_probs(qs, ik, tk, scale, values, self._max_chunk_bytes):
                for c, layer in members:
                    c(layer, start, text_part if layer.kind == "cross" else image_part)

    def _register(self, name: str, kind: str, tokens: int, module: nn.Module) -> AttentionLayer:
        layer = self._by_name.get(name)
        if layer is None:
            layer = AttentionLayer(name=name, kind=kind, ordinal=len(self.layers) + 1,
                                   kind_ordinal=sum(1 for l in self.layers if l.kind == kind) + 1,
                                   size=spatial_size(tokens, self.latent_size), heads=int(module.heads))
            self.layers.append(layer)
            self._by_name[name] = layer
        return layer


def joint_probs(q: torch.Tensor, image_k: torch.Tensor, text_k: torch.Tensor, scale: float, values: str = "probs",
                max_chunk_bytes: int | None = None):
    """Yield (first_row, text part, image part) chunks of each image query's softmax over text and image keys.

    ``q`` [B, N, H, D] image queries, ``image_k`` [B, N', H, D], ``text_k`` [B, L, H, D]. ``values``: "probs"
    (head-averaged; the image part renormalised to sum 1 per row), "head_probs" (per head, [B, H, rows, keys],
    renormalised likewise) or "logits" (head-averaged scores before the softmax). fp32 throughout.
    """
    b, n, heads, d = q.shape
    keys = image_k.shape[1] + text_k.shape[1]
    qh = q.float().transpose(1, 2)  # [B, H, N, D]
    ikt = (image_k.float() * scale).permute(0, 2, 3, 1)  # [B, H, D, N']
    tkt = (text_k.float() * scale).permute(0, 2, 3, 1)  # [B, H, D, L]
    budget = max_chunk_bytes or default_chunk_bytes(q.device)
    rows = max(1, budget // max(1, b * heads * keys * 4))
    for i in range(0, n, rows):
        qi = qh[:, :, i : i + rows]
        s_img, s_txt = qi @ ikt, qi @ tkt
        if values == "logits":
            yield i, s_txt.mean(1), s_img.mean(1)
            continue
        top = torch.maximum(s_img.amax(-1, keepdim=True), s_txt.amax(-1, keepdim=True))
        e_img, e_txt = (s_img - top).exp(), (s_txt - top).exp()
        total = e_img.sum(-1, keepdim=True) + e_txt.sum(-1, keepdim=True)
        p_txt, p_img = e_txt / total, e_img / total
        if values == "head_probs":
            yield i, p_txt, p_img / p_img.sum(-1, keepdim=True)
            continue
        image_mean = p_img.mean(1)
        yield i, p_txt.mean(1), image_mean / image_mean.sum(-1, keepdim=True)

"""SD3/SD3.5 and Flux.1 single-file checkpoints for the diffusers adapter, offline.

A single file holds the transformer in its original layout (``model.diffusion_model.`` or bare keys, as Stability,
Black Forest Labs and ComfyUI save them), and may hold the VAE (``first_stage_model.``) and the text encoders
(``text_encoders.clip_l|clip_g|t5xxl.transformer.``, in transformers' own key names). Every component's config is
read from its weights' shapes, as ComfyUI detects models, so no hub config is needed. What the file lacks comes
from ``components``: a diffusers folder of the same family (the base model a finetune was made from).

Shapes cannot say four things, which are the families' constants: SD3 heads are 64 wide (the q/k norm's width
where it has one), CLIP heads are 64 wide, CLIP-L uses quick-GELU and CLIP-G GELU, and Flux's rotary axes are
(16, 56, 56) of its 128-wide heads. The VAEs' latent scale and shift are the families' published ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from ..errors import CheckpointError, first_line

TRANSFORMER = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "text_encoders."
VAE_LATENT = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}  # (scaling, shift): the families' VAEs
FLOW_SCHEDULER = {  # each family's pipeline scheduler (SD3's shift 3; Flux's image-size shift)
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0},
    "flux": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}


def dit_family(state: Mapping[str, torch.Tensor]) -> str | None:
    """"sd3" or "flux" for a file holding an SD3 or Flux transformer, else None."""
    for key in state:
        bare = key[len(TRANSFORMER):] if key.startswith(TRANSFORMER) else key
        if bare.startswith("joint_blocks."):
            return "sd3"
        if bare.startswith("double_blocks."):
            return "flux"
    return None


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def transformer_config(family: str, sd: Mapping[str, torch.Tensor]) -> dict:
    """The diffusers transformer config of an original-layout state dict (prefix removed)."""
    if family == "sd3":
        hidden = int(sd["x_embedder.proj.weight"].shape[0])
        ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
        head = int(ln_q.shape[0]) if ln_q is not None else 64
        return dict(sample_size=128, patch_size=int(sd["x_embedder.proj.weight"].shape[-1]),
                    in_channels=int(sd["x_embedder.proj.weight"].shape[1]),
                    num_layers=_count(sd, r"joint_blocks\.(\d+)\."), attention_head_dim=head,
                    num_attention_heads=hidden // head, joint_attention_dim=int(sd["context_embedder.weight"].shape[1]),
                    caption_projection_dim=int(sd["context_embedder.weight"].shape[0]),
                    pooled_projection_dim=int(sd["y_embedder.mlp.0.weight"].shape[1]),
                    out_channels=int(sd["final_layer.linear.weight"].shape[0]) // int(sd["x_embedder.proj.weight"].shape[-1]) ** 2,
                    pos_embed_max_size=round(sd["pos_embed"].shape[1] ** 0.5),
                    dual_attention_layers=tuple(i for i in range(_count(sd, r"joint_blocks\.(\d+)\."))
                                                if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd),
                    qk_norm="rms_norm" if ln_q is not None else None)
    hidden = int(sd["img_in.weight"].shape[0])
    head = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    mlp = int(sd["single_blocks.0.linear2.weight"].shape[1]) - hidden
    if (hidden, head, mlp) != (3072, 128, 4 * 3072):  # diffusers' converter is written for Flux.1's dimensions
        raise CheckpointError(f"this Flux transformer is {hidden} wide with {head}-wide heads; diffusers' Flux "
                              "converter reads Flux.1's (3072, 128-wide heads)")
    return dict(patch_size=1, in_channels=int(sd["img_in.weight"].shape[1]),
                out_channels=int(sd["final_layer.linear.weight"].shape[0]),
                num_layers=_count(sd, r"double_blocks\.(\d+)\."), num_single_layers=_count(sd, r"single_blocks\.(\d+)\."),
                attention_head_dim=head, num_attention_heads=hidden // head,
                joint_attention_dim=int(sd["txt_in.weight"].shape[1]),
                pooled_projection_dim=int(sd["vector_in.in_layer.weight"].shape[1]),
                guidance_embeds="guidance_in.in_layer.weight" in sd, axes_dims_rope=(16, 56, 56))


def vae_config(family: str, sd: Mapping[str, torch.Tensor]) -> dict:
    """The diffusers AutoencoderKL config of an LDM-layout VAE state dict (prefix removed)."""
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    channels = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    scaling, shift = VAE_LATENT[family]
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=channels,
                layers_per_block=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
                latent_channels=int(sd["encoder.conv_out.weight"].shape[0]) // 2,
                norm_num_groups=32, sample_size=1024, scaling_factor=scaling, shift_factor=shift,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


def clip_config(sd: Mapping[str, torch.Tensor], act: str):
    from transformers import CLIPTextConfig

    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    projection = sd.get("text_projection.weight")
    return CLIPTextConfig(vocab_size=int(vocab), hidden_size=int(hidden), num_attention_heads=max(1, int(hidden) // 64),
                          intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                          num_hidden_layers=_count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
                          max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
                          projection_dim=int(projection.shape[0]) if projection is not None else int(hidden),
                          hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def t5_config(sd: Mapping[str, torch.Tensor]):
    from transformers import T5Config

    vocab, width = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ff = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    return T5Config(vocab_size=int(vocab), d_model=int(width), d_ff=int(ff), d_kv=int(inner) // int(heads),
                    num_heads=int(heads), num_layers=_count(sd, r"encoder\.block\.(\d+)\."),
                    relative_attention_num_buckets=int(buckets),
                    feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False)


def _check(what: str, missing, unexpected) -> None:
    missing = [k for k in missing if not k.endswith(("position_ids", "encoder.embed_tokens.weight"))]  # derived
    if missing or unexpected:
        kind, first = ("missing", missing[0]) if missing else ("unexpected", unexpected[0])
        raise CheckpointError(f"the file's {what} does not match its detected layout ({kind} weight {first})")


def _diffusers_model(cls, config: dict, sd: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype):
    """``cls(**config)`` holding ``sd``: built on the meta device and given the file's tensors (random init of a
    12B transformer would take minutes and twice the memory)."""
    with torch.device("meta"):
        model = cls(**config)
    missing, unexpected = model.load_state_dict(dict(sd), strict=False, assign=True)
    _check(what, missing, unexpected)
    return model.to(dtype).eval()


def _transformers_model(cls, config, sd: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype):
    """A transformers model holding ``sd`` (transformers builds it empty and ties T5's embeddings)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=dict(sd), torch_dtype=dtype,
                                          output_loading_info=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _check(what, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]))
    return model.eval()


def _built(what: str, build):
    """``build()``: a part of the file that does not fit its layout is refused in one line naming the part."""
    try:
        return build()
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"this file's {what} lacks weight {e}: is the file complete?") from None
    except (ValueError, RuntimeError, TypeError, IndexError) as e:
        raise CheckpointError(f"this file's {what} does not match its layout ({first_line(e)})") from None


def from_state_dict(state: Mapping[str, torch.Tensor], *, components: str | Path | None = None,
                    dtype: torch.dtype = torch.float32):
    """A diffusers SD3 or Flux pipeline from one file's state dict, the rest from ``components`` (a folder)."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from ..tokenizer import t5_tokenizer
    from .diffusers_dit import clip_pipeline_tokenizer

    family = dit_family(state)
    prefixed = any(k.startswith(TRANSFORMER) for k in state)
    sd = _part(state, TRANSFORMER) if prefixed else {k: v for k, v in state.items()
                                                    if not k.startswith((VAE, TEXT, "vae.", "cond_stage_model."))}
    what = f"{family.upper()} transformer"
    config = _built(what, lambda: transformer_config(family, sd))
    convert = convert_sd3_transformer_checkpoint_to_diffusers if family == "sd3" else \
        convert_flux_transformer_checkpoint_to_diffusers
    converted = _built(what, lambda: convert(dict(sd)))
    cls = diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel
    if family == "flux" and config["in_channels"] != 64:
        raise CheckpointError(f"this Flux transformer takes {config['in_channels']} input channels (Flux Fill or "
                              "another image-conditioned Flux); textmask reads Flux models of 64")
    transformer = _built(what, lambda: _diffusers_model(cls, config, converted, "transformer", dtype))

    parts: dict = {"transformer": transformer,
                   "scheduler": FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER[family])}
    vae_sd = _part(state, VAE) or _part(state, "vae.")
    if vae_sd:
        vconfig = _built("VAE", lambda: vae_config(family, vae_sd))
        parts["vae"] = _built("VAE", lambda: _diffusers_model(AutoencoderKL, vconfig,
                                                              convert_ldm_vae_checkpoint(vae_sd, vconfig), "VAE", dtype))
    encoders = {"clip_l": ("text_encoder", CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel,
                           "quick_gelu"),
                "clip_g": ("text_encoder_2", CLIPTextModelWithProjection, "gelu"),
                "t5xxl": ("text_encoder_3" if family == "sd3" else "text_encoder_2", T5EncoderModel, None)}
    for key, (slot, model_cls, act) in encoders.items():
        part = _part(state, f"{TEXT}{key}.transformer.")
        if not part or (family == "flux" and key == "clip_g"):
            continue
        unused = ("logit_scale",) + (("text_projection.weight",) if model_cls is CLIPTextModel else ())
        part = {k: v for k, v in part.items() if k not in unused}  # saved with the encoder, never read by the pipeline
        config_ = _built(key, lambda: t5_config(part) if key == "t5xxl" else clip_config(part, act))
        parts[slot] = _built(key, lambda: _transformers_model(model_cls, config_, part, key, dtype))
    slots = ["vae", "text_encoder", "text_encoder_2"]  # and SD3's optional T5, text_encoder_3
    missing = [s for s in slots if s not in parts]
    if components is not None:
        if missing:
            parts.update(_from_folder_components(components, family, missing, dtype))
        if family == "sd3" and "text_encoder_3" not in parts:
            parts.update(_from_folder_components(components, family, ["text_encoder_3"], dtype, optional=True))
    missing = [s for s in slots if s not in parts]
    if missing:
        raise CheckpointError(f"this {family.upper()} file has no {', '.join(missing)}; give the model's diffusers folder "
                              "for them (--components DIR, or components=)")
    parts.update(tokenizer=clip_pipeline_tokenizer())
    if family == "sd3":
        parts.update(tokenizer_2=clip_pipeline_tokenizer(), text_encoder_3=parts.get("text_encoder_3"),
                     tokenizer_3=t5_tokenizer() if "text_encoder_3" in parts else None)
    else:
        parts.update(tokenizer_2=t5_tokenizer())
    name = "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"
    return getattr(diffusers, name)(**parts)


def _from_folder_components(folder: str | Path, family: str, slots: list[str], dtype: torch.dtype,
                            optional: bool = False) -> dict:
    """The given component slots from a diffusers folder of the same family, offline."""
    import json

    import diffusers
    import transformers

    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{folder} is not a diffusers model folder (no readable model_index.json)") from None
    from .diffusers_dit import PIPELINES

    name = index.get("_class_name") if isinstance(index, dict) else None
    if PIPELINES.get(name) != family:
        raise CheckpointError(f"{folder} holds a {name or 'model of no named pipeline'}, not the components of this "
                              f"{family.upper()} file's model; give that model's diffusers folder")
    found = {}
    for slot in slots:
        library, cls_name = (index.get(slot) or [None, None])[:2]
        if cls_name is None or not (folder / slot).is_dir():
            if optional:
                continue
            raise CheckpointError(f"{folder} has no {slot}/ for this {family.upper()} file")
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        try:
            found[slot] = cls.from_pretrained(folder / slot, torch_dtype=dtype, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load {folder / slot}: {str(e).splitlines()[0]}") from None
    return found

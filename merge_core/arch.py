"""Architecture detection from key names and shapes (no tensor data read).

Works on full checkpoints (LDM/SGM layout, or as ComfyUI saves SD3/Flux), on
bare UNet/DiT state dicts (`diffusion_model.` prefix, as a ComfyUI MODEL holds
them, or no prefix), on text-encoder-only dicts, and on language models by key layout (lm.py).
"""
from __future__ import annotations

from typing import Mapping

from .lm import FAMILIES as LM_FAMILIES
from .lm import detect_layout as _detect_lm_layout

ARCHITECTURES = ("sd1", "sd2", "sdxl", "sd3", "flux") + tuple(LM_FAMILIES) + ("unknown",)
DISPLAY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux",
                 **{name: display for name, (display, _) in LM_FAMILIES.items()},
                 "lora": "LoRA (not a checkpoint)", "unknown": "unknown architecture"}

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def _shape(spec) -> tuple[int, ...]:
    return tuple(spec.shape) if hasattr(spec, "shape") else tuple(spec)


def _find(specs: Mapping, suffix: str):
    for prefix in UNET_PREFIXES:
        if prefix + suffix in specs:
            return _shape(specs[prefix + suffix])
    return None


def _has_prefix(specs: Mapping, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in specs)


def detect_architecture(specs: Mapping) -> str:
    """Return one of ARCHITECTURES. `specs` maps key -> TensorSpec or shape tuple."""
    if _find(specs, "double_blocks.0.img_attn.qkv.weight") is not None or _find(specs, "img_in.weight") is not None:
        return "flux"
    if _find(specs, "joint_blocks.0.context_block.attn.qkv.weight") is not None:
        return "sd3"
    if _find(specs, "label_emb.0.0.weight") is not None or _has_prefix(specs, "conditioner.embedders."):
        return "sdxl"
    to_k = _find(specs, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and len(to_k) == 2:
        return {768: "sd1", 1024: "sd2"}.get(to_k[1], "unknown")
    # Text-encoder-only or UNet-less dicts: tell SD1 (CLIP-L) from SD2 (OpenCLIP-H) by their prefixes.
    if _has_prefix(specs, "cond_stage_model.transformer."):
        return "sd1"
    if _has_prefix(specs, "cond_stage_model.model."):
        return "sd2"
    if any(".text_model.encoder.layers." in k or k.startswith("text_model.encoder.layers.") for k in specs):
        return "unknown"  # a CLIP text encoder on its own (a host's CLIP state dict): not a language model
    # Language models by key layout (Llama and Mistral share one: config.json tells them apart, lm.py).
    return _detect_lm_layout(specs) or "unknown"


def display_name(arch: str) -> str:
    return DISPLAY_NAMES.get(arch, arch)

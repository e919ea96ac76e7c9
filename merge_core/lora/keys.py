"""Which checkpoint weights a LoRA covers, and their kohya module names.

Checkpoints are in the LDM/SGM layout (`model.diffusion_model.input_blocks...`);
LoRA files use kohya's names, which follow the diffusers module paths
(`lora_unet_down_blocks_0_attentions_0_...`, `lora_te_text_model_encoder_...`).
A1111's built-in Lora, Forge, ComfyUI's LoraLoader and diffusers all read these.

Covered (the layers those loaders map): in the UNet every attention projection
(q, k, v, out), feed-forward, proj_in/out, resnet conv1/conv2, skip connection
and time-embedding projection, and the down/upsampler convs; in the text
encoder(s) q/k/v/out and the two MLP layers. OpenCLIP text encoders (SD2,
SDXL's second) store q/k/v fused in one `in_proj_weight`: each third is its
own LoRA module. Everything else (norms, biases, embeddings, conv_in/out,
time_embed, the VAE) is not covered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..arch import detect_architecture, display_name
from ..errors import MergeError

UNET = "model.diffusion_model."
SUPPORTED = ("sd1", "sd2", "sdxl")

_RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                 "skip_connection": "conv_shortcut"}
_ATTENTION_PART = re.compile(r"^(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
                             r"|ff\.net\.0\.proj|ff\.net\.2))$")
_HF_CLIP_PART = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_OPENCLIP_PART = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_OPENCLIP_NAMES = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA target: rows [row_start, row_stop) of checkpoint tensor `key` (all rows if None)."""
    name: str                      # kohya module name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    key: str                       # checkpoint key holding the weight
    shape: tuple[int, ...]         # shape of this module's weight (after the row slice)
    row_start: int | None = None
    row_stop: int | None = None
    block: str = ""                # input / middle / output / text_encoder(_1/_2), for reports

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:  # flattened: in_channels * kh * kw
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4


def res_blocks_per_level(keys) -> int:
    """Res blocks per UNet level (2 in SD1/SD2/SDXL), read off the first downsampler's position."""
    ops = [int(m[1]) for k in keys if (m := re.match(r"^model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.", k))]
    if ops:
        return min(ops) - 1
    blocks = [int(m[1]) for k in keys if (m := re.match(r"^model\.diffusion_model\.input_blocks\.(\d+)\.", k))]
    return max(blocks) if blocks else 2


def _unet_diffusers_path(path: str, per_level: int = 2) -> str | None:
    """LDM UNet module path (without prefix) -> diffusers path, for the covered modules.

    Each down level is `per_level` res blocks then a downsampler; each up level `per_level + 1`
    res blocks, the last one followed by the upsampler."""
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None  # conv_in: not covered
        level, pos = (n - 1) // (per_level + 1), (n - 1) % (per_level + 1)
        if pos == per_level:
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        return _inner(f"down_blocks.{level}", sub, pos, rest)
    m = re.match(r"^middle_block\.(\d)\.(.+)$", path)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return _inner("mid_block", 1, 0, rest)
        return _inner("mid_block", 0, sub // 2, rest)
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        level, pos = n // (per_level + 1), n % (per_level + 1)
        if rest == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv"
        return _inner(f"up_blocks.{level}", sub, pos, rest)
    return None


def _inner(prefix: str, sub: int, pos: int, rest: str) -> str | None:
    if sub == 0:
        part = _RESNET_PARTS.get(rest)
        return f"{prefix}.resnets.{pos}.{part}" if part else None
    if sub == 1 and _ATTENTION_PART.match(rest):
        return f"{prefix}.attentions.{pos}.{rest}"
    return None


def _block_of(path: str) -> str:
    return "input" if path.startswith("input_blocks") else "middle" if path.startswith("middle") else "output"


def lora_modules(specs: Mapping, arch: str | None = None) -> list[LoraModule]:
    """Every covered module of a checkpoint (specs: key -> TensorSpec or shape), in key order."""
    arch = arch or detect_architecture(specs)
    if arch not in SUPPORTED:
        raise MergeError(f"LoRA decomposition supports SD1.x, SD2.x and SDXL checkpoints, not "
                         f"{display_name(arch)}")
    te_prefixes = {
        "sd1": [("cond_stage_model.transformer.", "lora_te", "text_encoder")],
        "sd2": [("cond_stage_model.model.", "lora_te", "text_encoder")],
        "sdxl": [("conditioner.embedders.0.transformer.", "lora_te1", "text_encoder_1"),
                 ("conditioner.embedders.1.model.", "lora_te2", "text_encoder_2")],
    }[arch]
    modules: list[LoraModule] = []
    per_level = res_blocks_per_level(specs)
    for key, spec in specs.items():
        shape = tuple(spec.shape) if hasattr(spec, "shape") else tuple(spec)
        if key.startswith(UNET) and key.endswith(".weight") and len(shape) in (2, 4):
            path = key[len(UNET):-len(".weight")]
            diffusers = _unet_diffusers_path(path, per_level)
            if diffusers:
                modules.append(LoraModule("lora_unet_" + diffusers.replace(".", "_"), key, shape,
                                          block=_block_of(path)))
            continue
        for prefix, lora_prefix, block in te_prefixes:
            if not key.startswith(prefix) or len(shape) != 2:
                continue
            rest = key[len(prefix):]
            if rest.endswith(".weight"):
                m = _HF_CLIP_PART.match(rest[:-len(".weight")])
                if m:
                    name = f"{lora_prefix}_text_model_encoder_layers_{m[1]}_{m[2].replace('.', '_')}"
                    modules.append(LoraModule(name, key, shape, block=block))
                    continue
            m = _OPENCLIP_PART.match(rest[:-len(".weight")] if rest.endswith(".weight") else rest)
            if m:
                layer, part = m[1], m[2]
                base = f"{lora_prefix}_text_model_encoder_layers_{layer}_"
                if part == "attn.in_proj_weight":
                    d = shape[0] // 3
                    for i, qkv in enumerate("qkv"):
                        modules.append(LoraModule(base + f"self_attn_{qkv}_proj", key, (d, shape[1]),
                                                  i * d, (i + 1) * d, block))
                else:
                    modules.append(LoraModule(base + _OPENCLIP_NAMES[part], key, shape, block=block))
    return modules


def layer_deltas(sources, reference, module: LoraModule, device) -> list[torch.Tensor]:
    """W - reference for one module of every source, flattened to [out, in_flat], float32 on `device`.

    The float32 copies are ours, so the files' mapped pages are released right away."""
    def rows(src) -> torch.Tensor:
        tensor = src.load(module.key)
        if module.row_start is not None:
            tensor = tensor[module.row_start:module.row_stop]
        return tensor.to(device=device, dtype=torch.float32).reshape(module.out_features, -1)

    ref = rows(reference)
    deltas = [rows(src) - ref for src in sources]
    for src in list(sources) + [reference]:
        src.release(module.key)
    return deltas

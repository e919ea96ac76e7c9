"""Which checkpoint weights a LoRA covers, and their kohya module names.

SD1/SD2/SDXL checkpoints are in the LDM/SGM layout (`model.diffusion_model.input_blocks...`); their
LoRA files use kohya's names, which follow the diffusers module paths
(`lora_unet_down_blocks_0_attentions_0_...`, `lora_te_text_model_encoder_...`).
A1111's built-in Lora, Forge, ComfyUI's LoraLoader and diffusers all read these.

SD3 and Flux checkpoints hold their DiT under `model.diffusion_model.` (or `diffusion_model.`, or no
prefix in a transformer-only file) and the text encoders under `text_encoders.clip_l.` /
`text_encoders.clip_g.` / `text_encoders.t5xxl.`; their LoRA files use sd-scripts' names, which
ComfyUI and Forge map: `lora_unet_<DiT path with . -> _>` (`lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_joint_blocks_0_x_block_attn_qkv`), `lora_te1_`/`lora_te2_` + the CLIP path,
`lora_te3_encoder_block_N_layer_0_SelfAttention_q` for the T5.

Covered (the layers those loaders map):
- SD UNet: every attention projection (q, k, v, out), feed-forward, proj_in/out, resnet conv1/conv2,
  skip connection and time-embedding projection, and the down/upsampler convs;
- SD3/Flux DiT: every 2-D `.weight` (the linear layers): attention qkv (fused, one module, as ComfyUI
  maps it) and proj, the MLPs, the single blocks' linear1/linear2, the modulation (adaLN) linears, the
  embedders' linears and the final layer's; not the 4-D patchify conv (SD3's x_embedder.proj),
  pos_embed, norms, biases;
- CLIP text encoders: q/k/v/out and the two MLP layers. OpenCLIP text encoders (SD2, SDXL's second)
  store q/k/v fused in one `in_proj_weight`: each third is its own LoRA module;
- T5 (SD3, Flux): SelfAttention q/k/v/o and DenseReluDense wi_0/wi_1/wo (wi in ungated T5s).
Everything else (norms, biases, embeddings, conv_in/out, time_embed, the VAE) is not covered.
The text encoders' checkpoint prefixes and LoRA prefixes come from the architecture data
(`merge_core/data/architectures/<arch>.json`, each component's checkpoint_prefix and lora_prefix).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..arch import UNET_PREFIXES, detect_architecture, display_name
from ..blocks import architecture
from ..errors import MergeError

UNET = "model.diffusion_model."
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux")
DIT = ("sd3", "flux")

_RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                 "skip_connection": "conv_shortcut"}
_ATTENTION_PART = re.compile(r"^(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
                             r"|ff\.net\.0\.proj|ff\.net\.2))$")
# text encoders, after the component's checkpoint prefix: HF CLIP, OpenCLIP (SD2, SDXL's second), HF T5
_HF_CLIP_PART = re.compile(r"^transformer\.text_model\.encoder\.layers\.(\d+)\."
                           r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_OPENCLIP_PART = re.compile(r"^model\.transformer\.resblocks\.(\d+)\."
                            r"(attn\.in_proj_weight|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_T5_PART = re.compile(r"^transformer\.encoder\.block\.(\d+)\.layer\.(0\.SelfAttention\.[qkvo]"
                      r"|1\.DenseReluDense\.(?:wi_0|wi_1|wi|wo))$")
_OPENCLIP_NAMES = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA target: rows [row_start, row_stop) of checkpoint tensor `key` (all rows if None)."""
    name: str                      # kohya module name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    key: str                       # checkpoint key holding the weight
    shape: tuple[int, ...]         # shape of this module's weight (after the row slice)
    row_start: int | None = None
    row_stop: int | None = None
    block: str = ""                # SD: input / middle / output; DiT: its block (IN, D00, J05, OUT...); text
    #                                encoders: the component (text_encoder, text_encoder_1/_2, t5); for reports

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


def text_encoder_prefixes(arch: str) -> list[tuple[str, str, str]]:
    """(checkpoint prefix, kohya prefix without its "_", block label) per text encoder, from the data."""
    return [(spec["checkpoint_prefix"], spec["lora_prefix"].rstrip("_"), component)
            for component, spec in architecture(arch).components.items() if spec.get("lora_prefix")]


def dit_prefix(keys) -> str:
    """Where an SD3/Flux checkpoint keeps its DiT: model.diffusion_model. (checkpoints), diffusion_model.
    (a ComfyUI MODEL) or nothing (a transformer-only file such as BFL's flux1-dev)."""
    keys = list(keys)
    for prefix in UNET_PREFIXES[:-1]:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def lora_modules(specs: Mapping, arch: str | None = None) -> list[LoraModule]:
    """Every covered module of a checkpoint (specs: key -> TensorSpec or shape), in key order."""
    arch = arch or detect_architecture(specs)
    if arch not in SUPPORTED:
        raise MergeError(f"LoRA decomposition supports SD1.x, SD2.x, SDXL, SD3 and Flux checkpoints, not "
                         f"{display_name(arch)}")
    te_prefixes = text_encoder_prefixes(arch)
    modules: list[LoraModule] = []
    dit = arch in DIT
    if dit:
        unet, blocks = dit_prefix(specs), architecture(arch)
    else:
        unet, per_level = UNET, res_blocks_per_level(specs)
    for key, spec in specs.items():
        shape = tuple(spec.shape) if hasattr(spec, "shape") else tuple(spec)
        te = next((entry for entry in te_prefixes if key.startswith(entry[0])), None)
        if te is None:
            if not key.startswith(unet) or not key.endswith(".weight"):
                continue
            path = key[len(unet):-len(".weight")]
            if dit:  # every linear of the DiT, named by its path (what ComfyUI's key map builds)
                if len(shape) == 2:
                    modules.append(LoraModule("lora_unet_" + path.replace(".", "_"), key, shape,
                                              block=blocks.block(key)))
            elif len(shape) in (2, 4):
                diffusers = _unet_diffusers_path(path, per_level)
                if diffusers:
                    modules.append(LoraModule("lora_unet_" + diffusers.replace(".", "_"), key, shape,
                                              block=_block_of(path)))
            continue
        prefix, lora_prefix, block = te
        if len(shape) != 2:
            continue
        rest = key[len(prefix):]
        if rest.endswith(".weight"):
            m = _HF_CLIP_PART.match(rest[:-len(".weight")])
            if m:
                name = f"{lora_prefix}_text_model_encoder_layers_{m[1]}_{m[2].replace('.', '_')}"
                modules.append(LoraModule(name, key, shape, block=block))
                continue
            m = _T5_PART.match(rest[:-len(".weight")])
            if m:
                name = f"{lora_prefix}_encoder_block_{m[1]}_layer_{m[2].replace('.', '_')}"
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

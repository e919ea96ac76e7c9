"""kohya-format LoRA files: write, read, and apply (delta = up @ down * alpha / rank * strength)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import torch

from ..io.safetensors_file import save_safetensors
from ..io.sources import open_model
from .keys import LoraModule


def factors_to_lora_tensors(module: LoraModule, up: torch.Tensor, down: torch.Tensor,
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """up [out, r] @ down [r, in_flat] -> kohya tensors for `module` (alpha = rank: scale 1).

    The singular values are split evenly (up*sqrt(s), sqrt(s)*down by the caller's choice of
    factors), so neither factor over- or underflows in fp16. 3x3 convs become LoCon:
    down [r, in, kh, kw], up [out, r, 1, 1].
    """
    rank = up.shape[1]
    if module.is_conv:
        out_ch, in_ch, kh, kw = module.shape
        down_t = down.reshape(rank, in_ch, kh, kw)
        up_t = up.reshape(out_ch, rank, 1, 1)
    else:
        down_t, up_t = down, up
    return {f"{module.name}.lora_down.weight": down_t.to(dtype).contiguous(),
            f"{module.name}.lora_up.weight": up_t.to(dtype).contiguous(),
            f"{module.name}.alpha": torch.tensor(float(rank), dtype=dtype)}


def balanced_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From D = u @ v.T (v with orthonormal columns) to (up, down) with equal column/row norms."""
    scale = torch.linalg.vector_norm(u, dim=0).clamp_min(1e-30).sqrt()
    return u / scale, (v * scale).T


def save_lora(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
              overwrite: bool = False) -> Path:
    return save_safetensors(path, tensors, metadata, overwrite=overwrite)


def base_model_metadata(arch: str) -> dict[str, str]:
    """The kohya metadata that names the model a LoRA is for, from the architecture data
    (`ss_base_model_version`: sd_v1, sd_v2, sdxl_base_v1-0, sd3, flux1)."""
    from ..blocks import architecture   # lazily: the block maps are only needed when writing
    versions = architecture(arch).ss_base_model_version
    return {"ss_base_model_version": versions[0]} if versions else {}


def lora_module_names(src) -> list[str]:
    """The kohya module names of an open LoRA file (a ModelSource), sorted."""
    return sorted(k[:-len(".lora_down.weight")] for k in src.keys() if k.endswith(".lora_down.weight"))


def lora_factors(src, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module of an open LoRA file: (up [out, r] fp32, down [r, in_flat] fp32, scale alpha/rank)."""
    down = src.load(f"{name}.lora_down.weight").float()
    up = src.load(f"{name}.lora_up.weight").float()
    rank = down.shape[0]
    alpha = float(src.load(f"{name}.alpha")) if f"{name}.alpha" in src else float(rank)
    for key in (f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"):
        if key in src:
            src.release(key)
    return up.reshape(up.shape[0], rank), down.reshape(rank, -1), alpha / rank


def read_lora(path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, str]]:
    """{module name: (up [out, r] fp32, down [r, in_flat] fp32, scale alpha/rank)}, metadata."""
    with open_model(path) as src:
        modules = {name: lora_factors(src, name) for name in lora_module_names(src)}
        return modules, dict(src.metadata)


def lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float, strength: float = 1.0) -> torch.Tensor:
    """kohya's formula: up @ down * (alpha / rank) * strength (flattened [out, in_flat])."""
    return (up @ down) * (scale * strength)


def lora_file_bytes(ranks_by_module: Mapping[LoraModule, int], bytes_per_value: int = 2) -> int:
    return sum((m.out_features + m.in_features) * r * bytes_per_value for m, r in ranks_by_module.items())


def strength_tag(name: str, strength: float) -> str:
    value = 0.0 if math.isclose(strength, 0.0, abs_tol=5e-5) else strength
    return f"<lora:{name}:{value:.4f}>"


_LORA_PARTS = re.compile(r"\.(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|hada_w1_a|lokr_w1|dora_scale)"
                         r"(\.weight)?$")


def describe_lora(specs: Mapping) -> dict | None:
    """What a LoRA file is, from its keys and shapes alone (None for anything else): kind (LoRA / LoCon /
    LoHa / LoKr), module count, ranks, the model part it targets."""
    downs = {k: v for k, v in specs.items() if _LORA_PARTS.search(k)}
    if not downs or len(downs) < len(specs) // 3:
        return None
    kind = "LoRA"
    if any("hada_" in k for k in downs):
        kind = "LoHa"
    elif any("lokr_" in k for k in downs):
        kind = "LoKr"
    elif any(k.endswith((".lora_down.weight", ".lora_A.weight")) and len(getattr(v, "shape", v)) == 4
             and tuple(getattr(v, "shape", v))[2:] != (1, 1) for k, v in downs.items()):
        kind = "LoCon"
    ranks = sorted({int(getattr(v, "shape", v)[0]) for k, v in downs.items()
                    if k.endswith((".lora_down.weight", ".lora_A.weight"))})
    modules = {_LORA_PARTS.split(k)[0] for k in downs}
    targets = sorted({"UNet" if m.startswith(("lora_unet", "unet", "diffusion_model", "transformer")) else
                      "text encoder" if m.startswith(("lora_te", "text_encoder")) else "other" for m in modules})
    return {"kind": kind, "modules": len(modules), "ranks": ranks, "targets": targets}

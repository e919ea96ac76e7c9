"""Small SD-layout checkpoints for the demo, tests and examples.

Every key of a real SD1.5 / SDXL checkpoint (from data/layouts/*.json), with
every width divided by 32 (kernel sizes and the 4 latent channels kept), so a
model is a few MB. The cross-attention context width is kept as it is, which
is what architecture detection reads (768 = SD1.x, 2048 = SDXL). Models are a
shared random "base" plus a per-model perturbation, like fine-tunes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .io.safetensors_file import save_safetensors

LAYOUT_DIR = Path(__file__).parent / "data" / "layouts"


def load_layout(name: str) -> list[dict]:
    return json.loads((LAYOUT_DIR / f"{name}.json").read_text())["tensors"]


SHRINK = 32
KEEP_WIDTH = ("attn2.to_k.weight", "attn2.to_v.weight", "label_emb.0.0.weight")


def tiny_shape(key: str, shape: list[int]) -> tuple[int, ...]:
    """Divide every width by SHRINK; keep small dims (kernels, latent channels) and context widths."""
    dims = [d if d < 64 else max(2, d // SHRINK) for d in shape]
    if key.endswith(KEEP_WIDTH) and len(shape) == 2:
        dims[1] = shape[1]
    return tuple(dims)


def tiny_base(arch: str = "sd15", seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {t["key"]: torch.randn(tiny_shape(t["key"], t["shape"]), generator=gen) * 0.05
            for t in load_layout(arch)}


def small_sd15_state_dicts(n_models: int = 3, spread: float = 0.05, seed: int = 0,
                           dtype: torch.dtype = torch.float16, arch: str = "sd15") -> list[dict[str, torch.Tensor]]:
    base = tiny_base(arch, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    models = []
    for _ in range(n_models):
        sd = {k: (v + spread * torch.randn(v.shape, generator=gen) * v.std().clamp_min(1e-3)).to(dtype)
              for k, v in base.items()}
        # A non-float buffer, as real SD1 checkpoints have: must be copied, never averaged.
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
        models.append(sd)
    return models


def write_demo_models(folder, n_models: int = 3, **kw) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sd in enumerate(small_sd15_state_dicts(n_models, **kw)):
        path = folder / f"demo_model_{i + 1}.safetensors"
        if not path.exists():
            save_safetensors(path, sd, {"demo": "manifold-merge"})
        paths.append(path)
    return paths

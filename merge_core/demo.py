"""Small SD1.5-layout checkpoints for the demo, tests and examples.

Real SD1.5 key names and shapes (from data/layouts/sd15.json), keeping only
tensors up to `max_numel` elements so a model is a few MB; the UNet's
cross-attention keys are kept so architecture detection sees SD1.x. Models are
a shared random "base" plus a per-model perturbation, like fine-tunes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .io.safetensors_file import save_safetensors

LAYOUT_DIR = Path(__file__).parent / "data" / "layouts"


def load_layout(name: str) -> list[dict]:
    return json.loads((LAYOUT_DIR / f"{name}.json").read_text())["tensors"]


def small_sd15_state_dicts(n_models: int = 3, max_numel: int = 300_000, spread: float = 0.05, seed: int = 0,
                           dtype: torch.dtype = torch.float16) -> list[dict[str, torch.Tensor]]:
    layout = [t for t in load_layout("sd15") if t["shape"] and
              (torch.Size(t["shape"]).numel() <= max_numel or "attn2.to_k" in t["key"])][:200]
    gen = torch.Generator().manual_seed(seed)
    base = {t["key"]: torch.randn(t["shape"], generator=gen) * 0.05 for t in layout}
    models = []
    for m in range(n_models):
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

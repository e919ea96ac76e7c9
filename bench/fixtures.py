"""Full-size benchmark checkpoints with the real SD1.5 / SDXL key layout (fp16).

Content: a shared random "base" plus a small per-model perturbation (like
fine-tunes of one model), drawn from one seeded random pool with per-tensor
offsets so that writing 3 x 2 GB takes seconds, not minutes of RNG time.
Files are cached in _bench_data/ and rebuilt only if missing or the wrong size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge_core.io import SafetensorsWriter, TensorSpec  # noqa: E402

DATA = ROOT / "_bench_data"
LAYOUTS = ROOT / "merge_core" / "data" / "layouts"
POOL_SIZE = 1 << 24
INT_KEYS = {"sd15": {"cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77)},
            "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77)}}


def layout_specs(arch: str) -> dict[str, TensorSpec]:
    tensors = json.loads((LAYOUTS / f"{arch}.json").read_text())["tensors"]
    specs = {t["key"]: TensorSpec(tuple(t["shape"]), torch.float16) for t in tensors}
    for key, shape in INT_KEYS.get(arch, {}).items():
        specs[key] = TensorSpec(shape, torch.int64)
    return specs


def _pool_slice(pool: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    offset %= pool.numel()
    if offset + n <= pool.numel():
        return pool[offset:offset + n]
    reps = (offset + n) // pool.numel() + 1
    return pool.repeat(reps)[offset:offset + n]


def build_model(path: Path, arch: str, index: int, spread: float = 0.03, seed: int = 0) -> Path:
    specs = layout_specs(arch)
    if path.exists():
        return path
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL_SIZE, generator=gen) * 0.05).half()
    noise = torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(seed + 1000 + index)).half()
    with SafetensorsWriter(path, specs, {"bench": f"{arch} model {index}"}) as writer:
        for n, (key, spec) in enumerate(specs.items()):
            if spec.dtype == torch.int64:
                writer.write(key, torch.arange(spec.numel).reshape(spec.shape))
                continue
            base = _pool_slice(pool, n * 7919, spec.numel)
            delta = _pool_slice(noise, n * 104729, spec.numel)
            tensor = (base.float() + (spread * 0.05) * delta.float()).half().reshape(spec.shape)
            writer.write(key, tensor)
    return path


def ensure_models(arch: str, count: int = 3) -> list[Path]:
    DATA.mkdir(exist_ok=True)
    return [build_model(DATA / f"{arch}_bench_{i}.safetensors", arch, i) for i in range(count)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--count", type=int, default=3)
    args = ap.parse_args()
    for p in ensure_models(args.arch, args.count):
        print(p, p.stat().st_size)

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


# --- hyper-merge fixtures ----------------------------------------------------------------------
# Every covered layer of model m: dW_m = sum_j coeff[m, j] * B_j + own * O_m + noise * N_m, with B_j shared
# components, O_m a part of model m's own and N_m unstructured Gaussian noise; each term has a singular
# spectrum sigma_i ~ i^-decay (over `inner` directions, divided by the shrink factor) and own/noise carry
# those shares of the shared part's energy. Ranks for a shrunk fixture: `fixture_ranks`.
HYPER_FIXTURES = {
    # the original benchmark's structure: 4 models, six shared components of decaying scale, spectra ~ 1/i
    # over 256 directions, a little noise (the same files bench_hyper.py's own writer made before); the
    # reference's own ranks 64 64 32 32 (4 LoRAs for 4 models: the 4th adds rank to the largest direction)
    "spectral": dict(models=4, shared=6, scales=[1.0, 0.7, 0.5, 0.35, 0.25, 0.18], decay=1.0, inner=256,
                     own=0.0, own_decay=1.0, noise=0.1, ranks=[64, 64, 32, 32]),
    # hard: 6 models, broad (nearly flat) spectra of full rank, a strong part of each model's own,
    # substantial noise; 4 LoRAs with a budget far below the span
    "broad": dict(models=6, shared=4, scales=[1.0, 0.8, 0.6, 0.5], decay=0.3, inner=None,
                  own=0.5, own_decay=0.5, noise=0.3, ranks=[32, 16, 16, 8]),
    # hard: 8 models, eight shared directions of similar size, own parts, noise
    "many": dict(models=8, shared=8, scales=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4], decay=0.5, inner=None,
                 own=0.3, own_decay=0.7, noise=0.2, ranks=[48, 32, 16, 16]),
}


def shrunk_shape(key: str, shape, shrink: int) -> tuple[int, ...]:
    """Every width divided by `shrink` (kernel sizes, latent channels and the context width kept)."""
    if shrink <= 1:
        return tuple(shape)
    dims = [d if d < 64 else max(2, d // shrink) for d in shape]
    if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) and len(shape) == 2:
        dims[1] = shape[1]
    return tuple(dims)


def _spectral(out: int, inn: int, inner, decay: float, g: torch.Generator) -> torch.Tensor:
    """A random [out, inn] matrix with singular values ~ i^-decay over `inner` directions, RMS 1."""
    p = min(out, inn) if inner is None else min(inner, out, inn)
    sigma = torch.arange(1, p + 1, dtype=torch.float32) ** -decay
    u = torch.linalg.qr(torch.randn(out, p, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inn, p, generator=g))[0]
    return ((u * sigma) @ v.T) * ((out * inn) ** 0.5 / float(sigma.norm()))


def fixture_ranks(kind: str, shrink: int = 1) -> list[int]:
    return [max(1, r // max(1, shrink)) for r in HYPER_FIXTURES[kind]["ranks"]]


def build_hyper_fixture(kind: str = "spectral", shrink: int = 1, seed: int = 0) -> list[Path]:
    """Checkpoints of one HYPER_FIXTURES kind in the SD1.5 layout, widths divided by `shrink` (cached)."""
    from merge_core.lora.keys import lora_modules
    spec = HYPER_FIXTURES[kind]
    count = spec["models"]
    tag = f"hyper_{kind}" + (f"_s{shrink}" if shrink > 1 else "")
    paths = [DATA / f"{tag}_{m}.safetensors" for m in range(count)]
    if all(p.exists() for p in paths):
        return paths
    DATA.mkdir(exist_ok=True)
    specs = {k: TensorSpec(shrunk_shape(k, s.shape, shrink), s.dtype) for k, s in layout_specs("sd15").items()}
    covered = {mod.key for mod in lora_modules(specs, "sd1")}
    g = torch.Generator().manual_seed(seed)
    coeff = torch.randn(count, spec["shared"], generator=g) * torch.tensor(spec["scales"])
    energy = float((coeff - coeff.mean(0)).pow(2).sum(1).mean())   # shared energy per model, in RMS^2 units
    tmp = [p.with_name(p.name + ".part") for p in paths]
    writers = [SafetensorsWriter(p, specs, overwrite=True).__enter__() for p in tmp]
    try:
        for key, s in specs.items():
            if s.dtype == torch.int64:
                for w in writers:
                    w.write(key, torch.arange(s.numel).reshape(s.shape))
                continue
            base = torch.randn(s.shape, generator=g) * 0.05
            if key in covered:
                out, inn = s.shape[0], s.numel // s.shape[0]
                inner = None if spec["inner"] is None else max(1, spec["inner"] // shrink)
                comps = [_spectral(out, inn, inner, spec["decay"], g) * 0.02 for _ in spec["scales"]]
                for m, w in enumerate(writers):
                    delta = sum(float(coeff[m, j]) * c for j, c in enumerate(comps))
                    if spec["own"]:
                        delta += _spectral(out, inn, None, spec["own_decay"], g) * (0.02 * (spec["own"] * energy) ** 0.5)
                    delta += torch.randn(out, inn, generator=g) * (0.02 * (spec["noise"] * energy) ** 0.5
                                                                   if kind != "spectral" else 0.002)
                    w.write(key, (base + delta.reshape(s.shape)).half())
            else:
                for w in writers:
                    w.write(key, (base + 0.001 * torch.randn(s.shape, generator=g)).half())
    except BaseException:
        for w in writers:
            w.__exit__(RuntimeError, None, None)
        raise
    for w in writers:
        w.__exit__(None, None, None)
    for t, p in zip(tmp, paths):
        t.replace(p)
    return paths

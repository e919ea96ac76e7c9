"""Streaming hyper-merge: files in, hyper checkpoint + LoRA files + multipliers + report out.

Never holds all M models: every pass reads one covered layer of every model at
a time (zero-copy views of the files), so memory is the LoRA factors plus
M x the largest layer. All outputs are written into a hidden folder in the
output directory and moved into place only when everything succeeded.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import methods
from ..engine import merge, resolve_device
from ..errors import MergeCancelled, MergeError, OutputExists
from ..inputs import plain_name
from ..io.sources import ModelSource, open_model
from ..lora.format import balanced_factors, factors_to_lora_tensors, save_lora, strength_tag
from ..lora.keys import LoraModule, layer_deltas, lora_modules
from ..plan import FLOAT_DTYPE_NAMES, check_architectures
from . import decompose as D

DTYPE_ALIASES = {"float16": "fp16", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16",
                 "float32": "fp32", "fp32": "fp32", "float": "fp32"}
Progress = Callable[[int, int, str], "bool | None"]


@dataclass
class HyperConfig:
    models: Sequence[str | os.PathLike]
    name: str = "hyper"
    out_dir: str | os.PathLike = "."
    lora_dir: str | os.PathLike | None = None  # where the LoRA files go (default: out_dir)
    ranks: Sequence[int] = (64, 64, 32, 32)
    iterations: int = 6
    device: str = "cpu"
    dtype: str = "fp16"
    tol: float = 1e-3
    seed: int = 0
    floor: bool = True
    overwrite: bool = False
    threads: int | None = None
    progress: Progress | None = None


@dataclass
class HyperResult:
    hyper_path: Path
    lora_paths: list[Path]
    multipliers_path: Path
    report_path: Path
    lambdas: dict[str, list[float]]
    report: dict
    rounds: list[dict] = field(default_factory=list)


def stem(path) -> str:
    return Path(path).name.rsplit(".", 1)[0]


def output_names(name: str, ranks: Sequence[int]) -> dict[str, str]:
    names = {"hyper": f"{name}_hyper.safetensors", "multipliers": f"{name}_multipliers.txt",
             "report": f"{name}_report.json"}
    for k, r in enumerate(ranks):
        names[f"lora{k}"] = f"{name}_{k}-{r}.safetensors"
    return names


class _Ticker:
    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.progress is not None and self.progress(self.done, self.total, label) is False:
            raise MergeCancelled("hyper-merge cancelled; nothing was written")


def _validate(sources: Sequence[ModelSource], modules: Sequence[LoraModule]) -> None:
    first = sources[0]
    for src in sources[1:]:
        for module in modules:
            if module.key not in src:
                raise MergeError(f"{src.name}: has no {module.key!r} (present in {first.name})")
            if src.spec(module.key).shape != first.spec(module.key).shape:
                raise MergeError(f"{src.name}: {module.key!r} has shape {list(src.spec(module.key).shape)}, "
                                 f"{first.name} has {list(first.spec(module.key).shape)}")


@torch.no_grad()
def run_hyper(cfg: HyperConfig) -> HyperResult:
    started = time.perf_counter()
    plain_name(cfg.name, "name")  # a file name, never a path
    if len(cfg.models) < 2:
        raise MergeError("hyper-merge needs at least 2 models")
    if not cfg.ranks or any(int(r) < 1 for r in cfg.ranks):
        raise MergeError(f"ranks must be positive integers, got {list(cfg.ranks)}")
    if cfg.iterations < 1:
        raise MergeError("iterations must be >= 1")
    dtype_name = DTYPE_ALIASES.get(str(cfg.dtype).lower())
    if dtype_name is None:
        raise MergeError(f"unknown dtype {cfg.dtype!r} (float16, bfloat16 or float32)")
    out_dtype = FLOAT_DTYPE_NAMES[dtype_name]
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    if not out_dir.is_dir():
        raise MergeError(f"{out_dir}: output folder does not exist")
    lora_dir = Path(cfg.lora_dir) if cfg.lora_dir is not None else out_dir
    if not lora_dir.is_dir():
        raise MergeError(f"{lora_dir}: LoRA folder does not exist")
    ranks = D.assign_ranks(cfg.ranks)
    names = output_names(cfg.name, ranks)
    final = {key: (lora_dir if key.startswith("lora") else out_dir) / fname for key, fname in names.items()}
    for path in final.values():
        if path.exists() and not cfg.overwrite:
            raise OutputExists(f"{path}: already exists (use --overwrite to replace it)")
    model_paths = [Path(p) for p in cfg.models]
    stems = [stem(p) for p in model_paths]
    if len(set(stems)) != len(stems):
        raise MergeError(f"two models share a name ({', '.join(stems)}); LoRA tags need distinct names")

    sources = [open_model(p) for p in model_paths]
    tmp = out_dir / f".{cfg.name}.tmp-hyper"
    try:
        arch, _ = check_architectures(sources, force=False)
        modules = lora_modules(sources[0].specs(), arch)
        _validate(sources, modules)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        n_layers = len(modules)
        ticker = _Ticker(cfg.progress, n_layers * (cfg.iterations + 1 + (1 if cfg.floor else 0)) + 1)

        # 1. The hyper model: the plain average of all models (every key), streamed by the engine.
        hyper_path = tmp / names["hyper"]
        merge(model_paths, "sma", output=hyper_path, dtype=dtype_name, device=device, threads=cfg.threads,
              hash_inputs=False)
        ticker("hyper checkpoint")
        hyper = open_model(hyper_path)
        try:
            rounds, lam, factors, fits, uncovered_sq, eigvals = _decompose(
                cfg, sources, hyper, modules, ranks, device, ticker)
            floor_sq = _svd_floor(sources, hyper, modules, sum(ranks), device, ticker) if cfg.floor else None
        finally:
            hyper.close()

        lam_rows = {s: [float(lam[k, m]) for k in range(len(ranks))] for m, s in enumerate(stems)}
        lora_names = [names[f"lora{k}"].rsplit(".", 1)[0] for k in range(len(ranks))]
        lora_paths = _write_loras(tmp, names, lora_names, modules, factors, ranks, lam_rows, out_dtype, cfg, arch)
        report = _report(cfg, stems, modules, ranks, lam, fits, uncovered_sq, floor_sq, eigvals, rounds,
                         model_paths, [hyper_path] + lora_paths, arch, time.perf_counter() - started)
        multipliers = "".join(f"{s}: " + " ".join(strength_tag(n, lam_rows[s][k]) for k, n in enumerate(lora_names))
                              + "\n" for s in stems)
        (tmp / names["multipliers"]).write_text(multipliers)
        (tmp / names["report"]).write_text(json.dumps(report, indent=2))
        for key, fname in names.items():  # everything succeeded: move into place
            _move_into_place(tmp / fname, final[key])
    finally:
        for s in sources:
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return HyperResult(final["hyper"], [final[f"lora{k}"] for k in range(len(ranks))],
                       final["multipliers"], final["report"], lam_rows, report, rounds)


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename; across file systems, copy to a hidden name beside `dst` first so `dst` is never partial."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        part = dst.with_name(f".{dst.name}.part")
        try:
            shutil.copyfile(src, part)
            os.replace(part, dst)
        finally:
            part.unlink(missing_ok=True)


def _decompose(cfg, sources, hyper, modules, ranks, device, ticker):
    m_count, k_count = len(sources), len(ranks)
    covered_keys = {mod.key for mod in modules}
    # Pass 0: Gram matrix of the differences over the covered layers (for the PCA start), and the
    # energy left in everything the LoRAs do not cover (for the "all weights" error).
    gram = torch.zeros(m_count, m_count, dtype=torch.float64)
    for mod in modules:
        gram += methods.gram_matrix(layer_deltas(sources, hyper, mod, device))
        ticker(mod.name)
    uncovered_sq = torch.zeros(m_count, dtype=torch.float64)
    for key, spec in sources[0].specs().items():
        if key in covered_keys or not spec.is_float:
            continue
        h = hyper.load(key).to(device=device, dtype=torch.float32)
        deltas = [s.load(key).to(device=device, dtype=torch.float32) - h for s in sources]
        for src in list(sources) + [hyper]:
            src.release(key)
        uncovered_sq += torch.tensor([float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2) for d in deltas])
    lam, eigvals = D.pca_lambdas(gram, k_count)

    # Factors are kept between rounds; in float16 when float32 would not fit comfortably.
    factor_bytes = sum((mod.out_features + mod.in_features) * sum(ranks) * 4 for mod in modules)
    store = torch.float32 if factor_bytes < 1.5 * 2**30 else torch.float16
    factors: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * len(modules)
    rounds, previous_loss, fits = [], None, []
    for round_index in range(cfg.iterations):
        fits = []
        total = D.LayerFit(torch.zeros(k_count, k_count, dtype=torch.float64),
                           torch.zeros(m_count, k_count, dtype=torch.float64),
                           torch.zeros(m_count, dtype=torch.float64))
        for i, mod in enumerate(modules):
            deltas = layer_deltas(sources, hyper, mod, device)
            layer_ranks = [min(r, mod.out_features, mod.in_features) for r in ranks]
            generator = torch.Generator().manual_seed(D.module_seed(cfg.seed, mod.name))
            previous = None if factors[i] is None else [(u.to(device), v.to(device)) for u, v in factors[i]]
            new, fit = D.fit_layer(deltas, lam, layer_ranks, previous, generator,
                                   power_iters=2 if previous is None else 1)
            factors[i] = [(u.to("cpu", store), v.to("cpu", store)) for u, v in new]
            fits.append(fit)
            total.gram_dd += fit.gram_dd
            total.cross += fit.cross
            total.delta_sq += fit.delta_sq
            ticker(mod.name)
        lam = D.solve_lambdas(total.gram_dd, total.cross)
        lam, scale = D.normalize_components(lam)
        scale64 = scale.double()
        for i in range(len(modules)):  # D_k *= scale_k keeps lam_k * D_k unchanged
            factors[i] = [(u * float(scale[k]), v) for k, (u, v) in enumerate(factors[i])]
            fits[i].gram_dd = fits[i].gram_dd * torch.outer(scale64, scale64)
            fits[i].cross = fits[i].cross * scale64[None, :]
        total.gram_dd *= torch.outer(scale64, scale64)
        total.cross *= scale64[None, :]
        loss = D.squared_error(total.gram_dd, total.cross, total.delta_sq, lam)
        rel = (loss / total.delta_sq.clamp_min(1e-300)).tolist()
        rounds.append({"round": round_index + 1, "relative_error": rel, "mean_relative_error": sum(rel) / len(rel)})
        current = float(loss.sum())
        if previous_loss is not None and previous_loss > 0 and (previous_loss - current) / previous_loss < cfg.tol:
            break
        previous_loss = current
    return rounds, lam, factors, fits, uncovered_sq, eigvals


def _svd_floor(sources, hyper, modules, total_rank, device, ticker) -> torch.Tensor:
    """Each model's own best rank-sum(r_k) approximation per layer: what no decomposition can beat."""
    floor = torch.zeros(len(sources), dtype=torch.float64)
    for mod in modules:
        for m, delta in enumerate(layer_deltas(sources, hyper, mod, device)):
            r = min(total_rank, *delta.shape)
            s = torch.linalg.svdvals(delta)
            floor[m] += float((s[r:].double() ** 2).sum())
        ticker(mod.name)
    return floor


def _write_loras(tmp, names, lora_names, modules, factors, ranks, lam_rows, out_dtype, cfg, arch):
    paths = []
    for k, rank in enumerate(ranks):
        tensors = {}
        for mod, layer in zip(modules, factors):
            u, v = layer[k]
            up, down = balanced_factors(u.float(), v.float())
            tensors.update(factors_to_lora_tensors(mod, up, down, out_dtype))
        metadata = {
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[arch],
            "manifold_hyper_name": cfg.name, "manifold_hyper_index": str(k),
            "manifold_hyper_lambdas": json.dumps({s: row[k] for s, row in lam_rows.items()}),
        }
        metadata.update({s: str(row[k]) for s, row in lam_rows.items()})  # as the reference tool wrote them
        path = tmp / names[f"lora{k}"]
        save_lora(path, tensors, metadata)
        paths.append(path)
    return paths


def _report(cfg, stems, modules, ranks, lam, fits, uncovered_sq, floor_sq, eigvals, rounds, inputs, outputs,
            arch, seconds) -> dict:
    per_model = []
    blocks = sorted({mod.block for mod in modules})
    for m, s in enumerate(stems):
        covered_sq = sum(float(f.delta_sq[m]) for f in fits)
        err = float(sum(D.squared_error(f.gram_dd, f.cross, f.delta_sq, lam)[m] for f in fits))
        row = {"model": s, "lambdas": [float(lam[k, m]) for k in range(len(ranks))],
               "relative_error_covered": err / covered_sq if covered_sq else 0.0,
               "relative_error_all_weights": (err + float(uncovered_sq[m])) / (covered_sq + float(uncovered_sq[m]))
               if covered_sq + float(uncovered_sq[m]) else 0.0,
               "uncovered_share_of_difference": float(uncovered_sq[m]) / (covered_sq + float(uncovered_sq[m]))
               if covered_sq + float(uncovered_sq[m]) else 0.0}
        if floor_sq is not None:
            row["svd_floor_covered"] = float(floor_sq[m]) / covered_sq if covered_sq else 0.0
        row["per_block"] = {}
        for block in blocks:
            idx = [i for i, mod in enumerate(modules) if mod.block == block]
            b_sq = sum(float(fits[i].delta_sq[m]) for i in idx)
            b_err = sum(float(D.squared_error(fits[i].gram_dd, fits[i].cross, fits[i].delta_sq, lam)[m]) for i in idx)
            row["per_block"][block] = b_err / b_sq if b_sq else 0.0
        per_model.append(row)
    total_sq = sum(float(f.delta_sq.sum()) for f in fits)
    energy = []
    for k in range(len(ranks)):
        captured = sum(float((lam[k] ** 2).sum()) * float(f.gram_dd[k, k]) for f in fits)
        energy.append(captured / total_sq if total_sq else 0.0)
    in_bytes = sum(Path(p).stat().st_size for p in inputs)
    out_bytes = sum(Path(p).stat().st_size for p in outputs)
    return {
        "name": cfg.name, "architecture": arch, "models": stems, "ranks": list(ranks),
        "iterations_run": len(rounds), "covered_modules": len(modules), "seconds": round(seconds, 1),
        "per_model": per_model,
        "mean_relative_error_covered": sum(r["relative_error_covered"] for r in per_model) / len(per_model),
        "lora_energy_share": energy,
        "pca_eigenvalue_share": [float(v) / float(eigvals.clamp_min(0).sum()) for v in eigvals[:len(ranks)]]
        if float(eigvals.clamp_min(0).sum()) > 0 else [],
        "rounds": rounds,
        "bytes": {"inputs": in_bytes, "outputs": out_bytes, "ratio": out_bytes / in_bytes if in_bytes else 0.0},
    }


def format_report(report: dict) -> str:
    k = len(report["ranks"])
    head = f"{'model':24s} " + " ".join(f"{'λ' + str(i):>8s}" for i in range(k)) + \
        f" {'err(LoRA layers)':>17s} {'err(all)':>9s}" + (f" {'SVD floor':>10s}" if "svd_floor_covered" in report["per_model"][0] else "")
    lines = [head]
    for row in report["per_model"]:
        line = f"{row['model'][:24]:24s} " + " ".join(f"{x:8.4f}" for x in row["lambdas"])
        line += f" {row['relative_error_covered']:17.4f} {row['relative_error_all_weights']:9.4f}"
        if "svd_floor_covered" in row:
            line += f" {row['svd_floor_covered']:10.4f}"
        lines.append(line)
    b = report["bytes"]
    lines.append(f"mean relative error over the LoRA layers: {report['mean_relative_error_covered']:.4f} "
                 f"after {report['iterations_run']} rounds; outputs {b['outputs'] / 2**30:.2f} GiB for "
                 f"{b['inputs'] / 2**30:.2f} GiB of inputs ({b['ratio']:.2f}x)")
    lines.append("energy captured per LoRA: " + ", ".join(f"{e:.3f}" for e in report["lora_energy_share"]))
    return "\n".join(lines)

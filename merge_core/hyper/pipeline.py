"""Streaming hyper-merge: files in, hyper checkpoint + LoRA files + multipliers + report out.

Never holds all M models: every pass reads one covered layer of every model at
a time (zero-copy views of the files), so memory is the LoRA factors plus
M x the largest layer. All outputs are written into a hidden folder in the
output directory and moved into place only when everything succeeded.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine import merge, resolve_device
from ..errors import MergeCancelled, MergeError
from ..inputs import plain_name
from ..io.atomic import (Target, check_writable_folder, deferred_signals, lock_exclusive, make_parents,
                         remove_created, remove_quietly, sweep_stale, temp_name)
from ..io.safetensors_file import check_output_path
from ..io.sources import ModelSource, open_model
from ..lora.format import balanced_factors, base_model_metadata, factors_to_lora_tensors, save_lora, strength_tag
from ..lora.keys import LoraModule, layer_deltas, lora_modules
from ..memory import release_free_memory
from ..plan import FLOAT_DTYPE_NAMES, check_architectures
from ..io.safetensors_file import HEADER_SLACK
from ..threads import SMALL_UNIT, map_ordered, resolve_threads, thread_policy, workers_for
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
    ranks: Sequence[int] | str = (64, 64, 32, 32)   # or "auto" (with budget or target)
    iterations: int = 6
    device: str = "cpu"
    dtype: str = "fp16"
    tol: float = 1e-3
    seed: int = 0
    floor: bool = True
    overwrite: bool = False
    threads: int | None = None
    start: str = "auto"        # "pca", "greedy", "reference", "auto" (pca + reference) or "all" (START_SETS)
    budget: int | str | None = None   # ranks="auto": total bytes of the LoRA files, e.g. "500MB"
    target: float | None = None       # ranks="auto": mean relative error to reach, e.g. 0.05
    power: float = 2.0         # rounds minimise (mean_m e_m^power)^(1/power), e_m = relative error
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
    notes: list[str] = field(default_factory=list)  # e.g. stale temporary files of killed runs, removed


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
        self.done = min(self.done + 1, self.total)
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


def run_hyper(cfg: HyperConfig) -> HyperResult:
    """The whole hyper-merge under the library's thread policy: one torch intra-op thread throughout (the
    per-layer linear algebra is small; the sketch pass runs layers on `threads` workers, the hyper checkpoint
    is the engine's own split), torch's previous setting restored afterwards."""
    out_dir = Path(cfg.out_dir)
    created = []
    if not out_dir.exists():  # `--out-dir out/` makes the folder, as users expect; a failed run takes it back
        check_writable_folder(out_dir / "x")
        created = make_parents(out_dir / "x")
    try:
        with thread_policy(cfg.threads, "cpu", workers=1, small=True):
            return _run_hyper(cfg)
    except BaseException:
        remove_created(created)
        raise


@torch.no_grad()
def _run_hyper(cfg: HyperConfig) -> HyperResult:
    started = time.perf_counter()
    plain_name(cfg.name, "name")  # a file name, never a path
    if len(cfg.models) < 2:
        raise MergeError("hyper-merge needs at least 2 models")
    auto = isinstance(cfg.ranks, str)
    if auto:
        if cfg.ranks.strip().lower() != "auto":
            raise MergeError(f"ranks must be positive integers or 'auto', got {cfg.ranks!r}")
        if (cfg.budget is None) == (cfg.target is None):
            raise MergeError("ranks auto needs exactly one of budget (e.g. 500MB) or target (e.g. 0.05)")
        if cfg.target is not None and not 0 < float(cfg.target) < 1:
            raise MergeError(f"target is a relative error between 0 and 1, got {cfg.target}")
    elif not cfg.ranks or any(int(r) < 1 for r in cfg.ranks):
        raise MergeError(f"ranks must be positive integers, got {list(cfg.ranks)}")
    if cfg.iterations < 1:
        raise MergeError("iterations must be >= 1")
    if cfg.start not in START_SETS and cfg.start not in START_SETS["all"]:
        raise MergeError(f"start must be one of {', '.join([*START_SETS, *START_SETS['all']])}, got {cfg.start!r}")
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
    auto_info = None
    if auto:
        ranks, auto_info = _auto_ranks(cfg, [Path(p) for p in cfg.models], device, out_dtype)
    else:
        ranks = D.assign_ranks(cfg.ranks)
    names = output_names(cfg.name, ranks)
    final = {key: (lora_dir if key.startswith("lora") else out_dir) / fname for key, fname in names.items()}
    for path in final.values():
        check_output_path(path, cfg.overwrite)
    targets = {key: Target.capture(path, cfg.overwrite) for key, path in final.items()}
    model_paths = [Path(p) for p in cfg.models]
    stems = [stem(p) for p in model_paths]
    if len(set(stems)) != len(stems):
        raise MergeError(f"two models share a name ({', '.join(stems)}); LoRA tags need distinct names")

    sources = [open_model(p) for p in model_paths]
    stale = sweep_stale(out_dir) + (sweep_stale(lora_dir) if lora_dir.resolve() != out_dir.resolve() else [])
    tmp = out_dir / temp_name(out_dir / cfg.name)
    tmp_fd = None
    try:
        arch, _ = check_architectures(sources, force=False)
        modules = lora_modules(sources[0].specs(), arch)
        _validate(sources, modules)
        tmp.mkdir()
        tmp_fd = os.open(tmp, os.O_RDONLY)
        lock_exclusive(tmp_fd)
        n_layers = len(modules)
        # the hyper checkpoint, the sketch pass (a tick per layer), the rounds of every start and up to
        # EXACT_PASSES exact passes (a tick per layer); steps skipped or stopped early jump ahead at the end
        n_starts = len(START_SETS.get(cfg.start, [cfg.start]))
        ticker = _Ticker(cfg.progress, n_layers * (1 + EXACT_PASSES) + 1 + n_starts * cfg.iterations)

        # 1. The hyper model: the plain average of all models (every key), streamed by the engine.
        hyper_path = tmp / names["hyper"]
        stages: dict[str, float] = {}   # seconds per stage, for the report
        clock = time.perf_counter()
        merge(model_paths, "sma", output=hyper_path, dtype=dtype_name, device=device, threads=cfg.threads,
              hash_inputs=False)
        ticker("hyper checkpoint")
        stages["hyper checkpoint"] = round(time.perf_counter() - clock, 2)
        hyper = open_model(hyper_path)
        try:
            rounds, lam, factors, fits, uncovered_sq, eigvals, floor_sq = _decompose(
                cfg, sources, hyper, modules, ranks, device, ticker, stages)
        finally:
            hyper.close()

        lam_rows = {s: [float(lam[k, m]) for k in range(len(ranks))] for m, s in enumerate(stems)}
        lora_names = [names[f"lora{k}"].rsplit(".", 1)[0] for k in range(len(ranks))]
        clock = time.perf_counter()
        lora_paths = _write_loras(tmp, names, lora_names, modules, factors, ranks, lam_rows, out_dtype, cfg, arch)
        stages["LoRA files"] = round(time.perf_counter() - clock, 2)
        report = _report(cfg, stems, modules, ranks, lam, fits, uncovered_sq, floor_sq, eigvals, rounds,
                         model_paths, [hyper_path] + lora_paths, arch, time.perf_counter() - started)
        if auto_info is not None:
            auto_info["lora_bytes"] = sum(p.stat().st_size for p in lora_paths)
            auto_info["met"] = (auto_info["lora_bytes"] <= auto_info["budget_bytes"] if "budget_bytes" in auto_info
                                else report["mean_relative_error_covered"] <= auto_info["target"])
            report["auto_ranks"] = auto_info
        report["stage_seconds"] = stages
        if len(ranks) > len(stems) - 1:  # the reference's own setting (4 models, ranks 64 64 32 32) is one
            report["note"] = (f"{len(ranks)} LoRAs for {len(stems)} models: the models span at most "
                              f"{len(stems) - 1} directions around their average; the LoRAs beyond that add rank "
                              f"to the largest directions (ranks auto never does this)")
        multipliers = "".join(f"{s}: " + " ".join(strength_tag(n, lam_rows[s][k]) for k, n in enumerate(lora_names))
                              + "\n" for s in stems)
        (tmp / names["multipliers"]).write_text(multipliers)
        (tmp / names["report"]).write_text(json.dumps(report, indent=2))
        placed: list[Path] = []
        try:
            for key, fname in names.items():  # everything succeeded: move into place
                _move_into_place(tmp / fname, targets[key])
                placed.append(targets[key].path)
        except BaseException:
            with deferred_signals():  # a set is whole or absent: take back the files of this run
                for key, path in zip(names, placed):
                    if targets[key].identity is None:
                        remove_quietly(path)
            raise
    finally:
        with deferred_signals():
            remove_quietly(tmp)
            if tmp_fd is not None:
                os.close(tmp_fd)
        for s in sources:
            s.close()
    return HyperResult(final["hyper"], [final[f"lora{k}"] for k in range(len(ranks))],
                       final["multipliers"], final["report"], lam_rows, report, rounds,
                       notes=[entry.describe() for entry in stale])


def _move_into_place(src: Path, target: Target) -> None:
    """Move a finished file into place under the no-replace rule; across file systems, copy it to a
    hidden temporary name beside the target first, so the target is never partial."""
    if src.parent.resolve() != target.path.parent.resolve():
        part = target.path.parent / temp_name(target.path)
        try:
            shutil.copyfile(src, part)
            target.place(part)
        finally:
            remove_quietly(part if part.exists() else None)
        return
    target.place(src)


def parse_size(value) -> int:
    """Bytes from 500MB / 1.5GB / 800MiB / 123456 (KB, MB, GB: powers of 1000; KiB, MiB, GiB: of 1024)."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            text, scale = text[:-len(unit)], factor
            break
    else:
        scale = 1
    try:
        size = float(text) * scale
    except ValueError:
        raise MergeError(f"budget: cannot read {value!r} (e.g. 500MB, 1.5GB)") from None
    if size <= 0:
        raise MergeError(f"budget must be positive, got {value!r}")
    return int(size)


AUTO_WIDTH = 256   # ranks auto: sketch columns per layer (total rank at most AUTO_WIDTH - 32)


@torch.no_grad()
def _auto_ranks(cfg, model_paths, device, out_dtype) -> tuple[list[int], dict]:
    """Pick how many LoRAs and which ranks from the principal components of the differences.

    One streaming pass (around the models' float32 mean): per layer the sketch of all differences; then
    each principal component's matrix per layer (sum_m v[k,m] C[m]), its singular values, and ranks
    allocated greedily by energy captured per byte (steps of 4) until the budget is spent or the
    estimated mean error reaches the target. Never more LoRAs than the M - 1 directions the models span."""
    sources = [open_model(p) for p in model_paths]
    try:
        arch, _ = check_architectures(sources, force=False)
        modules = lora_modules(sources[0].specs(), arch)
        _validate(sources, modules)
        m_count = len(sources)
        itemsize = torch.empty(0, dtype=out_dtype).element_size()
        cost_per_rank = sum((mod.out_features + mod.in_features) * itemsize for mod in modules)
        # a LoRA file's header: three tensors per module (up, down, alpha) and the metadata
        per_lora = sum(3 * (len(mod.name) + 100) + itemsize for mod in modules) + HEADER_SLACK + 1024 + 128 * m_count
        budget = parse_size(cfg.budget) if cfg.budget is not None else None
        max_total = AUTO_WIDTH - 32
        if budget is not None:
            max_total = min(max_total, int((budget - per_lora) // cost_per_rank))
            if max_total < 1:
                raise MergeError(f"budget {budget:,} bytes is less than one rank-1 LoRA "
                                 f"({cost_per_rank + per_lora:,} bytes)")
        width = min(AUTO_WIDTH, max_total + 32)
        largest = max(mod.out_features * mod.in_features for mod in modules)
        workers = workers_for(largest * m_count, cfg.threads, len(modules))
        small = largest * m_count < SMALL_UNIT

        def sketch(mod):
            rows = []
            for src in sources:
                t = src.load(mod.key)
                if mod.row_start is not None:
                    t = t[mod.row_start:mod.row_stop]
                rows.append(t.to(device=device, dtype=torch.float32).reshape(mod.out_features, -1))
                src.release(mod.key)
            mean = sum(rows) / m_count
            generator = torch.Generator().manual_seed(D.module_seed(cfg.seed, mod.name))
            return D.sketch_layer([r - mean for r in rows], width, generator)

        gram = torch.zeros(m_count, m_count, dtype=torch.float64)
        total = 0.0
        cores = []
        with thread_policy(cfg.threads, device, workers=workers, small=small):
            for sk in map_ordered(sketch, modules, workers):
                gram += sk.gram
                total += float(sk.delta_sq.sum())
                cores.append(sk.cores)
        with thread_policy(cfg.threads, device, workers=1, small=True):
            energy, eigvals = D.component_spectra(cores, gram)
        energy = energy[:m_count - 1]
        step = 4 if budget is None or max_total >= 4 else 1
        ranks, estimate = D.allocate_ranks(energy, total, cost_per_rank, budget,
                                           None if cfg.target is None else float(cfg.target), step, max_total,
                                           per_lora)
    finally:
        for s in sources:
            s.close()
    if not ranks:
        raise MergeError("ranks auto: the models do not differ in the LoRA layers")
    info = {"mode": "budget" if budget is not None else "target", "ranks": ranks, "loras": len(ranks),
            "directions_spanned": int(energy.shape[0]), "estimated_mean_error": estimate,
            "bytes_per_rank": cost_per_rank}
    if budget is not None:
        info["budget_bytes"] = budget
    else:
        info["target"] = float(cfg.target)
        if estimate > float(cfg.target):
            info["warning"] = (f"target {cfg.target} not reachable with a total rank of {max_total} "
                               f"(estimated {estimate:.4f})")
    return ranks, info


def _decompose(cfg, sources, hyper, modules, ranks, device, ticker, stages):
    """Sketch pass (the only pass over the files after the hyper checkpoint), then rounds on the cores."""
    m_count, k_count = len(sources), len(ranks)
    covered_keys = {mod.key for mod in modules}
    width = sum(D.direction_widths(ranks, m_count - 1))   # the widest a layer's sketch gets
    largest = max(mod.out_features * mod.in_features for mod in modules)
    workers = workers_for(largest * m_count, cfg.threads, len(modules))
    small = largest * m_count < SMALL_UNIT   # small layers: one thread in all, no OpenMP team per op
    total_rank = sum(ranks)

    # Bases are kept for the final factors: float32, or float16 above BASES_FP32_LIMIT.
    basis_bytes = sum(((mod.out_features if mod.out_features > width else 0) +
                       (mod.in_features if mod.in_features > width else 0)) * width * 4 for mod in modules)
    store = torch.float32 if basis_bytes < BASES_FP32_LIMIT else torch.float16

    def sketch(i):  # runs on the policy's workers (set once below)
        mod = modules[i]
        deltas = layer_deltas(sources, hyper, mod, device)
        generator = torch.Generator().manual_seed(D.module_seed(cfg.seed, mod.name))
        sk = D.sketch_directions(deltas, ranks, generator, power_iters=SKETCH_POWER_ITERS)
        floor = None
        if cfg.floor:
            floor = torch.zeros(m_count, dtype=torch.float64)
            for m, delta in enumerate(deltas):
                s = torch.linalg.svdvals(delta)
                floor[m] = float((s[min(total_rank, *delta.shape):].double() ** 2).sum())
        del deltas
        sk.q = None if sk.q is None else sk.q.to("cpu", store)
        sk.p = None if sk.p is None else sk.p.to("cpu", store)
        return sk, floor

    # Pass 1: per layer the sketch, |dW|^2, the Gram matrix (for the PCA start) and the SVD floor.
    clock = time.perf_counter()
    gram = torch.zeros(m_count, m_count, dtype=torch.float64)
    floor_sq = torch.zeros(m_count, dtype=torch.float64) if cfg.floor else None
    bases, cores, delta_sq = [], [], []
    # worker threads take torch's setting when they start: set it once, around the pool
    with thread_policy(cfg.threads, device, workers=workers, small=small):
        for mod, (sk, floor) in zip(modules, map_ordered(sketch, range(len(modules)), workers)):
            gram += sk.gram
            bases.append((sk.q, sk.p))
            cores.append(sk.cores)
            delta_sq.append(sk.delta_sq)
            if floor is not None:
                floor_sq += floor
            ticker(mod.name)
    # Energy left in everything the LoRAs do not cover (for the "all weights" error).
    uncovered_sq = torch.zeros(m_count, dtype=torch.float64)
    with thread_policy(cfg.threads, device, workers=1, small=True):  # norms, biases: small tensors
        for key, spec in sources[0].specs().items():
            if key in covered_keys or not spec.is_float:
                continue
            if key not in hyper or any(key not in s or s.spec(key).shape != hyper.spec(key).shape for s in sources):
                continue  # in some models only (copied into the hyper checkpoint as it is): no error to measure
            h = hyper.load(key).to(device=device, dtype=torch.float32)
            deltas = [s.load(key).to(device=device, dtype=torch.float32) - h for s in sources]
            for src in list(sources) + [hyper]:
                src.release(key)
            uncovered_sq += torch.tensor([float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
                                          for d in deltas])
    lam, eigvals = D.pca_lambdas(gram, k_count)
    stages["sketch pass"] = round(time.perf_counter() - clock, 2)

    # Rounds on the cores, batched by shape.
    layer_ranks = [[min(r, mod.out_features, mod.in_features) for r in ranks] for mod in modules]
    groups = D.group_cores(cores, layer_ranks)
    del cores
    release_free_memory()
    n_total = torch.stack(delta_sq).sum(dim=0)
    # Three starts, each refined by the same rounds: the principal components (all LoRAs at once), greedy
    # (LoRA after LoRA, strengths from each residual's principal component, least squares) and the
    # reference tool's own way (greedy from strengths of one, per-layer-mean strength step, 0.1 % stop).
    # Taken: the lowest objective among the results that leave no model worse off than the reference's.
    # The cores are small (a few hundred squared): one intra-op thread per op (a team costs more than it
    # gains on small LAPACK calls, and stalls when another process holds a core).
    numel = [torch.tensor([float(modules[i].out_features * modules[i].in_features) for i in g.index],
                          dtype=torch.float64) for g in groups]
    starts = START_SETS.get(cfg.start, [cfg.start])

    # The starts one after the other, each on all the threads: the layers of a sweep are independent, so
    # fit_cores runs chunks of them on worker threads (one intra-op thread each: the ops are small).
    candidates = {}
    round_workers = resolve_threads(cfg.threads)
    with thread_policy(cfg.threads, device, workers=round_workers, small=True):
        for start in starts:
            clock = time.perf_counter()
            for group in groups:
                group.factors = None
            if start == "greedy":
                start_lam = D.greedy_start(groups, k_count, workers=round_workers)
            elif start == "reference":
                start_lam = D.greedy_start(groups, k_count, rounds=max(cfg.iterations, 3),
                                           layer_weights=[1.0 / n for n in numel], ones=True, workers=round_workers)
            else:
                start_lam = lam
            candidates[start] = _rounds(cfg, groups, start_lam, delta_sq, n_total, ticker, start, round_workers)
            stages[f"rounds ({start} start)"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    # the lowest objective among the results that leave no model worse off than the reference's way
    anchor = candidates.get("reference", candidates[starts[-1]])
    best = anchor
    for cand in candidates.values():
        if bool((cand["rel"] <= anchor["rel"] * (1 + 1e-6) + 1e-12).all()) and cand["objective"] < best["objective"]:
            best = cand
    rounds = best["rounds"]
    for name, cand in candidates.items():
        rounds[-1].setdefault("starts", {})[name] = cand["rel"].tolist()
    rounds[-1]["start"] = best["start"]
    lam, group_factors, fits = best["lam"], best["factors"], best["fits"]
    # The factors in full coordinates stay for the rest of the run (twice during an exact pass): float32, or
    # float16 when they would exceed 1.5 GB (Flux at ranks 64 64 32 32: 4.9 GiB in float32); they are
    # written at the output dtype (float16 by default) anyway.
    factor_bytes = sum((mod.out_features + mod.in_features) * sum(lr) * 4 for mod, lr in zip(modules, layer_ranks))
    factor_dtype = torch.float32 if factor_bytes < FACTORS_FP32_LIMIT else torch.float16
    factors: list = [None] * len(modules)
    for group, gf in zip(groups, group_factors):
        for t, i in enumerate(group.index):
            q, p = bases[i]
            layer = []
            for u, v in gf:
                u_t, v_t = u[t].cpu(), v[t].cpu()
                layer.append(((u_t if q is None else q.float() @ u_t).to(factor_dtype),
                              (v_t if p is None else p.float() @ v_t).to(factor_dtype)))
            factors[i] = layer
    # the exact refinement: only where the sketch left something out (some side wider than p) and the fit is
    # not already exact (below 1e-6 the float32 accumulators cannot tell a pass's gain from rounding)
    sketched = any(q is not None or p is not None for q, p in bases)
    # what the rounds needed (bases, cores, every start's factors) is dropped before the passes: they hold
    # only the factors in full coordinates, and replace them layer by layer
    del bases, groups, group_factors, candidates, anchor, cand
    best["factors"] = None
    release_free_memory()
    stages["factors in full coordinates"] = round(time.perf_counter() - clock, 2)
    if sketched and float(best["rel"].max()) > 1e-6:
        clock = time.perf_counter()
        lam, factors, fits = _refine_exact(cfg, sources, hyper, modules, layer_ranks, best, factors, n_total,
                                           rounds, device, workers, small, ticker, factor_dtype)
        stages["exact passes"] = round(time.perf_counter() - clock, 2)
    return rounds, lam, factors, fits, uncovered_sq, eigvals, floor_sq


# Starts the rounds refine (docs/hyper.md, step 2). "auto" leaves out greedy: on every benchmark fixture its
# result was within 1 % of the reference way's and never taken (it never left every model at or below the
# reference way's), and it was the slowest start (131 of 253 s of rounds at full size).
START_SETS = {"auto": ["pca", "reference"], "all": ["pca", "greedy", "reference"]}
# bytes of float32 sketch bases above which they are kept in float16 (SD1.5, ranks 64 64 32 32: 1.4 GB in
# float32). They only carry the rounds' factors into full coordinates (rounding 5e-4 relative per entry,
# below the float16 LoRA files' own) and are dropped before the exact passes.
BASES_FP32_LIMIT = 0.5 * 2**30
FACTORS_FP32_LIMIT = 1.5 * 2**30  # bytes of float32 factors above which they are kept in float16
EXACT_PASSES = 3        # at most this many exact refinement passes (each one streaming pass over the files)
SKETCH_POWER_ITERS = 2  # the sketch's power iterations (docs/hyper.md, step 1)


def _refine_exact(cfg, sources, hyper, modules, layer_ranks, best, factors, n_total, rounds, device, workers, small,
                  ticker, factor_dtype=torch.float32):
    """The exact refinement (docs/hyper.md, step 5): streaming passes over the files after the rounds. Per
    layer every D_k is refitted on the full differences with lam and the weights fixed (the rounds' D-step
    without the sketch's subspace, `D.refit_exact`); then every model's strengths are solved again by least
    squares and the errors computed exactly from the pass's accumulators. `_select_layers` chooses which
    layers take the refit; a pass is kept only if that choice lowers the objective and leaves no model worse
    off than the state it started from. The models that taking every layer left worse off weigh more in the
    next pass (as in the rounds), which starts from the kept state."""
    state = {"lam": best["lam"], "factors": factors, "fits": best["fits"]}
    # plain least squares (w = 1): the full data's own optimum, toward which the reference's greedy steps go;
    # the guard keeps the models the rounds' weights lifted where they are
    weights = torch.ones(best["rel"].shape[0], dtype=torch.float64)
    for index in range(EXACT_PASSES):
        started = time.perf_counter()
        lam, start_factors = state["lam"], state["factors"]

        def refit(i):
            mod = modules[i]
            deltas = layer_deltas(sources, hyper, mod, device)
            generator = torch.Generator().manual_seed(D.module_seed(cfg.seed + 1 + index, mod.name))
            start = [(u.to(device), v.to(device)) for u, v in start_factors[i]]
            new, fit = D.refit_exact(deltas, lam, weights, start, layer_ranks[i], generator)
            del deltas
            return [(u.to("cpu", factor_dtype), v.to("cpu", factor_dtype)) for u, v in new], fit

        new_factors, new_fits = [], []  # the pass's factors: with the kept ones, two copies at most
        with thread_policy(cfg.threads, device, workers=workers, small=small):
            for mod, (layer, fit) in zip(modules, map_ordered(refit, range(len(modules)), workers)):
                ticker(f"exact pass {index + 1}/{EXACT_PASSES}: {mod.name}")
                new_factors.append(layer)
                new_fits.append(fit)
        take, fits, rel, before, (all_rel, all_worse) = _select_layers(state["fits"], new_fits, lam, n_total, cfg.power)
        if bool(all_worse.any()):  # taking every layer left these models worse off: they weigh more next pass
            weights = _heavier(weights, all_worse, all_rel, before)
            weights = weights / weights.mean()
        objective = _objective(rel, cfg.power)
        accepted = take is not None and objective < _objective(before, cfg.power)
        entry = {"round": f"exact {index + 1}", "relative_error": rel.tolist(),
                 "mean_relative_error": float(rel.mean()), "objective": objective,
                 "layers_refitted": 0 if take is None else int(sum(take)),
                 "seconds": round(time.perf_counter() - started, 2)}
        if not accepted:
            del new_factors, new_fits
            release_free_memory()
            rounds[-1].setdefault("exact_rejected", []).append(entry)
            if _objective(all_rel, cfg.power) >= _objective(before, cfg.power):
                break  # even every layer's refit does not lower F: the full differences add nothing here
            continue
        total_dd = sum(f.gram_dd for f in fits)
        total_cross = sum(f.cross for f in fits)
        new_lam, scale = _strengths(total_dd, total_cross, fits)
        rounds.append(entry)
        gain = 1 - objective / max(_objective(before, cfg.power), 1e-300)
        kept = state["factors"]  # the caller's list: each layer replaced in place, the old factors freed
        for i, layer in enumerate(new_factors):
            if take[i]:
                kept[i] = layer
            for k, (u, _) in enumerate(kept[i]):
                u.mul_(float(scale[k]))
        del new_factors, new_fits
        release_free_memory()
        state = {"lam": new_lam, "factors": kept, "fits": fits}
        if gain < cfg.tol and not bool(all_worse.any()):  # converged (a pass held back by the guard goes on)
            break
    return state["lam"], state["factors"], state["fits"]


SELECT_STEPS = 40   # reweightings tried when choosing which layers take an exact pass's factors


def _select_layers(old_fits, new_fits, lam, n_total, power):
    """Which layers take an exact pass's new factors (docs/hyper.md, step 5). Every layer's change of each
    model's error at the current strengths is known from the accumulators (old and new, both exact), so
    choosing costs no file I/O. Candidates: (a) layers in order of the summed change of the relative
    errors, each taken only while no model's summed change goes above zero (at the current strengths no
    model is worse off; solving the strengths again can only lower each one's error); (b) the layers whose
    change lowers sum_m mu[m] err[m], mu = 1 first (nearly every layer), then the models a choice left
    worse off weigh more (`_heavier`), up to SELECT_STEPS times until one leaves no model worse off; (c)
    every layer. Each candidate's strengths are solved by least squares; taken: the one with the lowest
    objective among those that leave no model above its error before. Errors before and after are computed
    the same way (from the summed accumulators), so rounding cannot pass for a change. Returns (take per layer, or None when no candidate qualified; its fits; its
    errors; the errors before; (errors, worse) of taking every layer)."""
    def errors(take):
        fits = [n if t else o for t, o, n in zip(take, old_fits, new_fits)]
        total_dd = sum(f.gram_dd for f in fits)
        total_cross = sum(f.cross for f in fits)
        lam_mix = D.solve_lambdas(total_dd, total_cross)
        return fits, D.squared_error(total_dd, total_cross, n_total, lam_mix) / n_total.clamp_min(1e-300)

    count = len(new_fits)
    before = errors([False] * count)[1]
    change = torch.stack([D.fit_error(n, lam) - D.fit_error(o, lam) for o, n in zip(old_fits, new_fits)])
    score = (change / n_total.clamp_min(1e-300)).sum(dim=1)
    greedy = [False] * count
    slack = torch.zeros(change.shape[1], dtype=torch.float64)
    for i in torch.argsort(score).tolist():
        if float(score[i]) >= 0:
            break
        if bool((slack + change[i] <= 0).all()):
            greedy[i] = True
            slack += change[i]
    chosen = []   # (b): reweight until a choice leaves no model worse off
    mu = torch.ones(change.shape[1], dtype=torch.float64)
    for _ in range(SELECT_STEPS):
        take = ((change * mu).sum(dim=1) < 0).tolist()
        rel = errors(take)[1]
        worse = _worse(rel, before)
        if not bool(worse.any()):
            chosen.append(take)
            break
        mu = _heavier(mu, worse, rel, before)
    best = None
    for take in chosen + [greedy, [True] * count]:   # every layer last: its errors are returned too
        fits, rel = errors(take)
        if any(take) and not bool(_worse(rel, before).any()):
            if best is None or _objective(rel, power) < _objective(best[2], power):
                best = (take, fits, rel)
    every = (rel, _worse(rel, before))
    if best is None:
        return None, None, rel, before, every
    return (*best, before, every)


def _strengths(total_dd, total_cross, fits) -> tuple[torch.Tensor, torch.Tensor]:
    """Every model's least-squares strengths from the accumulators, each LoRA rescaled so that
    max_m |lam[k,m]| = 1; the accumulators (the totals, in place, and every layer's fit) are rescaled to
    match. Returns (lam, scale): the caller multiplies LoRA k's factors by scale[k]."""
    lam, scale = D.normalize_components(D.solve_lambdas(total_dd, total_cross))
    scale64 = scale.double()
    for fit in fits:
        fit.gram_dd = fit.gram_dd * torch.outer(scale64, scale64)
        fit.cross = fit.cross * scale64[None, :]
    total_dd *= torch.outer(scale64, scale64)
    total_cross *= scale64[None, :]
    return lam, scale


def _objective(rel: torch.Tensor, power: float) -> float:
    """F = (mean_m e_m^power)^(1/power) of the models' relative errors (docs/hyper.md, step 4)."""
    return float(rel.pow(power).mean() ** (1.0 / power))


def _worse(rel: torch.Tensor, guard: torch.Tensor) -> torch.Tensor:
    """The models whose error is above their guard (beyond float rounding)."""
    return rel > guard * (1 + 1e-6) + 1e-12


def _heavier(values: torch.Tensor, worse: torch.Tensor, rel: torch.Tensor, guard: torch.Tensor) -> torch.Tensor:
    """The models a rejected step left worse off weigh more: x 2 (e / e_guard)^4 (the ratio capped at 4)."""
    return torch.where(worse, values * 2 * (rel / guard).clamp_max(4.0) ** 4, values)


def _rounds(cfg, groups, lam, delta_sq, n_total, ticker, start: str, workers: int = 1) -> dict:
    """Rounds on the cores from one start (lam, and the groups' factors if set). A round is kept only if it
    lowers the objective (mean_m e_m^power)^(1/power) and leaves no model worse off than after the first
    round; otherwise the state goes back and the models it left worse off weigh more. Returns the best state.
    (Guarding a greedy start by its own state, before the first round, was tried: on `spectral` (shrunk) the
    rounds then stalled at a mean error of 0.096 where they reach 0.073.)"""
    m_count, k_count = n_total.shape[0], lam.shape[0]
    weights = D.irls_weights(torch.ones(m_count), n_total, 1.0)
    best, step, rejected, history = None, 0.5, 0, []
    duals = torch.ones(m_count, dtype=torch.float64)
    core_total = sum(g.core_sq.sum(dim=0) for g in groups)
    for round_index in range(cfg.iterations):
        total_dd = torch.zeros(k_count, k_count, dtype=torch.float64)
        total_cross = torch.zeros(m_count, k_count, dtype=torch.float64)
        fits: list = [None] * len(delta_sq)
        for group in groups:
            gram_dd, cross = D.fit_cores(group, lam, weights, workers)
            for t, i in enumerate(group.index):
                fits[i] = D.LayerFit(gram_dd[t], cross[t], delta_sq[i], group.core_sq[t])
            total_dd += gram_dd.sum(dim=0)
            total_cross += cross.sum(dim=0)
        lam, scale = _strengths(total_dd, total_cross, fits)
        for group in groups:  # X_k *= scale_k keeps lam_k * X_k unchanged
            group.factors = [(u * float(scale[k]), v) for k, (u, v) in enumerate(group.factors)]
        loss = D.squared_error(total_dd, total_cross, n_total, lam, core_total)
        rel = loss / n_total.clamp_min(1e-300)
        objective = _objective(rel, cfg.power)
        guard = rel if best is None else best["guard"]
        worse = _worse(rel, guard)
        accepted = best is None or (objective < best["objective"] and not bool(worse.any()))
        ticker(f"round {round_index + 1}/{cfg.iterations} ({start} start)")
        if accepted:
            gain = 1.0 if best is None else (best["objective"] - objective) / max(best["objective"], 1e-300)
            history.append({"round": round_index + 1, "relative_error": rel.tolist(),
                            "mean_relative_error": float(rel.mean()), "objective": objective})
            best = {"objective": objective, "lam": lam.clone(), "weights": weights, "rel": rel, "guard": guard,
                    "factors": [list(g.factors) for g in groups], "fits": fits, "start": start}
            if round_index > 0 and gain < cfg.tol:
                break
        else:  # back to the best state; the models it left worse off weigh more, the step is smaller
            rejected += 1
            lam = best["lam"].clone()
            for group, f in zip(groups, best["factors"]):
                group.factors = list(f)
            duals = _heavier(duals, worse, rel, guard)
            step /= 2
            if step < 0.03:
                break
        # damped IRLS step: geometric interpolation toward the weights of the best state's errors
        target = D.irls_weights(best["rel"], n_total, cfg.power) * duals
        weights = best["weights"] ** (1 - step) * target ** step
        weights = weights / weights.mean()
    history[-1]["rejected_rounds"] = rejected
    best["rounds"] = history
    return best


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
            **base_model_metadata(arch),  # from the architecture data
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
        err = float(sum(D.fit_error(f, lam)[m] for f in fits))
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
            b_err = sum(float(D.fit_error(fits[i], lam)[m]) for i in idx)
            row["per_block"][block] = b_err / b_sq if b_sq else 0.0
        per_model.append(row)
    total_sq = sum(float(f.delta_sq.sum()) for f in fits)
    # LoRA k's share of the difference: sum_m lam[k,m] <dW_m, D_k> / sum_m |dW_m|^2. The shares add up to
    # sum_m <dW_m, W_hat_m> / total = 1 - the mean error (least-squares strengths leave the residual orthogonal
    # to the fit), whether or not the LoRAs are orthogonal to each other (|lam_k D_k|^2 alone can exceed 1).
    energy = []
    for k in range(len(ranks)):
        captured = sum(float((lam[k].double() * f.cross[:, k].double()).sum()) for f in fits)
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
    auto = report.get("auto_ranks")
    if auto:
        goal = (f"budget {auto['budget_bytes'] / 1e6:.0f} MB" if auto["mode"] == "budget"
                else f"target mean error {auto['target']}")
        lines.append(f"ranks auto ({goal}): {auto['loras']} LoRAs, ranks {auto['ranks']} "
                     f"(the models span {auto['directions_spanned']} directions), estimated mean error "
                     f"{auto['estimated_mean_error']:.4f}, LoRA files {auto['lora_bytes'] / 1e6:.1f} MB"
                     + ("" if auto["met"] else " - NOT met") + (f"; {auto['warning']}" if "warning" in auto else ""))
    if report.get("note"):
        lines.append("note: " + report["note"])
    return "\n".join(lines)

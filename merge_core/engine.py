"""The streaming merge engine: open -> plan -> execute (read, compute, write) -> commit.

Each output key is one task: read that key from every input (zero-copy views
of the files, no whole model in memory), merge on the chosen device in
float32/float64, cast to the output dtype, write it at its place in the output
(sinks.py). A small thread pool overlaps reading, computing and writing of
neighbouring keys; at most `2 x threads` tasks are queued and `threads` run,
which bounds peak memory to about threads x (inputs + 1) x the largest tensor.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import keyparams, registry
from .methods import FP8_DTYPES, cast_saturating
from .registry import Bound, Method
from .edits import apply_edits
from .lora.format import describe_lora
from .errors import BadCheckpoint, DeviceUnavailable, MergeCancelled, MergeError, NonFiniteOutput, OutputExists
from .io.hashing import file_sha256
from .io.atomic import make_parents, remove_created, sweep_stale
from .io.sources import ModelSource, open_model
from .plan import OUTPUT_DTYPES, KeyTask, MergePlan, build_plan
from .recipe import build_metadata
from .sinks import Sink, check_output_against_inputs, check_output_name

ProgressCallback = Callable[[int, int, str], "bool | None"]


@dataclass
class MergeResult:
    path: Path | None
    state_dict: dict[str, torch.Tensor] | None
    architecture: str
    metadata: dict[str, str]
    recipe: dict
    summary: dict = field(default_factory=dict)


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def resolve_device(device: str | torch.device) -> torch.device:
    name = str(device).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise DeviceUnavailable(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {name!r} was requested but CUDA is not available (torch {torch.__version__}); "
            f"use --device cpu, or --device auto to fall back to the CPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type in ("mps", "xpu") and not getattr(torch, dev.type).is_available():
        raise DeviceUnavailable(f"device {name!r} is not available here; use cpu or auto")
    return dev


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _first_nonfinite_input(task: KeyTask, models: Sequence[ModelSource], base: ModelSource | None) -> str | None:
    for i in task.sources:
        if not bool(torch.isfinite(models[i].load(task.key).float()).all()):
            return models[i].name
    if task.use_base and base is not None and not bool(torch.isfinite(base.load(task.key).float()).all()):
        return base.name
    return None


def _all_finite(tensor: torch.Tensor) -> bool:
    """True if no NaN/Inf. aminmax is one fast vectorised pass (NaN propagates into both results)
    and allocates nothing like the boolean mask of torch.isfinite(tensor)."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype in FP8_DTYPES:  # no fp8 kernels for aminmax: check it in float32 pieces
        flat = tensor.reshape(-1)
        step = 1 << 22
        return all(_all_finite(flat[i:i + step].float()) for i in range(0, flat.numel(), step))
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _run_task(task: KeyTask, models: Sequence[ModelSource], base: ModelSource | None, config: Bound,
              device: torch.device, out_buffer: torch.Tensor | None = None, values: dict | None = None,
              saturated: list | None = None) -> torch.Tensor:
    out_dtype = task.out_spec.dtype
    if task.action == "copy":
        tensor = models[task.sources[0]].load(task.source_key or task.key)
        out = cast_saturating(tensor, out_dtype, saturated) if tensor.is_floating_point() else tensor
    else:
        tensors = [models[i].load(task.key).to(device) for i in task.sources]
        kw = dict(values=values, key=task.key, saturated=saturated)
        if task.partial_dim is not None:
            dim, common = task.partial_dim, task.common
            merged = config.merge_tensors([t.narrow(dim, 0, common) for t in tensors], None, out_dtype, **kw)
            out = cast_saturating(tensors[task.extra_from], out_dtype, saturated).clone()
            out.narrow(dim, 0, common).copy_(merged)
        else:
            base_tensor = base.load(task.key).to(device) if task.use_base else None
            in_place = out_buffer if device.type == "cpu" else None
            out = config.merge_tensors(tensors, base_tensor, out_dtype, out=in_place, **kw)
    if out.is_floating_point() and not _all_finite(out):
        culprit = _first_nonfinite_input(task, models, base)
        if culprit:
            raise BadCheckpoint(f"{culprit}: tensor {task.key!r} contains NaN or Inf")
        raise NonFiniteOutput(f"merged tensor {task.key!r} is not finite (it overflows {out_dtype}); "
                              f"choose fp32 as the output dtype")
    return out.cpu() if out.device.type != "cpu" else out


@torch.no_grad()  # hosts hand in nn.Parameters; merging never needs autograd (grad mode is per thread)
def _run_and_store(task: KeyTask, models, base, config, device, sink: Sink, values=None,
                   saturated: dict | None = None) -> None:
    try:
        out_buffer = sink.buffer(task.key) if task.action == "merge" else None
        counts: list[int] = []
        out = _run_task(task, models, base, config, device, out_buffer, values, counts)
        if counts and saturated is not None and sum(counts):
            saturated[task.key] = sum(counts)
        sink.put(task.key, out, owned=task.action == "merge")
    finally:
        for src in list(models) + ([base] if base is not None else []):
            if task.key in src:
                src.release(task.key)
        if task.source_key is not None:
            models[task.sources[0]].release(task.source_key)


class _IntraOpThreads:
    """Split the CPU between our worker threads and torch's own intra-op threads.

    Each worker calling into torch would otherwise start a full OpenMP team,
    oversubscribing the cores (measured: ~25% slower on 2 cores).
    """

    def __init__(self, device: torch.device, workers: int):
        self.wanted = max(1, torch.get_num_threads() // workers) if device.type == "cpu" else None
        self.saved = torch.get_num_threads()

    def __enter__(self):
        if self.wanted is not None and self.wanted != self.saved:
            torch.set_num_threads(self.wanted)
        return self

    def __exit__(self, *exc):
        if self.wanted is not None and self.wanted != self.saved:
            torch.set_num_threads(self.saved)


def _execute(plan: MergePlan, models, base, config, device, sink: Sink, threads: int,
             progress: ProgressCallback | None, per_key: dict | None = None, saturated: dict | None = None) -> None:
    with _IntraOpThreads(device, threads):
        _execute_tasks(plan, models, base, config, device, sink, threads, progress, per_key or {}, saturated)


def _execute_tasks(plan: MergePlan, models, base, config, device, sink: Sink, threads: int,
                   progress: ProgressCallback | None, per_key: dict, saturated: dict | None) -> None:
    total = len(plan.tasks)
    tasks = iter(plan.tasks)
    done = 0
    max_in_flight = max(1, 2 * threads)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
        pending: dict[Future, str] = {}

        def submit_next() -> bool:
            task = next(tasks, None)
            if task is None:
                return False
            fut = pool.submit(_run_and_store, task, models, base, config, device, sink, per_key.get(task.key),
                              saturated)
            pending[fut] = task.key
            return True

        try:
            while len(pending) < max_in_flight and submit_next():
                pass
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    key = pending.pop(fut)
                    fut.result()  # re-raises a task's error
                    done += 1
                    if progress is not None and progress(done, total, key) is False:
                        raise MergeCancelled("merge cancelled; nothing was written")
                    submit_next()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _hash_sources(sources: Sequence[ModelSource], results: dict, enabled: bool) -> threading.Thread | None:
    files = [s for s in sources if s is not None and s.path is not None and Path(s.path).is_file()]
    if not enabled or not files:
        return None

    def work():
        for src in files:
            try:
                results[src.name] = file_sha256(src.path)
            except OSError:
                results[src.name] = None

    thread = threading.Thread(target=work, name="merge-hash", daemon=True)
    thread.start()
    return thread


LEGACY_PARAMS = ("weights", "t", "alpha", "multiplier", "karcher_iter", "karcher_tol")


def method_values(method: str, params: Mapping | None = None, **legacy) -> tuple[Method, dict]:
    """The registry entry for `method` and the parameter values given for it (the engine's older keyword
    arguments included); a value for a parameter the method does not have is an error, never ignored."""
    entry = registry.get(method)
    values = dict(params or {})
    for name, value in legacy.items():
        if value is None:
            continue
        if name == "weights" and not any(p.name == "weights" for p in entry.params):
            raise MergeError(f"weights do not apply to {entry.name}; it takes "
                             f"{', '.join(p.flag for p in entry.params) or 'no parameters'}")
        values[name] = value
    for name in values:
        if not any(p.name == name for p in entry.params):
            flag = "--" + name.replace("_", "-")
            takes = ", ".join(p.flag for p in entry.params) or "no parameters"
            raise MergeError(f"{flag} does not apply to {entry.name} (it takes {takes})")
    return entry, values


def _abs_path(source: ModelSource) -> str | None:
    """Where an input lives, for the runnable recipe (None for an in-memory state dict)."""
    return os.path.abspath(source.path) if source.path is not None else None


def refuse_loras(sources: Sequence[ModelSource]) -> None:
    """A LoRA is not a checkpoint: merging one with checkpoints is an error, --force or not (it would
    silently copy the first model)."""
    for src in sources:
        info = describe_lora(src.specs())
        if info is not None:
            raise BadCheckpoint(f"{src.name}: is a {info['kind']} ({info['modules']} modules, rank "
                                f"{'/'.join(map(str, info['ranks'])) or '?'}), not a checkpoint; load it as a LoRA "
                                f"in your UI, or merge it into a checkpoint with a LoRA tool")


def check_threads(threads) -> int:
    if threads in (None, 0):
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256:
        raise MergeError(f"threads must be a whole number from 1 to 256 (or 0 for automatic), got {threads!r}")
    return threads


def merge(models: Sequence, method: str, *, output=None, weights: Sequence[float] | None = None,
          t: float | None = None, alpha: float | None = None, multiplier: float | None = None, base=None,
          device="cpu", dtype: str = "auto", precision: str = "fp32", karcher_iter: int | None = None,
          karcher_tol: float | None = None, threads: int | None = None, strict: bool = False,
          force: bool = False, overwrite: bool = False, copy_extra_files: bool = False,
          progress: ProgressCallback | None = None, names: Sequence[str] | None = None, output_device="cpu",
          hash_inputs: bool = True, max_shard_bytes: int = 5 * 1024 ** 3, params: Mapping | None = None,
          blocks=None, overrides: Sequence[tuple[str, float]] = (), vae=None, discard: str | None = None,
          drop_ema: bool = False, block_architecture: str | None = None) -> MergeResult:
    """Merge `models` (paths, state dicts or ModelSources) with `method`; see docs/API.md.

    `params` holds the method's parameters by name (see `registry`); the keyword arguments weights, t,
    alpha, multiplier, karcher_iter and karcher_tol are the same by their older names. `blocks` and
    `overrides` make the method's block parameter vary per block / per key (keyparams.py). `vae` (a VAE
    file) is baked in, keys matching the regex `discard` and (with `drop_ema`) EMA weights are left out
    (edits.py). `block_architecture` names the architecture whose blocks `blocks` refers to, for inputs
    that cannot be detected from their keys alone (a host's bare UNet or text-encoder state dict)."""
    started = time.perf_counter()
    if dtype not in OUTPUT_DTYPES:
        raise MergeError(f"unknown output dtype {dtype!r} ({', '.join(OUTPUT_DTYPES)})")
    entry, values = method_values(method, params, weights=weights, t=t, alpha=alpha, multiplier=multiplier,
                                  karcher_iter=karcher_iter, karcher_tol=karcher_tol)
    method = entry.name
    if base is not None and not entry.takes_base:
        raise MergeError(f"a base model only applies to {' and '.join(registry.base_methods())}, not {method}")
    if base is None and entry.requires_base:
        raise MergeError(f"{method} merges task vectors and needs a base: give the model they were fine-tuned from "
                         f"(--base)")
    config = entry.bind(len(models), values, precision)
    threads = check_threads(threads)
    dev = resolve_device(device)
    out_dev = resolve_device(output_device)
    output_path = Path(output) if output is not None else None
    check_output_name(output_path, overwrite)

    sources: list[ModelSource] = []
    base_source = None
    stale = []
    created_dirs: list[Path] = []
    vae_source = None
    saturated: dict[str, int] = {}
    try:
        for i, model in enumerate(models):
            name = names[i] if names is not None else (None if not isinstance(model, Mapping) else f"model{i + 1}")
            sources.append(open_model(model, name))
        if base is not None:
            base_source = open_model(base, "base" if isinstance(base, Mapping) else None)
        all_sources = sources + ([base_source] if base_source else [])
        input_paths = [Path(s.path) for s in all_sources if s.path is not None]
        check_output_against_inputs(output_path, all_sources, overwrite)
        refuse_loras(all_sources)
        plan = build_plan(sources, base_source, dtype=dtype, strict=strict, force=force)
        vae_source = open_model(vae) if vae is not None else None
        if vae_source is not None:
            all_sources.append(vae_source)
        plan, edit_report = apply_edits(plan, len(sources), vae_source, discard, drop_ema)
        run_sources = sources + ([vae_source] if vae_source is not None else [])
        key_values = keyparams.resolve(config, [t.key for t in plan.tasks if t.action == "merge"],
                                       block_architecture or plan.architecture, blocks, overrides)
        hashes: dict[str, str | None] = {}
        hash_files = hash_inputs and output_path is not None
        hasher = _hash_sources(sources + [base_source], hashes, hash_files)

        def metadata_with(digests: Mapping[str, str | None]) -> dict[str, str]:
            return build_metadata(
                method=method, params={**config.recipe_params(), **key_values.recipe}, names=[s.name for s in sources],
                hashes=[digests.get(s.name) for s in sources], coefficients=config.reported_weights(),
                base_name=base_source.name if base_source else None,
                base_hash=digests.get(base_source.name) if base_source else None,
                architecture=plan.architecture, output_dtype=dtype,
                paths=[_abs_path(s) for s in sources], base_path=_abs_path(base_source) if base_source else None,
                options={"strict": strict, "force": force})

        # The header is sized now, with every hash as long as a real one: it can only shrink at commit.
        placeholder = {s.name: f"{i:064x}" for i, s in enumerate(all_sources)} if hash_files else {}
        if output_path is not None:
            created_dirs = make_parents(output_path)
            stale = sweep_stale(output_path.parent)
        sink = Sink(output_path, plan.out_specs(), overwrite, out_dev, max_shard_bytes, inputs=input_paths,
                    metadata=metadata_with(placeholder))
        try:
            sink.__enter__()
            _execute(plan, run_sources, base_source, config, dev, sink, threads, progress, key_values.per_key,
                     saturated)
            if hasher is not None:
                hasher.join()
            metadata = metadata_with(hashes)
            sink.set_metadata(metadata)
            from .lm import output_files  # config/tokenizer for a loadable folder; --copy-extra-files
            extra_files = output_files(
                [s.name for s in sources], [s.path for s in sources], plan.lm, output=output_path,
                copy_all=copy_extra_files, vocab_from=plan.vocab_from, vocab_rows=plan.vocab_rows,
                has_lm_head=(any(k.endswith("lm_head.weight") for k in plan.out_specs()) if plan.lm and plan.lm[0]
                             else None), dtype=dtype)
            sink.commit(extra_files)
        except BaseException:
            sink.abort()
            remove_created(created_dirs)
            raise
    finally:
        for src in sources + [s for s in (base_source, vae_source) if s is not None]:
            src.close()

    summary = {
        "keys": len(plan.tasks),
        "merged": sum(1 for t in plan.tasks if t.action == "merge"),
        "copied": sum(1 for t in plan.tasks if t.action == "copy"),
        "missing_keys": plan.missing,
        "partial_shape_keys": plan.partial,
        "forced_copies": plan.forced_copies,
        "keys_without_base": plan.no_base,
        "architectures": plan.architectures,
        "stale_temp_files": [entry.describe() for entry in stale],
        "per_key_values": len(key_values.per_key),
        "override_matches": key_values.override_counts,
        "saturated": saturated,
        "discarded": edit_report.discarded,
        "dropped_ema": edit_report.dropped_ema,
        "baked_vae": {"file": edit_report.vae_name, "keys": edit_report.vae_keys} if edit_report.vae_name else None,
        "lm_families": [info.describe() if info is not None else None for info in plan.lm] if any(plan.lm) else [],
        "extra_files": [f.describe() for f in (extra_files or ()) if f.name in sink.copied_files],
        "extra_files_skipped": list(getattr(sink, "skipped_files", [])),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return MergeResult(path=output_path, state_dict=sink.state_dict, architecture=plan.architecture,
                       metadata=metadata, recipe=json.loads(metadata["manifold_merge_recipe"]), summary=summary)

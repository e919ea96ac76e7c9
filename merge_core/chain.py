"""Recipes and chains: several merge steps over inputs and earlier steps, run key by key in one pass.

A recipe (YAML or JSON, docs/recipes.md) names its inputs, its steps (each a registry method over inputs
and/or earlier steps, with its parameters, block weights and overrides) and the step whose result is
written. Example::

    inputs: {a: a.safetensors, b: b.safetensors, c: c.safetensors, base: sd15.safetensors}
    steps:
      k:   {method: karcher, models: [a, b], base: base}
      out: {method: slerp, models: [k, c], t: 0.3}
    output: out.safetensors

A recipe without `steps` is one step over every input (`method`, `parameters`, `base`): the form every
merge output embeds (recipe.py), so `python -m merge_core recipe OUT` prints a runnable file.

Execution (`run_recipe`): everything is validated first (method and parameters via `Method.bind`, every
step's plan via `plan.build_plan` on headers only, block specs and overrides via `keyparams.resolve`, the
inputs' hashes when the recipe records them). Then the final step runs through the engine's own executor
(`engine._execute`: thread pool, progress/cancel, the output sink). Each earlier step is a `StepSource`:
a model source whose `load(key)` computes that step's tensor for that key (recursively, from its own
sources) and keeps it only until every step that consumes it has used it for that key (or the key is
done), so no intermediate file is written and memory stays at a few tensors per input per key in flight.
Intermediate results are kept in the step's compute precision (float32; float64 with precision fp64)
unless the step names a `dtype`, so a chain equals the same merges run through float32 files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from . import keyparams, registry
from .errors import MergeError
from .inputs import read_data_file
from .io.hashing import file_sha256
from .io.sources import ModelSource, open_model
from .io.spec import TensorSpec
from .plan import OUTPUT_DTYPES, build_plan

TOP_KEYS = {"inputs", "steps", "result", "output", "method", "parameters", "base", "output_dtype", "dtype",
            "precision", "options", "strict", "force"}
INFO_KEYS = {"tool", "version", "versions", "format", "architecture"}  # written by us; ignored when run
STEP_KEYS = {"name", "method", "models", "base", "parameters", "blocks", "overrides", "dtype", "precision"}
KEYPARAM_RECORD = ("block_parameter", "architecture")  # written by keyparams into the parameters; not inputs


# ---------------------------------------------------------------- the recipe, parsed

@dataclass
class InputSpec:
    name: str
    path: Path
    sha256: str | None = None


@dataclass
class StepSpec:
    name: str
    method: str
    models: list[str]
    base: str | None = None
    params: dict = field(default_factory=dict)
    precision: str = "fp32"
    blocks: Any = None
    overrides: list = field(default_factory=list)
    dtype: str | None = None


@dataclass
class Recipe:
    inputs: list[InputSpec]
    steps: list[StepSpec]
    result: str
    output: Path | None = None
    dtype: str = "auto"
    strict: bool = False
    force: bool = False
    one_step: bool = False      # written in the one-step form (a plain merge's recipe)
    source: str = "recipe"      # where it came from, for messages


def _where(source: str) -> str:
    return f"recipe {source}"


def _load_text(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        return embedded_recipe(path)
    data = read_data_file(path, "recipe")
    if not isinstance(data, Mapping):
        raise MergeError(f"recipe {path}: expected a mapping with inputs and steps, got {type(data).__name__}")
    return dict(data)


def embedded_recipe(path) -> dict:
    """The recipe a merge output carries in its metadata (`manifold_merge_recipe`)."""
    path = Path(path)
    with open_model(path) as src:
        raw = (src.metadata or {}).get("manifold_merge_recipe")
    if not raw:
        raise MergeError(f"{path}: holds no Manifold Merge recipe (no manifold_merge_recipe in its metadata)")
    try:
        data = json.loads(raw)
    except ValueError:
        raise MergeError(f"{path}: its manifold_merge_recipe metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: its manifold_merge_recipe metadata is not a recipe")
    return data


def _resolve_path(raw, base_dir: Path, what: str) -> Path:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise MergeError(f"{what} has no path (a recipe written from in-memory models cannot be re-run as it "
                         f"is: give the file's path)")
    if not isinstance(raw, (str, os.PathLike)):
        raise MergeError(f"{what}: path must be text, got {raw!r}")
    p = Path(os.path.expanduser(str(raw)))
    return p if p.is_absolute() else base_dir / p


def _input_entry(name, raw, base_dir: Path, source: str) -> InputSpec:
    if isinstance(raw, (str, os.PathLike)):
        return InputSpec(str(name), _resolve_path(raw, base_dir, f"{_where(source)}: input {name!r}"))
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"name", "path", "sha256"}
        if unknown:
            raise MergeError(f"{_where(source)}: input {name!r} has unknown field {sorted(unknown)[0]!r} "
                             f"(fields: path, sha256)")
        sha = raw.get("sha256")
        if sha is not None and not isinstance(sha, str):
            raise MergeError(f"{_where(source)}: input {name!r}: sha256 must be text")
        return InputSpec(str(name), _resolve_path(raw.get("path"), base_dir, f"{_where(source)}: input {name!r}"),
                         sha or None)
    raise MergeError(f"{_where(source)}: input {name!r} must be a path or {{path, sha256}}, got {raw!r}")


def _parse_inputs(raw, base_dir: Path, source: str) -> list[InputSpec]:
    entries: list[InputSpec] = []
    if isinstance(raw, Mapping):
        entries = [_input_entry(name, value, base_dir, source) for name, value in raw.items()]
    elif isinstance(raw, (list, tuple)):
        for item in raw:
            if isinstance(item, Mapping):
                name = item.get("name") or (Path(str(item.get("path"))).name if item.get("path") else None)
                if not name:
                    raise MergeError(f"{_where(source)}: an input has neither name nor path")
                entries.append(_input_entry(name, {k: v for k, v in item.items() if k != "name"}, base_dir, source))
            else:
                entries.append(_input_entry(Path(str(item)).name, item, base_dir, source))
    else:
        raise MergeError(f"{_where(source)}: `inputs` must be a mapping name -> path (or a list), got {raw!r}")
    if not entries:
        raise MergeError(f"{_where(source)}: no inputs")
    return entries


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}#{i}", i + 1
    return candidate


def _overrides(raw, what: str) -> list[tuple[str, float]]:
    from .blocks import parse_override
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        return [(str(k), v) for k, v in raw.items()]
    if isinstance(raw, (list, tuple)):
        out = []
        for item in raw:
            if isinstance(item, str):
                out.append(parse_override(item, what=what))
            elif isinstance(item, Mapping) and "pattern" in item and "value" in item:
                out.append((str(item["pattern"]), item["value"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((str(item[0]), item[1]))
            else:
                raise MergeError(f"{what}: {item!r} is not PATTERN=VALUE or {{pattern, value}}")
        return out
    if isinstance(raw, str):
        return [parse_override(raw, what=what)]
    raise MergeError(f"{what}: expected a list of PATTERN=VALUE, got {raw!r}")


def _parse_step(name: str, raw, default_precision: str, source: str) -> StepSpec:
    what = f"{_where(source)}: step {name!r}"
    if not isinstance(raw, Mapping):
        raise MergeError(f"{what} must be a mapping with a method and its models, got {raw!r}")
    if "method" not in raw:
        raise MergeError(f"{what} has no method")
    params = raw.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeError(f"{what}: parameters must be a mapping, got {params!r}")
    params = dict(params)
    for key, value in raw.items():  # parameters may also be written inline: {method: slerp, t: 0.3}
        if key not in STEP_KEYS:
            if key in params:
                raise MergeError(f"{what}: parameter {key!r} given twice")
            params[key] = value
    precision = params.pop("precision", None) or raw.get("precision") or default_precision
    blocks = raw.get("blocks", params.pop("blocks", None))
    params.pop("blocks", None)
    overrides = _overrides(raw.get("overrides", params.pop("overrides", None)), f"{what}: overrides")
    params.pop("overrides", None)
    for key in KEYPARAM_RECORD:
        params.pop(key, None)
    models = raw.get("models")
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, (list, tuple)) or not models or not all(isinstance(m, str) for m in models):
        raise MergeError(f"{what}: models must be a list of input or step names, got {models!r}")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise MergeError(f"{what}: base must be an input or step name, got {base!r}")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise MergeError(f"{what}: unknown dtype {dtype!r} ({', '.join(OUTPUT_DTYPES)})")
    return StepSpec(name=str(name), method=str(raw["method"]), models=list(models), base=base, params=params,
                    precision=str(precision), blocks=blocks, overrides=overrides, dtype=dtype)


def parse_recipe(data: Mapping, base_dir=None, source: str = "recipe") -> Recipe:
    """A recipe mapping (as read from YAML/JSON, or a merge output's embedded recipe) -> Recipe.
    Relative paths are taken from `base_dir` (the recipe file's folder; default: the current folder)."""
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    data = dict(data)
    unknown = set(data) - TOP_KEYS - INFO_KEYS
    if unknown:
        raise MergeError(f"{_where(source)}: unknown field {sorted(unknown)[0]!r} (fields: "
                         f"{', '.join(sorted(TOP_KEYS))})")
    if "inputs" not in data:
        raise MergeError(f"{_where(source)}: no inputs")
    options = data.get("options") or {}
    if not isinstance(options, Mapping) or set(options) - {"strict", "force"}:
        raise MergeError(f"{_where(source)}: options may hold strict and force, got {options!r}")
    strict = bool(data.get("strict", options.get("strict", False)))
    force = bool(data.get("force", options.get("force", False)))
    dtype = data.get("output_dtype", data.get("dtype")) or "auto"
    if dtype not in OUTPUT_DTYPES:
        raise MergeError(f"{_where(source)}: unknown output dtype {dtype!r} ({', '.join(OUTPUT_DTYPES)})")
    precision = data.get("precision") or "fp32"
    inputs = _parse_inputs(data["inputs"], base_dir, source)
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        if isinstance(data["inputs"], Mapping) or "steps" in data:
            raise MergeError(f"{_where(source)}: two inputs are named {dup!r}")
        taken: set[str] = set()  # a plain merge of two files with one name (different folders)
        for entry in inputs:
            entry.name = _unique(entry.name, taken)
            taken.add(entry.name)
    output = data.get("output")
    output = _resolve_path(output, base_dir, f"{_where(source)}: output") if output else None
    if "steps" in data:
        if "method" in data or "parameters" in data or "base" in data:
            raise MergeError(f"{_where(source)}: give either steps, or method/parameters/base for one step, "
                             f"not both")
        raw_steps = data["steps"]
        if isinstance(raw_steps, Mapping):
            items = list(raw_steps.items())
        elif isinstance(raw_steps, (list, tuple)):
            items = []
            for i, s in enumerate(raw_steps):
                if not isinstance(s, Mapping) or not s.get("name"):
                    raise MergeError(f"{_where(source)}: step {i + 1} has no name")
                items.append((s["name"], s))
        else:
            raise MergeError(f"{_where(source)}: steps must be a mapping name -> step, got {raw_steps!r}")
        if not items:
            raise MergeError(f"{_where(source)}: no steps")
        steps = [_parse_step(str(name), raw, precision, source) for name, raw in items]
        recipe = Recipe(inputs, steps, str(data.get("result") or steps[-1].name), output, dtype, strict, force,
                        source=source)
    else:
        if "method" not in data:
            raise MergeError(f"{_where(source)}: no steps and no method")
        base = data.get("base")
        base_name = None
        if isinstance(base, str) and base in names:
            base_name = base
        elif base is not None:
            taken = set(i.name for i in inputs)
            raw = base if isinstance(base, Mapping) else {"path": base}
            entry_name = _unique(str(raw.get("name") or Path(str(raw.get("path"))).name), taken)
            inputs.append(_input_entry(entry_name, {k: v for k, v in raw.items() if k != "name"}, base_dir, source))
            base_name = entry_name
        step = {"method": data["method"], "models": [i.name for i in inputs if i.name != base_name],
                "base": base_name, "parameters": data.get("parameters") or {}}
        recipe = Recipe(inputs, [_parse_step("merge", step, precision, source)], "merge", output, dtype, strict,
                        force, one_step=True, source=source)
    return recipe


def load_recipe(recipe, base_dir=None) -> Recipe:
    """A Recipe from a path (YAML / JSON recipe file, or a merge output carrying one), a mapping, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, base_dir, "(mapping)")
    path = Path(recipe)
    data = _load_text(path)
    return parse_recipe(data, base_dir if base_dir is not None else path.resolve().parent, str(path))


# ---------------------------------------------------------------- validation (nothing read but headers)

@dataclass
class BoundStep:
    spec: StepSpec
    method: registry.Method
    bound: registry.Bound


def bind_steps(recipe: Recipe) -> list[BoundStep]:
    """Every step's method and parameters checked (`Method.bind`), every reference resolved, before any
    file is opened."""
    inputs = {i.name for i in recipe.inputs}
    seen: set[str] = set()
    bound_steps = []
    from .engine import method_values
    for step in recipe.steps:
        what = f"{_where(recipe.source)}: step {step.name!r}"
        if step.name in inputs:
            raise MergeError(f"{what}: the name is also an input's; names must be unique")
        if step.name in seen:
            raise MergeError(f"{_where(recipe.source)}: two steps are named {step.name!r}")
        for ref in step.models + ([step.base] if step.base else []):
            if ref not in inputs and ref not in seen:
                later = any(s.name == ref for s in recipe.steps)
                raise MergeError(f"{what} uses {ref!r}, which is " + (
                    "a later step (a step can use inputs and earlier steps)" if later else
                    f"neither an input nor a step (inputs: {', '.join(sorted(inputs))})"))
        try:
            entry, values = method_values(step.method, step.params)
            if step.base is not None and not entry.takes_base:
                raise MergeError(f"a base model only applies to {' and '.join(registry.base_methods())}, "
                                 f"not {entry.name}")
            if step.base is None and entry.requires_base:
                raise MergeError(f"method {entry.name} merges task vectors and needs a base (`base:`)")
            bound = entry.bind(len(step.models), values, step.precision)
        except MergeError as exc:
            raise MergeError(f"{what}: {exc}") from None
        bound_steps.append(BoundStep(step, entry, bound))
        seen.add(step.name)
    if recipe.result not in seen:
        raise MergeError(f"{_where(recipe.source)}: result {recipe.result!r} is not a step")
    used = {recipe.result}
    for step in reversed(recipe.steps):
        if step.name in used:
            used.update(step.models + ([step.base] if step.base else []))
    unused = [s.name for s in recipe.steps if s.name not in used] + [i.name for i in recipe.inputs
                                                                    if i.name not in used]
    if unused:
        raise MergeError(f"{_where(recipe.source)}: {unused[0]!r} is not used by the result {recipe.result!r} "
                         f"(remove it, or name the step to write with `result:`)")
    return bound_steps


def check_hashes(recipe: Recipe, ignore: bool = False) -> list[str]:
    """Each input whose sha256 the recipe records must still have it (one hashing pass per new file; the
    hashes are cached by path, size and mtime). Returns warnings when `ignore`."""
    warnings = []
    for entry in recipe.inputs:
        if not entry.sha256 or not entry.path.is_file():
            continue
        actual = file_sha256(entry.path)
        if actual[:len(entry.sha256)].lower() != entry.sha256.lower():
            message = (f"{entry.path}: its sha256 starts {actual[:len(entry.sha256)]}, but the recipe records "
                       f"{entry.sha256} for input {entry.name!r}: the file changed since the recipe was written")
            if not ignore:
                raise MergeError(message + " (--ignore-hashes to merge anyway)")
            warnings.append(message)
    return warnings


# ---------------------------------------------------------------- execution

class StepSource(ModelSource):
    """An earlier step seen as a model: `load(key)` computes the step's tensor for `key` on demand."""

    def __init__(self, step: BoundStep, plan, sources: list[ModelSource], base: ModelSource | None,
                 key_values, device: torch.device, saturated: dict):
        self.name = step.spec.name
        self.path = None
        self.metadata = {}
        self._specs = plan.out_specs()
        self._tasks = {t.key: t for t in plan.tasks}
        self._sources = sources
        self._base = base
        self._bound = step.bound
        self._per_key = key_values.per_key
        self._device = device
        # Carried between steps in the compute precision, unless the step names a dtype.
        self._carry = None if step.spec.dtype is not None else step.bound.compute_dtype
        self._saturated = saturated
        upstream = list(sources) + ([base] if base is not None else [])
        self._upstream = list({id(s): s for s in upstream}.values())
        self.consumers = 0
        self._cache: dict[str, torch.Tensor] = {}
        self._left: dict[str, int] = {}
        self._lock = threading.Lock()

    def load(self, key: str) -> torch.Tensor:
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        from .engine import _run_task
        task = self._tasks[key]
        if self._carry is not None and task.out_spec.is_float:
            task = dataclasses.replace(task, out_spec=TensorSpec(task.out_spec.shape, self._carry))
        counts: list[int] = []
        with torch.no_grad():
            out = _run_task(task, self._sources, self._base, self._bound, self._device, None,
                            self._per_key.get(key), counts)
        if counts and sum(counts):
            self._saturated[f"{self.name}: {key}"] = sum(counts)
        with self._lock:
            self._cache[key] = out
            self._left[key] = self.consumers
        for src in self._upstream:  # this step is done with its sources for this key
            if isinstance(src, StepSource):
                src.consumed(key)
        return out

    def consumed(self, key: str) -> None:
        """A consuming step has computed `key`: free it after the last consumer."""
        with self._lock:
            left = self._left.get(key)
            if left is None:
                return
            if left <= 1:
                self._cache.pop(key, None)
                self._left.pop(key, None)
            else:
                self._left[key] = left - 1

    def release(self, key: str) -> None:
        """The key is finished (the final step wrote it): drop what is left of it here and upstream."""
        with self._lock:
            self._cache.pop(key, None)
            self._left.pop(key, None)
        for src in self._upstream:
            if key in src:
                src.release(key)


def _canonical_step(step: BoundStep, key_values) -> dict:
    entry = {"name": step.spec.name, "method": step.method.name, "models": list(step.spec.models)}
    if step.spec.base is not None:
        entry["base"] = step.spec.base
    entry["parameters"] = {**step.bound.recipe_params(), **key_values.recipe}
    if step.spec.dtype is not None:
        entry["dtype"] = step.spec.dtype
    return entry


_UNSET = object()


def run_recipe(recipe, progress=None, *, output=_UNSET, overwrite: bool = False, ignore_hashes: bool = False,
               threads: int | None = None, device="cpu", output_device="cpu", hash_inputs: bool = True,
               base_dir=None, in_memory: bool = False, max_shard_bytes: int = 5 * 1024 ** 3):
    """Run a recipe (a path to a YAML/JSON recipe or to a merge output, a mapping, or a Recipe) and write
    its result to `output` (default: the recipe's `output`), or return it in memory (`in_memory=True`).

    `progress(done, total, key)` is called per output key (return False to cancel). Every step is checked
    before any tensor is read; inputs whose sha256 the recipe records are checked too (a changed file is an
    error naming it, unless `ignore_hashes`). Returns an engine.MergeResult; its summary has `warnings` and
    `steps`."""
    from .engine import MergeResult, check_threads, merge, resolve_device
    started = time.perf_counter()
    recipe = load_recipe(recipe, base_dir)
    steps = bind_steps(recipe)
    if in_memory:
        output_path = None
    else:
        output_path = Path(output) if output is not _UNSET and output is not None else recipe.output
        if output_path is None:
            raise MergeError(f"{_where(recipe.source)} names no output: give one (--output OUT)")
    threads = check_threads(threads)
    by_name = {i.name: i for i in recipe.inputs}
    if len(steps) == 1 and all(m in by_name for m in steps[0].spec.models):
        warnings = check_hashes(recipe, ignore_hashes)
        # One step over files: exactly a plain merge (and the same metadata, so a re-run is bit-identical).
        step = steps[0]
        result = merge([by_name[m].path for m in step.spec.models], step.method.name, output=output_path,
                       params=step.bound.values, base=by_name[step.spec.base].path if step.spec.base else None,
                       names=list(step.spec.models),
                       device=device, dtype=recipe.dtype, precision=step.spec.precision, threads=threads,
                       strict=recipe.strict, force=recipe.force, overwrite=overwrite, progress=progress,
                       output_device=output_device, hash_inputs=hash_inputs, max_shard_bytes=max_shard_bytes,
                       blocks=step.spec.blocks, overrides=step.spec.overrides)
        result.summary["warnings"] = warnings
        result.summary["steps"] = [step.spec.name]
        return result
    return _run_chain(recipe, steps, progress, output_path, overwrite, threads, resolve_device(device),
                      resolve_device(output_device), hash_inputs, max_shard_bytes, ignore_hashes, started,
                      MergeResult)


def _run_chain(recipe: Recipe, steps: list[BoundStep], progress, output_path: Path | None, overwrite: bool,
               threads: int, dev: torch.device, out_dev: torch.device, hash_inputs: bool, max_shard_bytes: int,
               ignore_hashes: bool, started: float, MergeResult):
    from .engine import _execute, _hash_sources
    from .io.atomic import sweep_stale
    from .recipe import build_chain_metadata
    from .sinks import Sink, check_output_against_inputs, check_output_name
    check_output_name(output_path, overwrite)
    files: dict[str, ModelSource] = {}
    saturated: dict[str, int] = {}
    stale = []
    try:
        for entry in recipe.inputs:
            files[entry.name] = open_model(entry.path, entry.name)
        nodes: dict[str, ModelSource] = dict(files)
        plans, key_values = {}, {}
        final = None
        for step in steps:
            spec = step.spec
            sources = [nodes[m] for m in spec.models]
            base = nodes[spec.base] if spec.base else None
            is_final = spec.name == recipe.result
            try:
                plan = build_plan(sources, base, dtype=recipe.dtype if is_final else (spec.dtype or "auto"),
                                  strict=recipe.strict, force=recipe.force)
                kv = keyparams.resolve(step.bound, [t.key for t in plan.tasks if t.action == "merge"],
                                       plan.architecture, spec.blocks, spec.overrides)
            except MergeError as exc:
                raise type(exc)(f"{_where(recipe.source)}: step {spec.name!r}: {exc}") from None
            plans[spec.name], key_values[spec.name] = plan, kv
            if is_final:
                final = (step, plan, sources, base, kv)
            else:
                nodes[spec.name] = StepSource(step, plan, sources, base, kv, dev, saturated)
        for step in steps:  # how many steps consume each step (for freeing intermediates per key)
            for ref in set(step.spec.models + ([step.spec.base] if step.spec.base else [])):
                if isinstance(nodes.get(ref), StepSource):
                    nodes[ref].consumers += 1
        step, plan, sources, base, kv = final
        warnings = check_hashes(recipe, ignore_hashes)  # after every plan: a wrong recipe fails without a read
        input_paths = [Path(s.path) for s in files.values() if s.path is not None]
        check_output_against_inputs(output_path, list(files.values()), overwrite)
        canonical = [_canonical_step(s, key_values[s.spec.name]) for s in steps]
        hashes: dict[str, str | None] = {}
        hash_files = hash_inputs and output_path is not None
        hasher = _hash_sources(list(files.values()), hashes, hash_files)
        input_entries = [{"name": e.name, "path": os.path.abspath(e.path)} for e in recipe.inputs]
        options = {"strict": recipe.strict, "force": recipe.force}

        def metadata_with(digests):
            return build_chain_metadata(inputs=input_entries, steps=canonical, result=recipe.result, hashes=digests,
                                        architecture=plan.architecture, output_dtype=recipe.dtype, options=options)

        placeholder = {name: f"{i:064x}" for i, name in enumerate(files)} if hash_files else {}
        if output_path is not None:
            stale = sweep_stale(output_path.parent)
        sink = Sink(output_path, plan.out_specs(), overwrite, out_dev, max_shard_bytes, inputs=input_paths,
                    metadata=metadata_with(placeholder))
        try:
            sink.__enter__()
            _execute(plan, sources, base, step.bound, dev, sink, threads, progress, kv.per_key, saturated)
            if hasher is not None:
                hasher.join()
            metadata = metadata_with(hashes)
            sink.set_metadata(metadata)
            sink.commit(None)
        except BaseException:
            sink.abort()
            raise
    finally:
        for src in files.values():
            src.close()
    summary = {
        "keys": len(plan.tasks),
        "merged": sum(1 for t in plan.tasks if t.action == "merge"),
        "copied": sum(1 for t in plan.tasks if t.action == "copy"),
        "missing_keys": {f"{name}: {k}": v for name, p in plans.items() for k, v in p.missing.items()},
        "partial_shape_keys": {f"{name}: {k}": v for name, p in plans.items() for k, v in p.partial.items()},
        "forced_copies": {f"{name}: {k}": v for name, p in plans.items() for k, v in p.forced_copies.items()},
        "keys_without_base": [f"{name}: {k}" for name, p in plans.items() for k in p.no_base],
        "architectures": plan.architectures,
        "stale_temp_files": [entry.describe() for entry in stale],
        "per_key_values": sum(len(kv.per_key) for kv in key_values.values()),
        "override_matches": {f"{name}: {k}": v for name, kv in key_values.items()
                             for k, v in kv.override_counts.items()},
        "saturated": saturated,
        "warnings": warnings,
        "steps": [s.spec.name for s in steps],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return MergeResult(path=output_path, state_dict=sink.state_dict, architecture=plan.architecture,
                       metadata=metadata, recipe=json.loads(metadata["manifold_merge_recipe"]), summary=summary)


# ---------------------------------------------------------------- printing a recipe back

def runnable_recipe(data: Mapping, output=None) -> dict:
    """An embedded recipe as a file `merge --recipe` runs: the runnable fields first, then the record."""
    data = dict(data)
    keys = (["inputs", "steps", "result"] if "steps" in data else ["inputs", "base", "method", "parameters"])
    keys += ["output_dtype", "options"]
    out = {k: data[k] for k in keys if k in data and data[k] is not None}
    if output is not None:
        out["output"] = str(output)
    for k in ("tool", "version", "format", "architecture", "versions"):
        if k in data:
            out[k] = data[k]
    return out


def format_recipe(data: Mapping, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(data, indent=2)
    import yaml
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)

"""Provenance written into the output's safetensors metadata.

Three audiences: our own JSON recipe (everything needed to redo the merge),
A1111's `sd_merge_recipe` / `sd_merge_models` (shown by its metadata viewer),
and the keys of the reference SMA/EMA/WMA merger, so files stay comparable.

Our recipe (`manifold_merge_recipe`) is in the recipe-file format of chain.py (docs/recipes.md): a plain
merge is a one-step recipe (`inputs` with name, path and short sha256, `method`, `parameters`, `base`),
a chain a multi-step one (`inputs`, `steps`, `result`). `python -m merge_core recipe OUT` prints it as a
file that `merge --recipe` runs again (checking the inputs' hashes).
"""
from __future__ import annotations

import json
import platform
from typing import Mapping, Sequence

import torch

from . import __version__


RECIPE_FORMAT = 1


def _entry(name: str, digest: str | None, path) -> dict:
    entry = {"name": name, "sha256": digest[:10] if digest else None}
    if path is not None:
        entry["path"] = str(path)
    return entry


def build_metadata(*, method: str, params: Mapping, names: Sequence[str], hashes: Sequence[str | None],
                   coefficients: Sequence[float] | None, base_name: str | None, base_hash: str | None,
                   architecture: str, output_dtype: str, paths: Sequence | None = None, base_path=None,
                   options: Mapping | None = None) -> dict[str, str]:
    """`paths` (absolute, or None for in-memory inputs) make the recipe runnable; `options` holds the
    plan switches that change the result (strict, force)."""
    paths = list(paths) if paths is not None else [None] * len(names)
    inputs = [_entry(n, h, p) for n, h, p in zip(names, hashes, paths)]
    recipe = {
        "tool": "manifold-merge",
        "version": __version__,
        "format": RECIPE_FORMAT,
        "method": method,
        "parameters": dict(params),
        "inputs": inputs,
        "base": _entry(base_name, base_hash, base_path) if base_name else None,
        "architecture": architecture,
        "output_dtype": output_dtype,
        "options": dict(options or {}),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return _with_legacy_keys(recipe, method, params, names, hashes, base_name, base_hash, coefficients)


def build_chain_metadata(*, inputs: Sequence[Mapping], steps: Sequence[Mapping], result: str,
                         hashes: Mapping[str, str | None], architecture: str, output_dtype: str,
                         options: Mapping | None = None) -> dict[str, str]:
    """Metadata of a recipe (chain) output: the whole recipe, runnable; A1111's keys list the input files."""
    entries = [_entry(i["name"], hashes.get(i["name"]), i.get("path")) for i in inputs]
    recipe = {
        "tool": "manifold-merge",
        "version": __version__,
        "format": RECIPE_FORMAT,
        "inputs": entries,
        "steps": [dict(s) for s in steps],
        "result": result,
        "architecture": architecture,
        "output_dtype": output_dtype,
        "options": dict(options or {}),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    names = [e["name"] for e in entries]
    return _with_legacy_keys(recipe, "recipe", {}, names,
                             [hashes.get(n) for n in names], None, None, None)


def _with_legacy_keys(recipe: dict, method: str, params: Mapping, names: Sequence[str],
                      hashes: Sequence[str | None], base_name: str | None, base_hash: str | None,
                      coefficients: Sequence[float] | None) -> dict[str, str]:
    a1111_recipe = {
        "type": "manifold-merge",
        "method": method,
        "primary_model_hash": hashes[0] if hashes else None,
        "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
        "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
        "parameters": dict(params),
        "models": list(names),
    }
    a1111_models = {}
    for name, digest in zip(list(names) + ([base_name] if base_name else []),
                            list(hashes) + ([base_hash] if base_name else [])):
        if digest:
            a1111_models[digest] = {"name": name, "legacy_hash": None, "sd_merge_recipe": None}
    meta = {
        "format": "pt",
        "manifold_merge_recipe": json.dumps(recipe),
        "sd_merge_recipe": json.dumps(a1111_recipe),
        "sd_merge_models": json.dumps(a1111_models),
        # the reference merger's keys
        "merged_models_count": str(len(names)),
        "merge_method": method.upper() if method in ("sma", "ema", "wma") else method,
        "source_files": json.dumps(list(names)),
    }
    if "alpha" in params:
        meta["alpha"] = str(float(params["alpha"]))
    if params.get("weights") is not None:
        meta["weights"] = json.dumps(list(params["weights"]))
    if coefficients is not None:
        meta["normalized_weights"] = json.dumps([round(float(c), 6) for c in coefficients])
    return meta

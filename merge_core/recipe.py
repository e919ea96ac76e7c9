"""Provenance written into the output's safetensors metadata.

Three audiences: our own JSON recipe (everything needed to redo the merge),
A1111's `sd_merge_recipe` / `sd_merge_models` (shown by its metadata viewer),
and the keys of the reference SMA/EMA/WMA merger, so files stay comparable.
"""
from __future__ import annotations

import json
import platform
from typing import Mapping, Sequence

import torch

from . import __version__


def build_metadata(*, method: str, params: Mapping, names: Sequence[str], hashes: Sequence[str | None],
                   coefficients: Sequence[float] | None, base_name: str | None, base_hash: str | None,
                   architecture: str, output_dtype: str) -> dict[str, str]:
    inputs = [{"name": n, "sha256": h[:10] if h else None} for n, h in zip(names, hashes)]
    recipe = {
        "tool": "manifold-merge",
        "version": __version__,
        "method": method,
        "parameters": dict(params),
        "inputs": inputs,
        "base": {"name": base_name, "sha256": base_hash[:10] if base_hash else None} if base_name else None,
        "architecture": architecture,
        "output_dtype": output_dtype,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
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

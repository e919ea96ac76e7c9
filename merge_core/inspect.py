"""`inspect`: what a checkpoint is, without reading its tensor data (hash aside)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .arch import detect_architecture, display_name
from .io.hashing import file_sha256
from .io.sources import open_model
from .lm import LM_FAMILIES as LM_NAMES, lm_info
from .lora.format import describe_lora


def _json_field(metadata: dict, name: str):
    """A metadata field that holds JSON, decoded; None where it is missing or not JSON."""
    try:
        return json.loads(metadata[name])
    except (KeyError, TypeError, ValueError):
        return None


def inspect_model(path, with_hash: bool = True) -> dict:
    with open_model(path) as src:
        specs = src.specs()
        dtypes = Counter(str(s.dtype).replace("torch.", "") for s in specs.values())
        info = {
            "name": src.name,
            "path": str(path),
            "architecture": detect_architecture(specs),
            "tensors": len(specs),
            "parameters": sum(s.numel for s in specs.values()),
            "bytes": sum(s.nbytes for s in specs.values()),
            "dtypes": dict(dtypes.most_common()),
            "metadata": dict(src.metadata),
        }
        lora = describe_lora(specs)
        if lora is not None:  # a LoRA file: what it is, for which model, and our strengths if it has them
            info["architecture"] = "lora"
            lora["base_model"] = src.metadata.get("ss_base_model_version") or src.metadata.get(
                "modelspec.architecture") or "not recorded"
            lora["strengths"] = _json_field(src.metadata, "manifold_hyper_lambdas")
            info["lora"] = lora
        info["recipe"] = _json_field(src.metadata, "manifold_merge_recipe")
        lm = None if lora is not None else (
            lm_info(src.path, specs) if info["architecture"] == "unknown" or info["architecture"] in LM_NAMES else None)
        if lm is not None:  # language model: family from config.json (model_type) or key layout
            info["architecture"] = lm.family
            info["language_model"] = lm.describe()
    p = Path(path)
    info["file_size"] = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    info["sha256"] = file_sha256(p) if with_hash and p.is_file() else None
    info["short_hash"] = info["sha256"][:10] if info["sha256"] else None
    return info


def format_inspection(info: dict) -> str:
    lines = [
        f"{info['path']}",
        f"  architecture : {display_name(info['architecture'])}",
        *([f"  LM family    : {lm['display']} ({lm['family']}, from {lm['detected_from']}); hidden "
           f"{lm['hidden_size']}, {lm['layers']} layers, vocabulary {lm['vocab_rows']} rows"]
          if (lm := info.get("language_model")) else []),
        f"  tensors      : {info['tensors']}",
        f"  parameters   : {info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)",
        f"  dtypes       : {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}",
        f"  size         : {info['file_size'] / 2**20:.1f} MiB",
    ]
    if (lora := info.get("lora")):
        lines[2:2] = [f"  LoRA         : {lora['kind']}, {lora['modules']} modules ({', '.join(lora['targets'])}), "
                      f"rank {'/'.join(map(str, lora['ranks'])) or '?'}, for {lora['base_model']}"] + \
            [f"    strength for {model}: {values}" for model, values in sorted((lora.get("strengths") or {}).items())]
    params = (info.get("recipe") or {}).get("parameters") or {}
    if params.get("blocks") is not None:
        rows = params["blocks"] if isinstance(params["blocks"], list) else [params["blocks"]]
        for i, row in enumerate(rows):
            who = f" (model {i + 1})" if len(rows) > 1 else ""
            lines.append(f"  blocks{who}: {params.get('block_parameter')} = "
                         + ", ".join(f"{k}:{v:g}" for k, v in row.items()))
    for entry in params.get("overrides") or ():
        lines.append(f"  override     : {entry['pattern']} = {entry['value']:g} ({entry['keys']} keys)")
    if info.get("short_hash"):
        lines.append(f"  hash         : {info['short_hash']} (sha256 {info['sha256']})")
    for key, value in sorted(info["metadata"].items()):
        text = str(value).replace("\n", " ")
        lines.append(f"  meta {key}: {text[:117] + '...' if len(text) > 120 else text}")
    return "\n".join(lines)

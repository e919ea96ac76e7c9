"""`inspect`: what a checkpoint is, without reading its tensor data (hash aside)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .arch import detect_architecture, display_name
from .io.hashing import file_sha256
from .io.sources import open_model


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
    p = Path(path)
    info["file_size"] = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    info["sha256"] = file_sha256(p) if with_hash and p.is_file() else None
    info["short_hash"] = info["sha256"][:10] if info["sha256"] else None
    return info


def format_inspection(info: dict) -> str:
    lines = [
        f"{info['path']}",
        f"  architecture : {display_name(info['architecture'])}",
        f"  tensors      : {info['tensors']}",
        f"  parameters   : {info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)",
        f"  dtypes       : {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}",
        f"  size         : {info['file_size'] / 2**20:.1f} MiB",
    ]
    if info.get("short_hash"):
        lines.append(f"  hash         : {info['short_hash']} (sha256 {info['sha256']})")
    for key, value in sorted(info["metadata"].items()):
        text = str(value).replace("\n", " ")
        lines.append(f"  meta {key}: {text[:117] + '...' if len(text) > 120 else text}")
    return "\n".join(lines)

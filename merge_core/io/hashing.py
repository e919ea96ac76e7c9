"""File hashes for provenance (A1111's sha256 and short hash), cached by (path, size, mtime)."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_CACHE_LOCK = threading.Lock()


def _cache_file() -> Path:
    root = os.environ.get("MANIFOLD_MERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "manifold-merge")
    return Path(root) / "hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path, use_cache: bool = True) -> str:
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    if use_cache:
        with _CACHE_LOCK:
            entry = _load_cache().get(str(path))
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if use_cache:
        with _CACHE_LOCK:
            cache = _load_cache()
            cache[str(path)] = {"stamp": stamp, "sha256": value}
            try:
                _cache_file().parent.mkdir(parents=True, exist_ok=True)
                tmp = _cache_file().with_suffix(".tmp")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, _cache_file())
            except OSError:
                pass  # a cache we cannot write is only slower
    return value


def sha256_short(path) -> str:
    """A1111's 'shorthash': the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]

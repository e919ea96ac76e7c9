"""Model sources: one interface over every input format.

A source lists its keys and their shapes/dtypes without reading tensor data,
and loads one tensor at a time. Formats: .safetensors (lazy), pickled
.ckpt/.pt/.pth/.bin (weights_only, memory-mapped where the format allows),
Hugging Face style folders (sharded, with an index), and in-memory state dicts.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import BadCheckpoint, UnsafeCheckpoint
from .header import sniff
from .safetensors_file import SafetensorsReader
from .spec import TensorSpec

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
               "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


class ModelSource:
    """Base class. Subclasses fill `name`, `path`, `metadata` and `_specs`."""

    name: str
    path: Path | None = None
    metadata: dict[str, str]
    _specs: dict[str, TensorSpec]

    def keys(self) -> list[str]:
        return list(self._specs)

    def spec(self, key: str) -> TensorSpec:
        return self._specs[key]

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def __contains__(self, key: str) -> bool:
        return key in self._specs

    def load(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def release(self, key: str) -> None:
        """The caller is done with `key`: a source may drop its memory for it."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self._specs)} tensors)"


class SafetensorsSource(ModelSource):
    def __init__(self, path: Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        self._reader = SafetensorsReader(self.path)
        self.metadata = self._reader.metadata
        self._specs = {k: self._reader.specs[k] for k in self._reader.keys()}

    def load(self, key: str) -> torch.Tensor:
        return self._reader.load(key)

    def release(self, key: str) -> None:
        self._reader.release(key)

    def close(self) -> None:
        self._reader.close()


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    # Lightning/LDM checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise BadCheckpoint(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a state dict)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BadCheckpoint(f"{path}: not a checkpoint (no tensors found)")
    return tensors


class _Inert:
    """Stand-in for the few non-tensor objects old SD .ckpt files carry (Lightning callbacks).

    The weights-only unpickler builds it from plain data; nothing from the file is executed.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (_Inert,), {"__module__": module, "__qualname__": name})


# What SD1.x-era .ckpt files hold besides tensors: Lightning's checkpoint callback (made inert here)
# and numpy scalars (plain data constructors). Everything else is refused.
_INERT_GLOBALS = ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]


def _extra_safe_globals() -> list:
    import codecs
    import numpy
    allowed: list = [_inert_class(q) for q in _INERT_GLOBALS]
    allowed += [(codecs.encode, "_codecs.encode")]
    scalar = getattr(numpy, "_core", numpy).multiarray.scalar
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                (numpy.dtype, "numpy.dtype")]
    for name in ("float64", "float32", "float16", "int64", "int32", "bool"):
        dtype_class = type(numpy.dtype(name))
        allowed.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    return allowed


def _torch_load_weights_only(path: Path, **kwargs):
    try:
        with torch.serialization.safe_globals(_extra_safe_globals()):
            return torch.load(path, weights_only=True, **kwargs)
    except (TypeError, AttributeError) as exc:  # an older torch without (obj, name) allow-list entries
        if "safe_globals" not in str(exc) and "tuple" not in str(exc):
            raise
        return torch.load(path, weights_only=True, **kwargs)


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that wants to run code is refused."""
    try:
        try:
            obj = _torch_load_weights_only(path, map_location="cpu", mmap=True)  # zip: tensors stay on disk
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            obj = _torch_load_weights_only(path, map_location="cpu")  # legacy format cannot be mapped
    except FileNotFoundError:
        raise BadCheckpoint(f"{path}: file not found") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise UnsafeCheckpoint(
            f"{path}: refused to load: the pickle wants to run code or build objects other than "
            f"tensors ({detail.strip()}). Convert it to .safetensors with a tool you trust.") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as exc:
        raise BadCheckpoint(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    return _unwrap_state_dict(obj, path)


class StateDictSource(ModelSource):
    """An in-memory state dict (hosts pass these), or a loaded pickle."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str, path: Path | None = None,
                 metadata: Mapping[str, str] | None = None):
        self.name = name
        self.path = path
        self.metadata = dict(metadata or {})
        self._tensors = state_dict
        self._specs = {k: TensorSpec.of(v) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}

    def load(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


class ShardedSource(ModelSource):
    """A Hugging Face style folder: shards plus a `*.index.json` weight map."""

    def __init__(self, folder: Path, index_file: Path, name: str | None = None):
        self.path = folder
        self.name = name or folder.name
        self.index_file = index_file
        try:
            index = json.loads(index_file.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadCheckpoint(f"{index_file}: unreadable shard index ({exc})") from None
        self.metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        self._shards: dict[str, ModelSource] = {}
        self._key_shard: dict[str, str] = {}
        self._specs = {}
        try:
            for shard_name in sorted(set(weight_map.values())):
                shard = open_file(folder / shard_name)
                self._shards[shard_name] = shard
            for key, shard_name in weight_map.items():
                shard = self._shards[shard_name]
                if key not in shard:
                    raise BadCheckpoint(f"{index_file}: key {key!r} is not in shard {shard_name}")
                self._key_shard[key] = shard_name
                self._specs[key] = shard.spec(key)
        except BaseException:
            self.close()
            raise

    def load(self, key: str) -> torch.Tensor:
        return self._shards[self._key_shard[key]].load(key)

    def release(self, key: str) -> None:
        self._shards[self._key_shard[key]].release(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def find_index(folder: Path) -> Path | None:
    for name in INDEX_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.index.json"))
    return found[0] if found else None


def is_model_folder(folder: Path) -> bool:
    """A folder that is ONE model (sharded with index, or a single HF weights file)."""
    return folder.is_dir() and (find_index(folder) is not None
                                or (folder / "model.safetensors").is_file()
                                or (folder / "pytorch_model.bin").is_file())


def _sniff_file(path: Path) -> str | None:
    """The format the file's first bytes show ("safetensors", "zip", "pickle"), or None."""
    try:
        with open(path, "rb") as handle:
            first = handle.read(64)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None  # the loaders below report it
    return sniff(first, size)


def _load_misnamed_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint named .safetensors, through the same weights_only unpickler. torch.load
    hands any path ending in .safetensors to the safetensors library, so the file goes in as an open
    handle (read into memory: no mmap for a handle)."""
    prefix = f"{path}: is a pickled PyTorch checkpoint, not a safetensors file (rename it to .ckpt)"
    try:
        with open(path, "rb") as handle:
            obj = _torch_load_weights_only(handle, map_location="cpu")
    except pickle.UnpicklingError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise UnsafeCheckpoint(f"{prefix}, and it was refused: the pickle wants to run code or build objects "
                               f"other than tensors ({detail.strip()})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as exc:
        raise BadCheckpoint(f"{prefix}, and it is corrupt or truncated ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    return _unwrap_state_dict(obj, path)


def open_file(path: Path, name: str | None = None) -> ModelSource:
    """Open one checkpoint file. The content decides, not the name: a safetensors file named .ckpt
    (or anything else) is read as safetensors, which is safe; a pickled checkpoint named .safetensors
    goes through the weights_only loader (a pickle that wants to run code is still refused)."""
    path = Path(path)
    if not path.exists():
        raise BadCheckpoint(f"{path}: file not found")
    suffix = path.suffix.lower()
    kind = _sniff_file(path) if path.is_file() else None
    if kind == "safetensors":
        return SafetensorsSource(path, name)
    if suffix in SAFETENSORS_SUFFIXES and kind in ("zip", "pickle"):
        return StateDictSource(_load_misnamed_pickle(path), name or path.name, path)
    if suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsSource(path, name)
    if suffix in PICKLE_SUFFIXES:
        return StateDictSource(load_pickled_state_dict(path), name or path.name, path)
    raise BadCheckpoint(f"{path}: unsupported file type {suffix or '(none)'} "
                        f"(expected {', '.join(sorted(CHECKPOINT_SUFFIXES))})")


def open_model(model, name: str | None = None) -> ModelSource:
    """Open a path (file or HF folder), wrap a state dict, or pass a source through."""
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, Mapping):
        return StateDictSource(model, name or "state_dict")
    path = Path(model)
    if path.is_dir():
        index = find_index(path)
        if index is not None:
            return ShardedSource(path, index, name)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).is_file():
                return open_file(path / single, name or path.name)
        raise BadCheckpoint(f"{path}: folder holds no model (no *.index.json, model.safetensors "
                            f"or pytorch_model.bin)")
    return open_file(path, name)


def natural_key(text: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def expand_model_args(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """`--models` values: files or model folders as given; a plain folder -> its *.safetensors,
    in natural sort order (model_2 before model_10, case-insensitive)."""
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir() and not is_model_folder(p):
            files = sorted((f for f in p.iterdir() if f.suffix.lower() == ".safetensors" and f.is_file()),
                           key=lambda f: natural_key(f.name))
            if not files:
                raise BadCheckpoint(f"{p}: folder holds no .safetensors files")
            out.extend(files)
        else:
            out.append(p)
    return out

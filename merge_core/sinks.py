"""Where merged tensors go: one .safetensors file, a sharded folder with an index, or a dict.

File outputs are written atomically (a hidden temporary file or folder beside
the target, renamed into place on commit, removed on abort).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import torch

from .errors import MergeCancelled
from .io.safetensors_file import SafetensorsWriter, check_output_path
from .io.sources import CHECKPOINT_SUFFIXES
from .io.spec import TensorSpec


class Sink:
    """Where merged tensors go: a safetensors file, a sharded folder, or a dict."""

    def __init__(self, output: Path | None, specs: dict[str, TensorSpec], overwrite: bool,
                 output_device: torch.device, max_shard_bytes: int):
        self.output = output
        self.state_dict: dict[str, torch.Tensor] | None = None
        self._writers: list[SafetensorsWriter] = []
        self._key_writer: dict[str, SafetensorsWriter] = {}
        self._output_device = output_device
        self._tmp_dir: Path | None = None
        self._overwrite = overwrite
        self._specs = specs
        self._max_shard = max_shard_bytes
        self._lock = threading.Lock()

    @property
    def is_folder(self) -> bool:
        return self.output is not None and self.output.suffix.lower() != ".safetensors"

    def __enter__(self):
        if self.output is None:
            self.state_dict = {}
            return self
        if not self.is_folder:
            writer = SafetensorsWriter(self.output, self._specs, overwrite=self._overwrite).__enter__()
            self._writers = [writer]
            self._key_writer = {k: writer for k in self._specs}
            return self
        # Folder output: shards + index, built in a hidden temp folder and renamed into place.
        check_output_path(self.output, self._overwrite)
        self._tmp_dir = self.output.parent / f".{self.output.name}.tmp-merge"
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._tmp_dir.mkdir()
        shards: list[dict[str, TensorSpec]] = [{}]
        size = 0
        for key, spec in self._specs.items():
            if size and size + spec.nbytes > self._max_shard:
                shards.append({})
                size = 0
            shards[-1][key] = spec
            size += spec.nbytes
        total = len(shards)
        self.shard_names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
                            for i in range(total)]
        for name, shard in zip(self.shard_names, shards):
            writer = SafetensorsWriter(self._tmp_dir / name, shard).__enter__()
            self._writers.append(writer)
            for key in shard:
                self._key_writer[key] = writer
        return self

    def buffer(self, key: str) -> torch.Tensor | None:
        """Where to compute `key` in place (a view of the output file), if the output allows it."""
        return self._key_writer[key].buffer(key) if self._key_writer else None

    def put(self, key: str, tensor: torch.Tensor, owned: bool) -> None:
        if self.state_dict is not None:
            # A copied tensor may still view an input file's memory map: give the caller its own.
            tensor = tensor.to(self._output_device)
            if not owned and tensor.device.type == "cpu":
                tensor = tensor.clone()
            with self._lock:
                self.state_dict[key] = tensor
        else:
            self._key_writer[key].write(key, tensor)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        for writer in self._writers:
            writer.set_metadata(metadata)

    def commit(self, copy_extra_from: Path | None) -> None:
        for writer in self._writers:
            writer.__exit__(None, None, None)
        if self._tmp_dir is None:
            return
        index = {"metadata": {"total_size": sum(s.nbytes for s in self._specs.values())},
                 "weight_map": {k: w.path.name for k, w in self._key_writer.items()}}
        if len(self._writers) > 1:
            (self._tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if copy_extra_from is not None:
            copy_extra_files(copy_extra_from, self._tmp_dir)
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.old-merge"
            os.replace(self.output, old)
            os.replace(self._tmp_dir, self.output)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(self._tmp_dir, self.output)
        self._tmp_dir = None

    def abort(self) -> None:
        for writer in self._writers:
            writer.__exit__(MergeCancelled, None, None)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self.state_dict = None


def copy_extra_files(source_folder: Path, target: Path) -> list[str]:
    """Copy the first model's non-weight files (configs, tokenizer...), never its shard index."""
    copied = []
    for item in sorted(source_folder.iterdir()):
        if (item.name.startswith(".") or not item.is_file() or item.suffix.lower() in CHECKPOINT_SUFFIXES
                or item.name.endswith(".index.json")):
            continue
        dest = target / item.name
        if dest.exists():
            continue
        shutil.copy2(item, dest)
        copied.append(item.name)
    return copied

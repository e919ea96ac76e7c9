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

from .errors import MergeCancelled, MergeError, OutputExists
from .io.atomic import (Target, check_writable_folder, deferred_signals, describe_os_error, is_within,
                        lock_exclusive, remove_quietly, temp_name)
from .io.safetensors_file import SafetensorsWriter, check_output_path
from .io.spec import TensorSpec


MANIFEST = ".manifold-merge.json"  # what a folder output holds, so --overwrite can tell it is ours


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that no earlier merge wrote (everything, if it has no manifest of ours)."""
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    if listed is None:
        return names or ["(no record that Manifold Merge wrote it)"]
    return [n for n in names if n not in listed or (folder / n).is_dir()]


def check_output_name(output: Path | None, overwrite: bool) -> None:
    """Before any input is opened: a merge writes one .safetensors file, or a folder (no other suffix); an
    existing file is refused unless `overwrite`."""
    if output is None:
        return
    if output.suffix and output.suffix.lower() != ".safetensors":
        raise MergeError(f"{output}: output must be .safetensors (or a folder name for sharded output)")
    if output.suffix.lower() == ".safetensors":
        check_output_path(output, overwrite)


def check_output_against_inputs(output: Path | None, sources, overwrite: bool) -> None:
    """Once the inputs are open, before planning: the output is none of them (nor a file in an input folder),
    and a folder output holds none of them. Sink re-checks the folder when it captures it (the authoritative
    check, made when the output is taken); this one makes a wrong output fail before anything is read."""
    if output is None:
        return
    for src in sources:
        if src.path is None:
            continue
        paths = [Path(src.path)]
        if Path(src.path).is_dir():
            paths += list(Path(src.path).iterdir())
        for p in paths:
            if (output.exists() and p.exists() and os.path.samefile(output, p)) or output.resolve() == p.resolve():
                raise OutputExists(f"{output}: refusing to overwrite an input model ({src.name})")
    if output.suffix.lower() != ".safetensors":
        check_folder_output(output, [Path(s.path) for s in sources if s.path is not None], overwrite)


def check_folder_output(output: Path, inputs: list[Path], overwrite: bool) -> Target:
    """A folder output never replaces a folder that holds an input, the base, or anything a merge did not
    write; with overwrite it replaces only a model folder an earlier merge wrote."""
    check_writable_folder(output)
    for path in inputs:
        if is_within(path, output):
            raise OutputExists(f"{output}: holds the input {path}; a merge never replaces a folder with its "
                               f"inputs in it (pick a new output folder)")
    if output.exists() or output.is_symlink():
        if not output.is_dir() or output.is_symlink():
            raise OutputExists(f"{output}: exists and is not a folder; a folder output needs a new name")
        if not overwrite:
            raise OutputExists(f"{output}: output folder already exists (use --overwrite to replace a model "
                               f"folder written by an earlier merge)")
        foreign = _foreign_entries(output)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputExists(f"{output}: holds files a merge did not write ({shown}); --overwrite replaces "
                               f"only a model folder written by Manifold Merge, so nothing was replaced")
    return Target.capture(output, overwrite)


class Sink:
    """Where merged tensors go: a safetensors file, a sharded folder, or a dict."""

    def __init__(self, output: Path | None, specs: dict[str, TensorSpec], overwrite: bool,
                 output_device: torch.device, max_shard_bytes: int, inputs: list[Path] = (),
                 metadata: dict[str, str] | None = None):
        self.output = output
        self.state_dict: dict[str, torch.Tensor] | None = None
        self._writers: list[SafetensorsWriter] = []
        self._key_writer: dict[str, SafetensorsWriter] = {}
        self._output_device = output_device
        self._tmp_dir: Path | None = None
        self._dir_fd: int | None = None
        self._overwrite = overwrite
        self._specs = specs
        self._max_shard = max_shard_bytes
        self._inputs = list(inputs)
        self._metadata = dict(metadata or {})  # sizes the header: the final metadata must not be longer
        self._lock = threading.Lock()
        self.copied_files: list[str] = []

    @property
    def is_folder(self) -> bool:
        return self.output is not None and self.output.suffix.lower() != ".safetensors"

    def __enter__(self):
        if self.output is None:
            self.state_dict = {}
            return self
        if not self.is_folder:
            writer = SafetensorsWriter(self.output, self._specs, self._metadata, overwrite=self._overwrite)
            self._writers = [writer]  # known before it creates its file: abort() always finds it
            writer.__enter__()
            self._key_writer = {k: writer for k in self._specs}
            return self
        # Folder output: shards + index, built in a hidden temp folder and moved into place at commit.
        self._target = check_folder_output(self.output, self._inputs, self._overwrite)
        tmp = self.output.parent / temp_name(self.output)
        with deferred_signals():
            try:
                tmp.mkdir()
            except OSError as exc:
                raise MergeError(f"{self.output}: cannot create the output folder "
                                 f"({describe_os_error(exc)})") from None
            self._tmp_dir = tmp
        try:
            self._dir_fd = os.open(tmp, os.O_RDONLY)
            lock_exclusive(self._dir_fd)
            self._open_shards()
        except OSError as exc:
            self.abort()
            raise MergeError(f"{self.output}: cannot create the output ({describe_os_error(exc)})") from None
        except BaseException:
            self.abort()
            raise
        return self

    def _open_shards(self) -> None:
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
            writer = SafetensorsWriter(self._tmp_dir / name, shard, self._metadata, display=self.output)
            self._writers.append(writer)
            writer.__enter__()
            for key in shard:
                self._key_writer[key] = writer

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
            if copy_extra_from is not None and self.output is not None:  # beside a single-file output
                self.skipped_files = []
                self.copied_files = copy_extra_files(copy_extra_from, self.output.parent, self.skipped_files,
                                                     best_effort=True)
            return
        index = {"metadata": {"total_size": sum(s.nbytes for s in self._specs.values())},
                 "weight_map": {k: w.path.name for k, w in self._key_writer.items()}}
        if len(self._writers) > 1:
            (self._tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if copy_extra_from is not None:
            self.skipped_files = []
            self.copied_files = copy_extra_files(copy_extra_from, self._tmp_dir, self.skipped_files)
        written = sorted(p.name for p in self._tmp_dir.iterdir())
        (self._tmp_dir / MANIFEST).write_text(json.dumps({"tool": "manifold-merge", "files": written}))
        if self._target.identity is not None:  # the same rule again, now: nothing foreign was added meanwhile
            check_folder_output(self.output, self._inputs, True)
        self._target.place(self._tmp_dir)
        self._tmp_dir = None
        self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def abort(self) -> None:
        with deferred_signals():
            if self._tmp_dir is not None:  # remove the folder first: nothing is left whatever comes next
                remove_quietly(self._tmp_dir)
                self._tmp_dir = None
            for writer in self._writers:
                writer.__exit__(MergeCancelled, None, None)
            self._close_dir()
            self.state_dict = None


def copy_extra_files(source, target: Path, skipped: list | None = None, best_effort: bool = False) -> list[str]:
    """Write the output's non-weight files into `target` (the temp folder of a folder output, or the folder
    of a single-file output): `source` is an lm.OutputFiles (configs corrected, the tokenizer of the model
    whose vocabulary the output has) or a folder (its non-weight files; never its shard index). A file
    that exists in `target` is never replaced: it is skipped and listed in `skipped` as "name: reason".
    best_effort: a file that cannot be written is skipped too (the output is already in place)."""
    from .lm import OutputFiles, folder_files
    entries = source if isinstance(source, OutputFiles) else folder_files(Path(source), Path(source).name)
    copied = []
    for entry in entries:
        dest = target / entry.name
        try:
            with open(dest, "xb") as handle:  # exclusive: never over a file already there
                try:
                    if entry.data is not None:
                        handle.write(entry.data)
                    else:
                        with open(entry.source, "rb") as src:
                            shutil.copyfileobj(src, handle, 1 << 20)
                except BaseException:
                    handle.close()
                    remove_quietly(dest)
                    raise
            if entry.data is None:
                shutil.copystat(entry.source, dest)
        except FileExistsError:
            if skipped is not None:
                skipped.append(f"{entry.name}: {dest} exists, not replaced")
            continue
        except OSError as exc:
            if not best_effort:
                raise MergeError(f"{dest}: cannot copy {entry.name} from {entry.origin} "
                                 f"({describe_os_error(exc)})") from None
            if skipped is not None:
                skipped.append(f"{entry.name}: {describe_os_error(exc)}")
            continue
        copied.append(entry.name)
    return copied

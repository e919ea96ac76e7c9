"""Reading and writing .safetensors without holding a whole model.

The reader parses and validates the header itself (so a truncated file or a
header whose offsets lie gives a clear error instead of a crash or a silent
garbage tensor) and reads each tensor with positioned reads, which release the
GIL and let several worker threads read at once.

The writer knows every output key's shape and dtype up front (from the plan),
so it lays out the file first and then accepts tensors in any order, from any
thread. It writes into a hidden temporary file beside the target and renames it
into place only when every tensor is written: an error or Ctrl-C leaves no
partial file and never touches an existing one.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import BadCheckpoint, MergeError, OutputExists
from .atomic import (Target, check_writable_folder, deferred_signals, describe_os_error, lock_exclusive,
                     remove_quietly, temp_name)
from .spec import TORCH_TO_SAFETENSORS, TensorSpec

from .header import MAX_HEADER_BYTES, read_header  # 100_000_000: the official library's cap
HEADER_ALIGN = 8
HEADER_SLACK = 16 * 1024  # room for metadata that is only known at the end (input hashes)


def _read_exact(fd: int, lock: threading.Lock, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `offset`; returns bytes read (short only at end of file)."""
    done = 0
    if hasattr(os, "preadv"):
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done
    with lock:  # Windows: no pread, serialise seek+read per file
        os.lseek(fd, offset, os.SEEK_SET)
        while done < len(buf):
            chunk = os.read(fd, len(buf) - done)
            if not chunk:
                break
            buf[done:done + len(chunk)] = chunk
            done += len(chunk)
    return done


def _write_all(fd: int, lock: threading.Lock, data: memoryview, offset: int) -> None:
    if hasattr(os, "pwrite"):
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        return
    with lock:
        os.lseek(fd, offset, os.SEEK_SET)
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])


def parse_header(path: str, fd: int, file_size: int):
    """Return (specs, data offsets, data start, metadata), validating everything.

    The rules (the official library's, checked on crafted files) live in io/header.py: any header
    they refuse is a one-line BadCheckpoint naming the file, never another exception."""
    return read_header(path, fd, file_size)


def _pread_fallback(fd: int, n: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


def drop_pages(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Take the whole pages of [offset, offset+length) out of this process's resident set.

    File-backed pages stay valid: read again they come back from the page cache (or the disk), and
    dirty pages of a shared map are still written back."""
    if not hasattr(mmap, "MADV_DONTNEED") or not hasattr(mapping, "madvise"):
        return
    page = mmap.PAGESIZE
    start = -(-offset // page) * page
    stop = (offset + length) // page * page
    if stop > start:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):
            pass


class SafetensorsReader:
    """Lazy, validated, thread-safe reader of one .safetensors file.

    Tensors are views of a read-only memory map of the file: no copy, no fresh
    pages to zero, the page cache is read in place. `release(key)` drops a
    tensor's pages from this process (they stay in the page cache), which keeps
    the resident set at the tensors in flight. Where mmap is unavailable,
    positioned reads into fresh buffers are used instead.
    """

    def __init__(self, path: str | os.PathLike, use_mmap: bool = True):
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise BadCheckpoint(f"{self.path}: file not found") from None
        except IsADirectoryError:
            raise BadCheckpoint(f"{self.path}: is a directory, not a safetensors file") from None
        except OSError as exc:
            raise BadCheckpoint(f"{self.path}: cannot open ({exc.strerror})") from None
        self._lock = threading.Lock()
        self._map = None
        try:
            size = os.fstat(self._fd).st_size
            self.specs, self._offsets, self._data_start, self.metadata = parse_header(self.path, self._fd, size)
            if use_mmap and size > 0:
                try:
                    # Private (copy-on-write) map: a caller that writes into a tensor gets its own
                    # pages instead of a crash, and the file is never modified.
                    self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):
                    self._map = None
        except BaseException:
            os.close(self._fd)
            raise

    def keys(self) -> list[str]:
        # File order: reading in offset order keeps the disk access sequential.
        return sorted(self.specs, key=lambda k: self._offsets[k][0])

    def load(self, key: str) -> torch.Tensor:
        spec = self.specs[key]
        begin, end = self._offsets[key]
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        if self._map is not None:
            # numpy holds a buffer export of the map, so the map outlives every tensor viewing it.
            array = np.frombuffer(self._map, dtype=np.uint8, count=spec.nbytes, offset=self._data_start + begin)
            return torch.from_numpy(array).view(spec.dtype).reshape(spec.shape)
        raw = torch.empty(spec.nbytes, dtype=torch.uint8)
        got = _read_exact(self._fd, self._lock, memoryview(raw.numpy()), self._data_start + begin)
        if got != spec.nbytes:
            raise BadCheckpoint(f"{self.path}: truncated while reading tensor {key!r}")
        return raw.view(spec.dtype).reshape(spec.shape)

    def release(self, key: str) -> None:
        """Drop this tensor's mapped pages from the resident set (data stays valid on disk/cache)."""
        if self._map is None:
            return
        begin, end = self._offsets[key]
        drop_pages(self._map, self._data_start + begin, end - begin)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # tensors still view it; it is unmapped when the last one is freed
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _header_bytes(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str], size: int | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, spec in specs.items():
        header[key] = {"dtype": TORCH_TO_SAFETENSORS[spec.dtype], "shape": list(spec.shape),
                       "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(body) + HEADER_SLACK > MAX_HEADER_BYTES:  # no reader (ours, the official one) would open it
        raise MergeError(f"the output's header would be {len(body)} bytes; safetensors allows "
                         f"{MAX_HEADER_BYTES} (too much metadata or too many tensors)")
    if size is None:
        size = len(body) + HEADER_SLACK
        size += (-(8 + size)) % HEADER_ALIGN  # tensor data starts 8-byte aligned
    if len(body) > size:
        raise MergeError(f"the output's header ({len(body)} bytes) outgrew the space reserved for it ({size}); "
                         f"nothing was written")
    return body + b" " * (size - len(body))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


def check_output_path(path: Path, overwrite: bool) -> None:
    """The output may be written: its folder takes the name, and an existing entry only with `overwrite`
    (and never a folder where a file is asked for)."""
    check_writable_folder(path)
    if path.is_dir() and path.suffix.lower() == ".safetensors":
        raise OutputExists(f"{path}: is a folder; a .safetensors output must be a file (pick another name)")
    if path.exists() and not overwrite:
        raise OutputExists(f"{path}: output already exists (use --overwrite to replace it)")


def _reserve_space(fd: int, size: int, path: Path) -> bool:
    """Allocate the whole output now: a full disk is a clear error before any work, not a failure at
    the end. Returns True when the blocks are really allocated (then writing through a memory map
    cannot hit a full disk)."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return True
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise MergeError(f"{path}: not enough free disk space for the output "
                                 f"({size / 2**30:.2f} GiB needed)") from None
            # filesystems without fallocate: fall through to a plain (sparse) size
    os.ftruncate(fd, size)
    return False


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class SafetensorsWriter:
    """Atomic, any-order, thread-safe writer. Use as a context manager.

    When the output's blocks could be allocated up front, the temporary file is
    also memory-mapped and `buffer(key)` hands out a tensor view of the key's
    place in the file: merge code computes straight into it (no output
    allocation, no copy). Otherwise tensors are written with positioned writes.

    The temporary file is hidden, locked by this process (see io/atomic.py), and
    moved into place by `Target.place`: an entry that appears at the output path
    while the merge runs is never replaced. `display` is the path named in error
    messages (the user's output, when this file is one shard of a folder output).
    """

    def __init__(self, path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False, display: Path | None = None):
        self.path = Path(path)
        self.display = Path(display) if display is not None else self.path
        self.specs = dict(specs)
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self._fd = None
        self._tmp = None
        self._lock = threading.Lock()
        self._written: set[str] = set()
        self._offsets: dict[str, int] = {}
        self._map = None

    def __enter__(self) -> "SafetensorsWriter":
        check_output_path(self.path, self.overwrite)
        self._target = Target.capture(self.path, self.overwrite)
        for key, spec in self.specs.items():
            if spec.dtype not in TORCH_TO_SAFETENSORS:
                raise ValueError(f"{key}: dtype {spec.dtype} cannot be stored in safetensors")
        self._header = _header_bytes(self.specs, self.metadata, None)
        tmp = self.path.parent / temp_name(self.path)
        with deferred_signals():  # a signal here must not leave a file this object does not know of
            try:
                self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                                   0o666 & ~_current_umask())
            except OSError as exc:
                raise MergeError(f"{self.display}: cannot write into {self.display.parent} "
                                 f"({describe_os_error(exc)})") from None
            self._tmp = tmp
        try:
            lock_exclusive(self._fd)
            data_start = 8 + len(self._header)
            offset = data_start
            for key, spec in self.specs.items():
                self._offsets[key] = offset
                offset += spec.nbytes
            if _reserve_space(self._fd, offset, self.display) and offset > 0:
                try:
                    self._map = mmap.mmap(self._fd, offset, access=mmap.ACCESS_WRITE)
                except (OSError, ValueError):
                    self._map = None
        except OSError as exc:
            self._discard()
            raise MergeError(f"{self.display}: cannot create the output ({describe_os_error(exc)})") from None
        except BaseException:
            self._discard()
            raise
        return self

    def set_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the metadata (e.g. once input hashes are known); written at commit."""
        self.metadata = dict(metadata)

    def buffer(self, key: str) -> torch.Tensor | None:
        """A writable tensor view of `key`'s bytes in the output, or None (then use write())."""
        spec = self.specs[key]
        if self._map is None or spec.nbytes == 0:
            return None
        array = np.frombuffer(self._map, dtype=np.uint8, count=spec.nbytes, offset=self._offsets[key])
        return torch.from_numpy(array).view(spec.dtype).reshape(spec.shape)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        spec = self.specs[key]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{key}: expected {list(spec.shape)} {spec.dtype}, got "
                             f"{list(tensor.shape)} {tensor.dtype}")
        if spec.nbytes:
            offset = self._offsets[key]
            if self._map is not None:
                target = np.frombuffer(self._map, dtype=np.uint8, count=spec.nbytes, offset=offset)
                if target.ctypes.data != tensor.data_ptr():  # not computed in place: copy it in
                    target[:] = tensor_bytes(tensor)
                del target
                drop_pages(self._map, offset, spec.nbytes)  # written pages still reach the disk
            else:
                _write_all(self._fd, self._lock, tensor_bytes(tensor), offset)
        with self._lock:
            self._written.add(key)

    def _close_map(self, flush: bool) -> None:
        if self._map is not None:
            try:
                if flush:
                    self._map.flush()
                self._map.close()
            except BufferError:
                pass  # a view is still alive somewhere; the map is unmapped when it dies
            self._map = None

    def _commit(self) -> None:
        missing = [k for k in self.specs if k not in self._written]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} tensors were never written (first: {missing[0]})")
        self._close_map(flush=True)
        header = _header_bytes(self.specs, self.metadata, len(self._header))
        try:
            _write_all(self._fd, self._lock, memoryview(struct.pack("<Q", len(header)) + header), 0)
            os.fsync(self._fd)
        except OSError as exc:
            raise MergeError(f"{self.display}: writing the output failed ({describe_os_error(exc)})") from None
        # The lock (held through the open descriptor) stays until the file has its final name.
        self._target.place(self._tmp, self.display)
        self._tmp = None
        os.close(self._fd)
        self._fd = None

    def _discard(self) -> None:
        with deferred_signals():
            # Unlink first: whatever happens next, no temporary file is left behind.
            remove_quietly(self._tmp)
            self._tmp = None
            self._close_map(flush=False)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._commit()
            finally:
                self._discard()
        else:
            self._discard()


def save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                     overwrite: bool = False) -> Path:
    """Write a dict of tensors atomically (same guarantees as SafetensorsWriter)."""
    specs = {k: TensorSpec.of(t) for k, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata, overwrite=overwrite) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    return Path(path)


"""Putting finished outputs into place without ever losing a file.

Every output (a .safetensors file, a sharded model folder, a hyper-merge set) is
built under a hidden temporary name in the target folder and moved into place
only when it is complete. This module owns the rules for that last step:

* **Temporary names** are short and bounded (a 240-character output name must
  still work), carry the writer's PID, and the writer holds an exclusive
  `flock` on them for as long as it lives. A temporary entry whose lock is free
  and that no live process has open is provably stale (a killed run): the next
  run in that folder removes it and says so (`sweep_stale`).
* **No replace without permission.** `Target.capture` records what was at the
  output path when the merge was allowed to write (nothing, or one file or
  folder, by device and inode). `place` then moves the finished entry in:
  where nothing was there, with an exclusive primitive (`link` + `unlink` for
  files, `renameat2(RENAME_NOREPLACE)` for folders) so a file created at the
  path meanwhile — by the user, or by a second merge — is never replaced;
  where something was there (`--overwrite`), only if it is still the same
  entry, and a replaced folder is first moved aside so a failure can put it back.
* **Cleanup cannot be interrupted halfway**: `deferred_signals()` holds
  SIGINT/SIGTERM/SIGHUP while temporary files are removed and re-raises
  afterwards, and temporary files are unlinked before anything slow happens.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergeError, OutputExists

TEMP_SUFFIX = ".tmp-merge"
_TEMP_NAME = re.compile(r"^\.(?P<stem>.*)\.(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + r"$")
_LEGACY_TEMP_NAME = re.compile(r"^\..+\.(tmp-merge|tmp-hyper)$")  # names used by earlier versions
_STEM_CHARS = 48
_HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


# ------------------------------------------------------------------ names and checks

def temp_name(final: Path) -> str:
    """A hidden, bounded temporary name beside `final`: `.STEM.PID-RANDOM.tmp-merge`."""
    stem = final.name[:_STEM_CHARS]
    return f".{stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def describe_os_error(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno == errno.ENOSPC:
        return "no space left on the disk"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.ENAMETOOLONG:
        return "the name is too long for the file system"
    return exc.strerror or str(exc)


def _nearest_existing(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def check_writable_folder(final: Path) -> None:
    """The folder that will receive `final` exists (or can be created: its nearest existing ancestor is a
    writable folder), is writable, and takes a name that long."""
    folder = final.parent
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputExists(f"{final}: {existing} is not a folder")
    for part in [final.name] + [p.name for p in _missing_parts(folder)]:
        limit = name_max(existing)
        if len(part.encode("utf-8", "surrogateescape")) > limit:
            raise MergeError(f"{final}: the name {part[:40]}… is {len(part.encode())} bytes long; "
                             f"the file system allows {limit}")
    if not os.access(existing, os.W_OK | os.X_OK):
        probe = "the file system is read-only" if _read_only(existing) else "permission denied"
        raise MergeError(f"{final}: cannot write into {existing} ({probe})")


def _missing_parts(folder: Path) -> list[Path]:
    """The folders from the nearest existing ancestor down to `folder` that do not exist yet, outermost first."""
    missing = []
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def make_parents(final: Path) -> list[Path]:
    """Create the missing folders above `final` (as users expect from every tool); returns them, outermost
    first, so a failed run can take them back with `remove_created`."""
    created = []
    for folder in _missing_parts(Path(final).parent):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            remove_created(created)
            raise MergeError(f"{final}: cannot create the folder {folder} ({describe_os_error(exc)})") from None
        created.append(folder)
    return created


def remove_created(folders: list[Path]) -> None:
    """Remove folders this run created, innermost first, as long as they are empty (never anything else)."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            break


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def is_within(path: Path, folder: Path) -> bool:
    """True if `path` is `folder` or lies anywhere below it (both resolved, links followed)."""
    try:
        path, folder = Path(path).resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):
        return False
    return path == folder or folder in path.parents


# ------------------------------------------------------------------ locks

def lock_exclusive(fd: int) -> None:
    """Mark a temporary entry as owned by this live process (released by the kernel when it dies)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass


def _lock_is_free(path: Path) -> bool:
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_anywhere(path: Path) -> bool | None:
    """Is `path` (or anything inside it) open in any process? None where /proc cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = str(path.resolve())
    inside = target + os.sep
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.endswith(" (deleted)"):
                continue
            if link == target or link.startswith(inside):
                return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _entry_size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return path.lstat().st_size


@dataclass(frozen=True)
class StaleEntry:
    path: Path
    size: int
    removed: bool

    def describe(self) -> str:
        size = f"{self.size / 2**20:.0f} MiB" if self.size >= 2**20 else f"{self.size} bytes"
        if self.removed:
            return f"removed {self.path.name} ({size}) in {self.path.parent}, left by an interrupted earlier run"
        return (f"found {self.path.name} ({size}) in {self.path.parent}, a temporary file of another run that "
                f"may still be going; left it alone")


def sweep_stale(folder: Path) -> list[StaleEntry]:
    """Remove this tool's temporary entries in `folder` that no live process owns; report the others."""
    found: list[StaleEntry] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return found
    for path in entries:
        match = _TEMP_NAME.match(path.name)
        if match is None and _LEGACY_TEMP_NAME.match(path.name) is None:
            continue
        if path.is_symlink():
            continue
        pid = int(match["pid"]) if match else None
        if pid == os.getpid():
            continue
        try:
            size = _entry_size(path)
        except OSError:
            continue
        open_somewhere = _open_anywhere(path)
        if open_somewhere is None:  # no /proc: trust the lock and the PID
            stale = _lock_is_free(path) and pid is not None and not _pid_alive(pid)
        else:
            stale = not open_somewhere and (fcntl is None or _lock_is_free(path))
        if stale:
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:
                stale = False
        found.append(StaleEntry(path, size, stale))
    return found


# ------------------------------------------------------------------ exclusive moves

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = None


def _renameat2():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018  (AttributeError where glibc has no renameat2)
        except (OSError, AttributeError):
            _libc = False
    return _libc.renameat2 if _libc else None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (atomic where the OS can)."""
    func = _renameat2()
    if func is not None:
        ret = func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if ret == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        # No exclusive rename here: mkdir claims the name atomically, then the empty placeholder is replaced.
        os.mkdir(dst)
        os.replace(src, dst)
        return
    os.link(src, dst)  # exclusive: EEXIST if anything is there
    os.unlink(src)


def _identity(st: os.stat_result) -> tuple:
    # Inode numbers are reused at once on many file systems: a new file at the same path is told apart
    # by its change time as well.
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass(frozen=True)
class Target:
    """An output path and what was there when the merge was allowed to write."""
    path: Path
    identity: tuple | None  # (device, inode, size, mtime, ctime) of the entry we may replace, or None

    @classmethod
    def capture(cls, path: Path, overwrite: bool) -> "Target":
        path = Path(path)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return cls(path, None)
        if not overwrite:
            raise OutputExists(f"{path}: output already exists (use --overwrite to replace it)")
        return cls(path, _identity(st))

    def _changed(self, what: str) -> OutputExists:
        return OutputExists(f"{self.path}: {what} while this merge ran; nothing was replaced and the merge "
                            f"result was discarded")

    def place(self, tmp: Path, display: Path | None = None) -> None:
        """Move the finished `tmp` to the output path under the rule captured at the start. Any failure is a
        MergeError naming `display` (the user's output; default the target path)."""
        try:
            self._place(tmp)
        except OSError as exc:
            raise MergeError(f"{display or self.path}: moving the finished output into place failed "
                             f"({describe_os_error(exc)})") from None

    def _place(self, tmp: Path) -> None:
        if self.identity is None:
            try:
                rename_noreplace(tmp, self.path)
            except FileExistsError:
                raise self._changed("something was created at the output path") from None
            return
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            raise self._changed("the file to be replaced was removed") from None
        if _identity(st) != self.identity:
            raise self._changed("the file to be replaced was changed for another one")
        if tmp.is_dir():
            aside = self.path.parent / temp_name(self.path)
            os.rename(self.path, aside)
            try:
                rename_noreplace(tmp, self.path)
            except BaseException:
                with deferred_signals():
                    os.rename(aside, self.path)
                raise
            with deferred_signals():
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, self.path)


# ------------------------------------------------------------------ signals

@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done, then raise KeyboardInterrupt if one came.

    Signal handlers run in the main thread only; elsewhere (a host's worker thread) nothing is deferred,
    and nothing needs to be: those threads never receive KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for sig in _HANDLED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def remove_quietly(path: Path | str | None) -> None:
    """Unlink a file or remove a folder we created; never raises."""
    if path is None:
        return
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass

"""What a safetensors header must be: the reader-side validation of a .safetensors file's header.

A .safetensors file is: 8 bytes (little-endian u64 N), N bytes of UTF-8 JSON (the header), then the
tensor data. The rules below were taken from the official library (safetensors 0.8, the Rust
`SafeTensors::read_metadata`) and checked on crafted bytes; the header fuzz tests
(tests/unit/test_header_fuzz.py) keep this reader and `safetensors.torch.load_file` agreeing. A file
is ACCEPTED only when every rule holds; anything else is a one-line `BadCheckpoint` naming the file.

Framing
  * The file has at least 8 bytes (a zero-length or 7-byte file is refused).
  * N <= 100_000_000 (the official cap, exactly) and 8 + N <= file size.
  * The header is valid UTF-8 and strict JSON: no NaN/Infinity, no trailing commas, no control
    characters in strings, no unpaired UTF-16 surrogate escapes; whitespace (space, tab, CR, LF) may
    surround it, so trailing-space padding is fine and N need not be a multiple of 8. NUL padding
    is refused.
  * Nesting depth at most 127 (the official JSON parser's recursion limit), checked by a cheap scan
    BEFORE json.loads, so a header of 100k `[` cannot reach Python's recursion.
  * Every number must fit a float64 (1e400, or an integer literal of 309+ digits, is refused
    anywhere in the header, even in an ignored field); numbers are never turned into giant ints.

Structure
  * The header is a JSON object. `__metadata__` may appear once (twice is refused); it is null or
    an object whose values are all strings. Duplicate keys inside it: the last one wins (as the
    official library does), but every value must still be a string.
  * Every other key is a tensor; duplicate tensor names: the last entry wins, every entry must still
    be well-formed. A tensor entry is an object with `dtype`, `shape`, `data_offsets` (each at most
    once; extra fields are ignored), or a 3-element array [dtype, shape, data_offsets] (which the
    official library accepts too).
  * dtype: a known safetensors dtype name (the official list, case-sensitive; `{"F32": null}` is
    the same as "F32"). shape: an array of integers in [0, 2**64). data_offsets: an array of exactly
    two such integers. Strings, floats (64.9, but also 64.0 and -0), booleans, negatives, null,
    nested arrays are refused: a shape of 64.9 is never read as 64, True never as 1.

Layout (checked in order of data_offsets, as the official library does)
  * Tensors tile the data buffer exactly: sorted by (begin, end), each begins where the previous one
    ended (the first at 0), so unsorted offsets in the JSON are fine but gaps and overlaps are not;
    several zero-size tensors may share an offset.
  * end - begin == number of elements x element size, computed left to right with a 64-bit overflow
    check (a shape whose running product passes 2**64 is refused even if a later dimension is 0).
  * The last tensor ends exactly at the end of the file: trailing bytes are refused, a short file is
    reported as truncated. An empty header `{}` is a valid file with no tensors (and no data).

Beyond the official library (a file it reads but this reader refuses)
  * dtypes Manifold Merge cannot merge (U16, U32, U64, C64, F8_E8M0, F8_*FNUZ, F4, F6_*):
    "unsupported dtype". F8_E4M3/F8_E5M2 are read when torch has float8 types.
  * Zero-element tensors whose shape torch cannot represent (a dimension >= 2**63, or a contiguous
    stride >= 2**63, e.g. [0, 2**62, 2**62]): "shape torch cannot represent". The official loader
    fails on most of these too, with a torch TypeError/RuntimeError.

`sniff` tells a safetensors file by its first bytes (a plausible N followed by `{`), whatever its name;
io/sources.py opens such a file as safetensors even when it is named .ckpt/.pt/.bin.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct

import numpy as np

from ..errors import BadCheckpoint
from .spec import SAFETENSORS_DTYPES, TensorSpec

MAX_HEADER_BYTES = 100_000_000  # the official library's cap (SafeTensorError::HeaderTooLarge)
MAX_JSON_DEPTH = 127  # the official JSON parser (serde_json) refuses the 128th nesting level
U64_MAX = 2 ** 64 - 1
I64_MAX = 2 ** 63 - 1
_WHITESPACE = b" \t\r\n"

# Every dtype name the official library knows, with its size in bits.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")

_DEPTH_CHUNK = 1 << 20
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_CHAR = re.compile("[\ud800-\udfff]")


class _Reject(Exception):
    """Internal: the header breaks a rule; turned into BadCheckpoint with the file's name."""


class _Float:
    """A JSON number that is not an integer in [-2**63, 2**64): valid JSON, never a usize."""
    __slots__ = ("value",)

    def __init__(self, value: float):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


# A JSON object is parsed into the tuple of its (key, value) pairs (object_pairs_hook=tuple): duplicate
# keys stay visible, and a tuple is never a JSON array (those are lists).
_Object = tuple


def _parse_int(text: str):
    if len(text) <= 18:  # the common case: fits either way
        return int(text) if text != "-0" else _Float(-0.0)  # the official parser reads -0 as a float
    if len(text) <= 21:
        value = int(text)
        if -2 ** 63 <= value <= U64_MAX:
            return value
    value = float(text)  # no int() of a huge digit string
    if math.isinf(value):
        raise _Reject(f"number out of range ({text[:20]}...)")
    return _Float(value)


def _parse_float(text: str):
    value = float(text)
    if math.isinf(value):
        raise _Reject(f"number out of range ({text[:40]})")
    return _Float(value)


def _parse_constant(text: str):
    raise _Reject(f"{text} is not valid JSON")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings: exact for valid JSON (once past MAX_JSON_DEPTH it
    stops and returns the depth reached). Linear time and bounded memory for any input (vectorised
    over 1 MiB chunks: no regex backtracking, no recursion).

    A quote delimits a string iff an even number of backslashes precedes it (valid JSON has no
    backslash outside strings), so the parity of delimiting quotes tells which bytes are inside one."""
    codes = np.frombuffer(raw, dtype=np.uint8)
    depth = best = 0
    inside = 0  # 1 while in a string at the chunk boundary
    run = 0  # backslashes just before the chunk
    for start in range(0, len(codes), _DEPTH_CHUNK):
        chunk = codes[start:start + _DEPTH_CHUNK]
        n = len(chunk)
        backslash = chunk == 0x5C
        last_plain = np.where(backslash, -1 - run, np.arange(n, dtype=np.int64))
        np.maximum.accumulate(last_plain, out=last_plain)  # last non-backslash at or before i
        before = np.empty(n, dtype=np.int64)  # backslashes ending just before i
        before[0] = run
        before[1:] = np.arange(n - 1, dtype=np.int64) - last_plain[:-1]
        delimiter = (chunk == 0x22) & (before % 2 == 0)
        parity = (np.cumsum(delimiter, dtype=np.int64) + inside) % 2
        outside = parity == 0
        step = (((chunk == 0x5B) | (chunk == 0x7B)).astype(np.int64)
                - ((chunk == 0x5D) | (chunk == 0x7D))) * outside
        levels = np.cumsum(step) + depth
        best = max(best, int(levels.max()))
        if best > MAX_JSON_DEPTH:
            return best
        depth, inside = int(levels[-1]), int(parity[-1])
        run = int(n - 1 - last_plain[-1]) if backslash[-1] else 0
    return best


def _has_surrogate(value) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_CHAR.search(item):
                return True
        elif isinstance(item, _Object):
            for key, sub in item:
                if _SURROGATE_CHAR.search(key):
                    return True
                stack.append(sub)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _load_json(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(f"not UTF-8 at byte {exc.start}") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise _Reject(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, object_pairs_hook=tuple, parse_int=_parse_int,
                           parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:  # not reachable after the depth scan; kept as a last line of defence
        raise _Reject("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError
        raise _Reject(str(exc).splitlines()[0][:200]) from None
    if _SURROGATE_ESCAPE.search(raw) and _has_surrogate(value):
        raise _Reject("unpaired UTF-16 surrogate escape in a string")
    return value


def _usize(value, what: str) -> int:
    # type() and not isinstance(): True is an int in Python and must not pass as 1.
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise _Reject(f"{what} must be an integer >= 0, got {_show(value)}")
    return value


def _show(value) -> str:
    if isinstance(value, _Object):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value[:40])
    return repr(value)


def _dtype(value) -> str:
    if isinstance(value, _Object) and len(value) == 1 and value[0][1] is None:
        value = value[0][0]  # the official parser also takes {"F32": null}
    if not isinstance(value, str):
        raise _Reject(f"dtype must be a string, got {_show(value)}")
    if value not in DTYPE_BITS:
        raise _Reject(f"unknown dtype {value[:40]!r}")
    return value


def _shape(value) -> tuple[int, ...]:
    if type(value) is not list:
        raise _Reject(f"shape must be an array, got {_show(value)}")
    return tuple(_usize(dim, "every shape dimension") for dim in value)


def _offsets(value) -> tuple[int, int]:
    if type(value) is not list or len(value) != 2:
        raise _Reject(f"data_offsets must be an array of two integers, got {_show(value)}"
                      + (f" of length {len(value)}" if type(value) is list else ""))
    return _usize(value[0], "data_offsets"), _usize(value[1], "data_offsets")


def _entry(value) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if isinstance(value, _Object):
        fields: dict = {}
        for name, sub in value:
            if name in _ENTRY_FIELDS:
                if name in fields:
                    raise _Reject(f"field {name!r} given twice")
                fields[name] = sub
        missing = [name for name in _ENTRY_FIELDS if name not in fields]
        if missing:
            raise _Reject(f"missing field {missing[0]!r}")
        items = [fields[name] for name in _ENTRY_FIELDS]
    elif type(value) is list:
        if len(value) != 3:
            raise _Reject(f"an array entry must be [dtype, shape, data_offsets], got {len(value)} items")
        items = value
    else:
        raise _Reject(f"must be an object with dtype, shape and data_offsets, got {_show(value)}")
    return _dtype(items[0]), _shape(items[1]), _offsets(items[2])


def _metadata(value) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, _Object):
        raise _Reject(f"__metadata__ must be an object of strings, got {_show(value)}")
    out: dict[str, str] = {}
    for key, sub in value:
        if not isinstance(sub, str):
            raise _Reject(f"__metadata__[{key[:60]!r}] must be a string, got {_show(sub)}")
        out[key] = sub  # a duplicate key: the last one wins
    return out


def _numel_checked(shape: tuple[int, ...]) -> int | None:
    """Product of the dimensions, left to right, or None when a partial product passes 2**64 - 1
    (the official check; it never builds an integer wider than 128 bits)."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > U64_MAX:
            return None
    return numel


def _torch_can_hold(shape: tuple[int, ...]) -> bool:
    """torch.empty(shape) works: every dimension and the contiguous strides fit in int64."""
    stride = 1
    for dim in reversed(shape):
        if dim > I64_MAX:
            return False
        stride *= dim or 1
        if stride > I64_MAX:
            return False
    return True


def validate_header(path: str, raw: bytes, file_size: int):
    """Check a header's JSON bytes (N = len(raw)) against a file of `file_size` bytes.

    Returns (specs, offsets, data_start, metadata): TensorSpec per key (JSON order, last duplicate
    wins), (begin, end) per key relative to data_start, data_start = 8 + N, metadata {str: str}."""
    def bad(detail: str) -> BadCheckpoint:
        return BadCheckpoint(f"{path}: corrupt safetensors header ({detail})")

    try:
        header = _load_json(raw)
    except _Reject as exc:
        raise bad(str(exc)) from None
    if not isinstance(header, _Object):
        raise bad(f"not a JSON object but {_show(header)}")
    metadata = None
    entries: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
    for key, value in header:
        try:
            if key == "__metadata__":
                if metadata is not None:
                    raise _Reject("__metadata__ given twice")
                metadata = _metadata(value)
            else:
                entries[key] = _entry(value)  # a duplicate name: the last entry wins
        except _Reject as exc:
            raise BadCheckpoint(f"{path}: corrupt safetensors header entry for {key[:200]!r} ({exc})") from None

    data_start = 8 + len(raw)
    data_size = file_size - data_start
    # Layout, in offset order, exactly as the official library checks it.
    start = 0
    for key, (dtype_name, shape, (begin, end)) in sorted(entries.items(), key=lambda item: item[1][2]):
        if begin > start:
            raise BadCheckpoint(f"{path}: header lies: bytes {start}..{begin} of the data belong to no "
                                f"tensor (gap before {key[:200]!r})")
        if begin < start:
            raise BadCheckpoint(f"{path}: header lies: tensors overlap at bytes {begin}..{start} "
                                f"(tensor {key[:200]!r})")
        if end < begin:
            raise BadCheckpoint(f"{path}: header lies about tensor {key[:200]!r} (it ends at {end}, "
                                f"before its start {begin})")
        start = end
        numel = _numel_checked(shape)
        nbits = None if numel is None else numel * DTYPE_BITS[dtype_name]
        if nbits is None or nbits > U64_MAX:
            raise BadCheckpoint(f"{path}: header lies about tensor {key[:200]!r} (shape "
                                f"{_short(shape)} {dtype_name} is too large to exist)")
        if nbits % 8:
            raise BadCheckpoint(f"{path}: header lies about tensor {key[:200]!r} (shape {_short(shape)} "
                                f"{dtype_name} is not a whole number of bytes)")
        if end - begin != nbits // 8:
            raise BadCheckpoint(
                f"{path}: header lies about tensor {key[:200]!r} (offsets {begin}..{end} for shape "
                f"{_short(shape)} {dtype_name} = {nbits // 8} bytes)")
        if end > data_size:
            raise BadCheckpoint(f"{path}: truncated file: tensor {key[:200]!r} ends at byte "
                                f"{data_start + end}, file has {file_size}")
    if start != data_size:
        raise BadCheckpoint(f"{path}: corrupt safetensors file: {data_size - start} bytes after the last "
                            f"tensor belong to no tensor")

    specs: dict[str, TensorSpec] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for key, (dtype_name, shape, span) in entries.items():
        if dtype_name not in SAFETENSORS_DTYPES:
            raise BadCheckpoint(f"{path}: tensor {key[:200]!r} has unsupported dtype {dtype_name} "
                                f"(Manifold Merge reads {', '.join(SAFETENSORS_DTYPES)})")
        if 0 in shape and not _torch_can_hold(shape):  # otherwise numel <= file size bounds all
            raise BadCheckpoint(f"{path}: tensor {key[:200]!r} has a shape torch cannot represent "
                                f"({_short(shape)})")
        specs[key] = TensorSpec(shape, SAFETENSORS_DTYPES[dtype_name])
        offsets[key] = span
    return specs, offsets, data_start, metadata or {}


def _short(shape: tuple[int, ...]) -> str:
    text = str(list(shape))
    return text if len(text) <= 120 else text[:117] + "...]"


def _pread(fd: int, n: int, offset: int) -> bytes:
    chunks = []
    while n > 0:
        if hasattr(os, "pread"):
            chunk = os.pread(fd, n, offset)
        else:  # Windows
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def header_length(path: str, first8: bytes, file_size: int) -> int:
    """N from the first 8 bytes, checked against the cap and the file size."""
    if file_size < 8 or len(first8) < 8:
        raise BadCheckpoint(f"{path}: not a safetensors file (only {file_size} bytes)")
    (header_len,) = struct.unpack("<Q", first8[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise BadCheckpoint(
            f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, "
            f"file has {file_size}{'' if header_len <= MAX_HEADER_BYTES else f'; at most {MAX_HEADER_BYTES} allowed'})")
    return header_len


def read_header(path: str, fd: int, file_size: int):
    """Read and validate the header of the open file `fd`; see validate_header for the result."""
    header_len = header_length(path, _pread(fd, 8, 0), file_size)
    raw = _pread(fd, header_len, 8)
    if len(raw) != header_len:
        raise BadCheckpoint(f"{path}: truncated while reading the safetensors header")
    return validate_header(path, raw, file_size)


def sniff(first: bytes, file_size: int) -> str | None:
    """What the first bytes of a file say it is: "safetensors" (a plausible header length followed
    by `{`), "zip" (torch.save's format), "pickle" (legacy torch.save / plain pickle), or None."""
    if len(first) >= 9 and file_size >= 10:
        (header_len,) = struct.unpack("<Q", first[:8])
        if 2 <= header_len <= min(MAX_HEADER_BYTES, file_size - 8):
            body = first[8:8 + header_len].lstrip(_WHITESPACE)
            if body[:1] == b"{":
                return "safetensors"
    if first[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(first) >= 2 and first[0] == 0x80 and 2 <= first[1] <= 5:
        return "pickle"
    return None

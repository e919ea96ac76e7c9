"""Hostile safetensors headers: the reader's only failure is BadCheckpoint, and its verdict agrees
with the official `safetensors` library on the same bytes (the rules: merge_core/io/header.py).

The hypothesis tests keep no example database (database=None: no .hypothesis folder in the tree) and
print how many cases they ran (`pytest -s` shows it)."""
import json
import math
import pickle
import random
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merge_core.errors import BadCheckpoint, UnsafeCheckpoint
from merge_core.io import SafetensorsReader, open_model, save_safetensors
from merge_core.io import header as header_module
from merge_core.io.header import MAX_HEADER_BYTES, MAX_JSON_DEPTH, json_depth
from merge_core.io.spec import SAFETENSORS_DTYPES, dtype_size

FUZZ = settings(max_examples=1200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BYTE_FUZZ = settings(max_examples=800, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])

# Files the official library reads but this reader refuses on purpose (documented in io/header.py).
DIVERGENCE = re.compile(r"unsupported dtype|shape torch cannot represent")


# ---------------------------------------------------------------- the two readers, side by side

def ours(path):
    """('accept', {key: (shape, dtype, bytes)}, metadata) or ('reject', message). Any exception other
    than BadCheckpoint escapes and fails the test."""
    try:
        reader = SafetensorsReader(path)
    except BadCheckpoint as exc:
        return "reject", str(exc)
    try:
        tensors = {}
        for key in reader.keys():
            t = reader.load(key)
            tensors[key] = (tuple(t.shape), t.dtype, _raw(t))
        return "accept", tensors, dict(reader.metadata)
    finally:
        reader.close()


def official(path):
    try:
        loaded = safetensors.torch.load_file(path)
        with safetensors.safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - the official verdict, whatever its exception type
        return "reject", f"{type(exc).__name__}: {exc}"
    return "accept", {k: (tuple(t.shape), t.dtype, _raw(t)) for k, t in loaded.items()}, dict(metadata)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_agree(path) -> str:
    mine, theirs = ours(path), official(path)
    if theirs[0] == "accept" and mine[0] == "reject":
        assert DIVERGENCE.search(mine[1]), f"official accepts, we refuse: {mine[1]}"
        return "divergence"
    assert mine[0] == theirs[0], f"we {mine[0]}, official {theirs[0]}: {theirs[1] if theirs[0] == 'reject' else ''}"
    if mine[0] == "accept":
        assert mine[1] == theirs[1]  # same keys, shapes, dtypes and bytes
        assert mine[2] == theirs[2]  # same metadata
    else:
        assert mine[1].startswith(str(path)), mine[1]  # the message names the file
    return mine[0]


def frame(header_text: str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    body = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(body) if length is None else length) + body + data


# ---------------------------------------------------------------- 1. structured hostile headers

OUR_DTYPES = sorted(SAFETENSORS_DTYPES)
BAD_USIZE = ['"4"', "4.0", "64.9", "-1", "-0", "true", "false", "null", "1e400", "-1e400", "1e30", "NaN",
             "Infinity", "18446744073709551615", "18446744073709551616", "9223372036854775808", "[4]", "{}",
             "1E2", "0.5e1", "9" * 400, "[[[]]]", '"\\ud800"']
BAD_DTYPES = ['"f32"', '"XX"', '["F32"]', '{"F32":1}', '{"F32":null,"F16":null}', "32", "null", '""', "true",
              '"U16"', '"F8_E8M0"', '"C64"', '"F4"', '"F32 "']
BAD_SHAPES = ["64.9", '"[2]"', "null", "{}", "4", "[[2]]", "[1e400]", "[true]", "[2.0]", "[-0]"]
BAD_OFFSETS = ["[0]", "[0,4,8]", '{"0":0,"1":4}', '"0,4"', "null", "[]", "[[0,4]]", "[4,0]"]
# Values of ignored fields: the first list is fine anywhere, the second is refused anywhere.
EXTRA_OK = ["1", "-0", "1e-400", "1e308", "9" * 30, "9" * 308, '"x"', '"\\ud83d\\ude00"', "null", "[]", "{}",
            '{"dtype":"XX"}', "[" * 125 + "]" * 125, '"[[[[[["', '{"a":1,"a":2}']
EXTRA_BAD = ["1e400", "-1e400", "9" * 309, "NaN", "-Infinity", '"\\udc00"', '"\\ud800x"', "[" * 126 + "]" * 126,
             "[" * 126 + "]" * 126, "[" * 200 + "]" * 200, '{"a":' * 126 + "1" + "}" * 126, "01", "[1,]"]
EXTRA_VALUES = st.one_of(st.sampled_from(EXTRA_OK), st.sampled_from(EXTRA_BAD))
BAD_METADATA = ["null", "{}", '{"a":"b"}', '{"a":1}', '{"a":null}', "[]", '"x"', '{"a":"b","a":"c"}',
                '{"a":"b","a":"c"}', '{"a":1,"a":"c"}', '{"a":"c","a":1}', '{"\\ud800":"x"}', '{"a":["b"]}',
                '{"a":"\\u00e9\\ud83d\\ude00"}']


def near_usize(value: int) -> list[str]:
    """Wrong-typed spellings of a right value: a reader that coerces them gets the layout right."""
    return [f"{value}.0", f"{value}e0", f"{value}.9", f'"{value}"', f"[{value}]", str(value + 2 ** 64),
            str(-value or "-0")]


CATEGORIES = ["name", "dtype", "number", "number", "shape", "offsets", "form", "missing", "twice", "extra",
              "extra", "extra", "metadata", "metadata", "metadata twice", "text", "lead", "pad", "data length",
              "header length"]


class Sites:
    """Where hostile values go: nowhere; in exactly one place of one category (then that one broken
    rule decides the verdict); or anywhere, at random."""

    def __init__(self, draw):
        self.draw = draw
        self.mode = draw(st.sampled_from(["valid", "one", "one", "one", "one", "many"]))
        self.category = draw(st.sampled_from(CATEGORIES))
        self.target = draw(st.integers(0, 1))
        self.seen = Counter()

    def hit(self, category: str) -> bool:
        self.seen[category] += 1
        if self.mode == "one":
            return category == self.category and self.seen[category] - 1 == self.target
        return self.mode == "many" and self.draw(st.integers(0, 6)) == 0

    def pick(self, category: str, valid, bad):
        return self.draw(bad) if self.hit(category) else valid


@st.composite
def header_case(draw):
    """A header built field by field from valid and hostile parts, as raw JSON text."""
    sites = Sites(draw)
    n = draw(st.integers(0, 4))
    names = [sites.pick("name", draw(st.sampled_from(["a", "b", "c", "w", "", "\\u0061", "caf\u00e9", "x.y/z"])),
                        st.sampled_from(["__metadata__", "\\ud800", "\\udc00x", 'a\\"', "a\\u0000"]))
             for _ in range(n)]
    entries, offset = [], 0
    for _ in names:
        dtype = draw(st.sampled_from(OUR_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = math.prod(shape) * dtype_size(SAFETENSORS_DTYPES[dtype])
        entries.append([json.dumps(dtype), shape, [offset, offset + nbytes]])
        offset += nbytes

    def number(value: int) -> str:
        near = st.sampled_from(near_usize(value))
        boolean = st.just({0: "false", 1: "true"}.get(value, "true"))  # right value, wrong type for 0, 1
        return sites.pick("number", str(value), st.one_of(
            near, boolean, st.sampled_from(BAD_USIZE), st.integers(-3, 2 ** 70).map(str)))

    parts = []
    for name, (dtype, shape, offs) in zip(names, entries):
        dtype_t = sites.pick("dtype", dtype, st.sampled_from(BAD_DTYPES + ['{"F32":null}', "{%s:null}" % dtype]))
        shape_t = sites.pick("shape", "[" + ",".join(number(d) for d in shape) + "]", st.sampled_from(BAD_SHAPES))
        offs_t = sites.pick("offsets", f"[{number(offs[0])},{number(offs[1])}]", st.sampled_from(BAD_OFFSETS))
        form = sites.pick("form", "object", st.sampled_from(["array", "array4", "scalar"]))
        if form == "object":
            fields = [("dtype", dtype_t), ("shape", shape_t), ("data_offsets", offs_t)]
            if sites.hit("missing"):
                fields.pop(draw(st.integers(0, 2)))
            if sites.hit("twice"):
                fields.append(draw(st.sampled_from(fields)))
            if sites.hit("extra"):
                for _ in range(draw(st.integers(1, 3))):
                    fields.append((draw(st.sampled_from(["x", "extra", "__metadata__", "Dtype"])),
                                   draw(EXTRA_VALUES)))
            fields = draw(st.permutations(fields))
            value = "{" + ",".join(f'"{k}":{v}' for k, v in fields) + "}"
        elif form == "array":
            value = f"[{dtype_t},{shape_t},{offs_t}]"
        elif form == "array4":
            value = f"[{dtype_t},{shape_t},{offs_t},0]"
        else:
            value = draw(st.sampled_from(["5", "null", '"x"', "[]", "true"]))
        parts.append(f'"{name}":{value}')
    metadata = sites.pick("metadata", draw(st.sampled_from([None, None, "{}", '{"a":"b"}', '{"k":"\\u00e9"}'])),
                          st.sampled_from(BAD_METADATA))
    if metadata is not None:
        parts.insert(draw(st.integers(0, len(parts))), '"__metadata__":' + metadata)
    if sites.hit("metadata twice"):
        parts.append('"__metadata__":' + draw(st.sampled_from(["{}", "null"])))
    parts = draw(st.permutations(parts))
    text = sites.pick("text", "{" + ",".join(parts) + "}",
                      st.sampled_from(["[]", "null", "", "{", '{"a":1,}', "\ufeff{}", "1", '{"a":NaN}']))
    lead = sites.pick("lead", "", st.sampled_from([" ", "\n\t\r", "\x0c", "\x00"]))
    pad = draw(st.sampled_from(["", " ", "   ", " " * 7, "\r\n"])) if draw(st.booleans()) else ""
    pad = sites.pick("pad", pad, st.sampled_from(["\x00", " \x00", "x"]))
    body = (lead + text + pad).encode()
    data_len = max(0, offset + sites.pick("data length", 0, st.sampled_from([1, -1, 4, -4, 64])))
    length = max(0, len(body) + sites.pick("header length", 0, st.sampled_from([1, -1, 8, -len(body)])))
    data = random.Random(draw(st.integers(0, 2 ** 32))).randbytes(data_len)
    return frame(body, data, length)


def test_structured_hostile_headers_agree_with_the_official_library():
    verdicts = Counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.safetensors"

        @FUZZ
        @given(header_case())
        def check(blob):
            path.write_bytes(blob)
            verdicts[assert_agree(path)] += 1

        check()
    print(f"\nstructured header cases: {sum(verdicts.values())} ({dict(verdicts)})")
    # The mix is meaningful: many files both readers accept, many both refuse.
    assert verdicts["accept"] >= 50 and verdicts["reject"] >= 100, verdicts


# ---------------------------------------------------------------- 2. byte-level mutations

def _valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.safetensors"
        safetensors.torch.save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                     "b": torch.tensor([1, 2], dtype=torch.int16),
                                     "e": torch.zeros(0, 3, dtype=torch.bfloat16)}, path, {"k": "v"})
        return path.read_bytes()


VALID = _valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@st.composite
def mutated_file(draw):
    blob = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "digit", "truncate", "length"]))
        pos = draw(st.integers(0, max(0, min(len(blob), HEADER_END) - 1)))
        if kind == "flip" and blob:
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and blob:
            blob[pos] = draw(st.sampled_from(b'{}[]",:-.0123456789eE \x00\xff\\tn'))
        elif kind == "insert":
            blob[pos:pos] = draw(st.sampled_from([b"[", b"[" * 300, b"9" * 25, b".5", b"e400", b"-", b"\\ud800",
                                                  b'"', b",", b" ", b"true"]))
        elif kind == "delete":
            del blob[pos:pos + draw(st.integers(1, 4))]
        elif kind == "digit":
            digits = [m.start() for m in re.finditer(rb"\d", bytes(blob[8:HEADER_END]))]
            if digits:
                i = 8 + draw(st.sampled_from(digits))
                blob[i:i + 1] = draw(st.sampled_from([b"0", b"9", b"99999999999999999999999", b"1.5", b"-1"]))
        elif kind == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        elif kind == "length" and len(blob) >= 8:
            n = struct.unpack("<Q", blob[:8])[0] + draw(st.integers(-3, 3))
            blob[:8] = struct.pack("<Q", max(0, n))
    return bytes(blob)


def test_mutated_header_bytes_only_ever_raise_bad_checkpoint():
    verdicts = Counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutant.safetensors"

        @BYTE_FUZZ
        @given(mutated_file())
        def check(blob):
            path.write_bytes(blob)
            verdicts[assert_agree(path)] += 1

        check()
    print(f"\nbyte-mutation cases: {sum(verdicts.values())} ({dict(verdicts)})")
    assert verdicts["reject"] >= 100, verdicts


# ---------------------------------------------------------------- 3. one regression per class

def _entry(dtype='"F32"', shape="[2]", offsets="[0,8]"):
    return '{"w":{"dtype":%s,"shape":%s,"data_offsets":%s}}' % (dtype, shape, offsets)


REFUSED = {
    "offsets as strings": (_entry(offsets='["0","8"]'), 8, "data_offsets must be an integer"),
    "offsets as floats": (_entry(offsets="[0,8.0]"), 8, "data_offsets must be an integer"),
    "offsets reversed": (_entry(shape="[0]", offsets="[8,0]"), 8, "header lies"),
    "offsets of length 3": (_entry(offsets="[0,8,8]"), 8, "two integers"),
    "dtype a list": (_entry(dtype='["F32"]'), 8, "dtype must be a string"),
    "dtype an object": (_entry(dtype='{"a":1}'), 8, "dtype must be a string"),
    "dtype a number": (_entry(dtype="32"), 8, "dtype must be a string"),
    "dtype unknown": (_entry(dtype='"f32"'), 8, "unknown dtype"),
    "shape 1e400": (_entry(shape="[1e400]"), 8, "number out of range"),
    "shape 1e30 x 0": (_entry(shape="[1e30,0]", offsets="[0,0]"), 0, "shape dimension"),
    "shape 64.9": (_entry(shape="[64.9]", offsets="[0,256]"), 256, "shape dimension must be an integer"),
    "shape 64.0": (_entry(shape="[64.0]", offsets="[0,256]"), 256, "shape dimension must be an integer"),
    "shape negative": (_entry(shape="[-2]"), 8, "shape dimension"),
    "shape -0": (_entry(shape="[-0]", offsets="[0,0]"), 0, "shape dimension"),
    "shape true": (_entry(shape="[true,2]"), 8, "got true"),
    "offset true": (_entry(shape="[1]", offsets="[false,true]"), 4, "got false"),
    "shape huge ints": (_entry(shape="[4294967296,4294967296,4294967296]", offsets="[0,0]"), 0, "too large"),
    "shape huge then 0": (_entry(shape="[4294967296,4294967296,0]", offsets="[0,0]"), 0, "too large"),
    "shape beyond u64": (_entry(shape="[18446744073709551616]", offsets="[0,0]"), 0, "shape dimension"),
    "shape 400 digits": (_entry(shape="[" + "9" * 400 + "]"), 8, "number out of range"),
    "NaN": (_entry(shape="[NaN]"), 8, "NaN is not valid JSON"),
    "NaN in an ignored field": (_entry(shape='[2],"x":NaN'), 8, "NaN is not valid JSON"),
    "1e400 in an ignored field": (_entry(shape='[2],"x":[1e400]'), 8, "number out of range"),
    "309 digits in an ignored field": (_entry(shape='[2],"x":' + "9" * 309), 8, "number out of range"),
    "lone surrogate in an ignored field": (_entry(shape='[2],"x":{"\\udc00":1}'), 8, "surrogate"),
    "100k nested [": ("[" * 100_000, 0, "nested deeper than 127"),
    "100k nested { in metadata": ('{"__metadata__":' + '{"a":' * 100_000, 0, "nested deeper"),
    "128 levels in an ignored field": (_entry(shape='[2],"x":' + "[" * 126 + "]" * 126), 8, "nested deeper"),
    "gap": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            '"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', 12, "belong to no tensor"),
    "overlap": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12, "overlap"),
    "trailing bytes": (_entry(), 9, "1 bytes after the last tensor"),
    "data not starting at 0": (_entry(shape="[1]", offsets="[4,8]"), 8, "belong to no tensor"),
    "__metadata__ value an int": ('{"__metadata__":{"a":1}}', 0, "must be a string"),
    "__metadata__ a list": ('{"__metadata__":["a"]}', 0, "__metadata__ must be an object"),
    "__metadata__ twice": ('{"__metadata__":{},"__metadata__":{}}', 0, "given twice"),
    "field twice": ('{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, "given twice"),
    "field missing": ('{"w":{"dtype":"F32","shape":[2]}}', 8, "missing field 'data_offsets'"),
    "entry a number": ('{"w":5}', 0, "must be an object"),
    "duplicate name, first broken": ('{"w":5,"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8,
                                     "must be an object"),
    "not an object": ("[]", 0, "not a JSON object"),
    "empty header": ("", 0, "corrupt safetensors header"),
    "NUL padding": ("{}\x00\x00", 0, "corrupt safetensors header"),
    "lone surrogate": ('{"__metadata__":{"a":"\\ud800"}}', 0, "surrogate"),
    "control character": ('{"__metadata__":{"a":"\x01"}}', 0, "corrupt safetensors header"),
    "unsupported dtype U16": (_entry(dtype='"U16"', offsets="[0,4]"), 4, "unsupported dtype U16"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_each_hostile_class_is_a_bad_checkpoint_naming_the_file(tmp_path, case):
    header, data_len, message = REFUSED[case]
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(frame(header, bytes(data_len)))
    with pytest.raises(BadCheckpoint) as info:
        open_model(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    assert message in text, text
    verdict = official(path)[0]
    assert verdict == ("accept" if "unsupported dtype" in message else "reject")  # and the official library agrees


ACCEPTED = {
    "unsorted offsets": ('{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},'
                         '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8),
    "extra fields": ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[[1]],"y":1e308}}', 8),
    "duplicate name, last wins": ('{"w":{"dtype":"F32","shape":[9],"data_offsets":[9,0]},'
                                  '"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    "duplicate metadata key, last wins": ('{"__metadata__":{"a":"1","a":"2"}}', 0),
    "null metadata": ('{"__metadata__":null}', 0),
    "empty header {}": ("{}", 0),
    "space padding, length not a multiple of 8": ("{}   ", 0),
    "leading whitespace": ("\n\t {}", 0),
    "array entry": ('{"w":["F32",[2],[0,8]]}', 8),
    "dtype as a one-key object": ('{"w":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', 8),
    "zero-size tensors sharing an offset": ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
                                            '"b":{"dtype":"I8","shape":[0,5],"data_offsets":[0,0]},'
                                            '"c":{"dtype":"F16","shape":[],"data_offsets":[0,2]}}', 2),
    "126 levels in an ignored field": (_entry(shape='[2],"x":' + "[" * 125 + "]" * 125), 8),
    "308 digits, -0 and 1e-400 in ignored fields": (_entry(shape='[2],"x":[%s,-0,1e-400]' % ("9" * 308)), 8),
    "fp8": ('{"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]},'
            '"b":{"dtype":"F8_E5M2","shape":[2],"data_offsets":[2,4]}}', 4),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_what_the_official_library_accepts_is_read(tmp_path, case):
    header, data_len = ACCEPTED[case]
    if case == "fp8" and "F8_E4M3" not in SAFETENSORS_DTYPES:
        pytest.skip("this torch has no float8 dtypes")
    path = tmp_path / "odd.safetensors"
    path.write_bytes(frame(header, bytes(range(data_len))))
    assert assert_agree(path) == "accept"


def test_short_and_empty_files(tmp_path):
    path = tmp_path / "short.safetensors"
    for blob in (b"", b"\x02\x00\x00", frame("{}")[:7]):
        path.write_bytes(blob)
        with pytest.raises(BadCheckpoint, match=re.escape(f"{path}: not a safetensors file")):
            open_model(path)
        assert official(path)[0] == "reject"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(BadCheckpoint, match="header claims 100000001 bytes"):
        open_model(path)


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])
def test_depth_scan_counts_only_brackets_outside_strings(monkeypatch, chunk):
    monkeypatch.setattr(header_module, "_DEPTH_CHUNK", chunk)  # small chunks: state carried across them
    assert json_depth(b'{"a":"' + b"[" * 500 + b'"}') == 1
    assert json_depth(b'["\\\\\\"' + b"[" * 200 + b'"]') == 1  # \\ then \" : still inside the string
    assert json_depth(b'{"a\\"[[[":' + b"[" * 126 + b"]" * 126 + b"}") == 127
    assert json_depth(b'["\\\\",' + b"[" * 200 + b"]" * 200 + b"]") > MAX_JSON_DEPTH  # \\ ends nothing


@settings(max_examples=300, deadline=None, database=None)
@given(st.recursive(st.none() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.text(alphabet='[]{}"\\k', max_size=3), inner, max_size=3), max_leaves=12),
       st.integers(0, 130), st.sampled_from([3, 5, 64]))
def test_depth_scan_is_exact_on_valid_json(value, wrap, chunk):
    def depth(v):
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 1 + max(map(depth, v), default=0) if isinstance(v, list) else 0
    for _ in range(wrap):
        value = [value]
    old, header_module._DEPTH_CHUNK = header_module._DEPTH_CHUNK, chunk
    try:
        got = json_depth(json.dumps(value).encode())
    finally:
        header_module._DEPTH_CHUNK = old
    assert got == depth(value) if depth(value) <= MAX_JSON_DEPTH else got > MAX_JSON_DEPTH


def test_hostile_strings_do_not_make_the_depth_scan_slow(tmp_path):
    """Escaped quotes that never close (a regex-based string skipper would go quadratic on them)."""
    path = tmp_path / "slow.safetensors"
    path.write_bytes(frame(b"[]" * 200 + b'["' + b'\\"' * 5_000_000))
    with pytest.raises(BadCheckpoint, match="corrupt safetensors header"):
        open_model(path)


def test_the_cap_is_the_official_one(tmp_path):
    """A header of exactly 100_000_000 bytes is allowed (spaces after `{}`), one more is not."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(frame(b"{}" + b" " * (MAX_HEADER_BYTES - 2)))
    assert assert_agree(path) == "accept"
    path.write_bytes(frame(b"{}" + b" " * (MAX_HEADER_BYTES - 1)))
    assert assert_agree(path) == "reject"


# ---------------------------------------------------------------- 4. the content decides, not the name

def test_safetensors_named_ckpt_is_read_as_safetensors(tmp_path):
    sd = {"w": torch.randn(3, 4), "i": torch.arange(5)}
    for suffix in (".ckpt", ".pt", ".bin", ".pth", ".model"):
        path = tmp_path / f"renamed{suffix}"
        save_safetensors(path, sd, {"k": "v"})
        with open_model(path) as src:
            assert type(src).__name__ == "SafetensorsSource"
            assert src.metadata == {"k": "v"} and set(src.keys()) == set(sd)
            assert all(torch.equal(src.load(k), v) for k, v in sd.items())


def test_pickle_named_safetensors_loads_through_weights_only(tmp_path):
    sd = {"w": torch.randn(3, 3), "pos": torch.arange(3)}
    zipped = tmp_path / "zip.safetensors"
    torch.save({"state_dict": sd}, zipped)
    legacy = tmp_path / "legacy.safetensors"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, legacy):
        with open_model(path) as src:
            assert set(src.keys()) == {"w", "pos"} and torch.equal(src.load("w"), sd["w"])


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_named_safetensors_that_runs_code_is_refused_clearly(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(2), "payload": _Evil(str(marker))}, bad)
    with pytest.raises(UnsafeCheckpoint, match=re.escape(f"{bad}: is a pickled PyTorch checkpoint, not a "
                                                         f"safetensors file (rename it to .ckpt), and it was refused")):
        open_model(bad)
    assert not marker.exists()
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(BadCheckpoint, match="is a pickled PyTorch checkpoint"):
        open_model(raw)
    assert not marker.exists()
    broken = tmp_path / "broken.safetensors"
    torch.save({"w": torch.randn(100)}, broken)
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(BadCheckpoint, match=r"broken\.safetensors: is a pickled PyTorch checkpoint.*corrupt"):
        open_model(broken)

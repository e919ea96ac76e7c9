"""Architecture detection from key names and shapes (no tensor data read).

Works on full checkpoints (LDM/SGM layout, or as ComfyUI saves SD3/Flux), on
bare UNet/DiT state dicts (`diffusion_model.` prefix, as a ComfyUI MODEL holds
them, or no prefix), on text-encoder-only dicts, and on language models by key layout (lm.py).

The diffusion architectures are data: every `data/architectures/<name>.json` has a `"detect"` section
that this module evaluates, in the sections' `order` (lowest first):

    "detect": {
      "order": 40,
      "signatures": [{"unet_key": "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                      "shape": [null, 768]},            # any one matching names the architecture
                     {"prefix": "conditioner.embedders."}],
      "text_encoder_prefixes": ["cond_stage_model.transformer."],   # text-encoder-only dicts
      "markers": ["input_blocks", "down_blocks"]        # name fragments (key lists without shapes)
    }

A `unet_key` is looked up under every prefix the architecture's `hosts` give its UNet region (checkpoint,
ComfyUI MODEL, bare). A `shape` lists the dimensions (null: any); a signature key found with that rank but
no architecture's shape is an unknown model. This module reads the JSON itself (blocks.py builds on it), so
it imports nothing of blocks.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .errors import MergeError
from .lm import FAMILIES as LM_FAMILIES
from .lm import detect_layout as _detect_lm_layout

DATA_DIR = Path(__file__).parent / "data" / "architectures"


# ---------------------------------------------------------------------------------------------
# the data files

@lru_cache(maxsize=None)
def _read_dir(data_dir: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted(Path(data_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MergeError(f"architecture data {path}: not readable JSON ({e})") from None
        if not isinstance(data, dict) or data.get("name") != path.stem:
            raise MergeError(f"architecture data {path}: expected an object whose \"name\" is {path.stem!r}")
        _check_shape(data, path)
        out[path.stem] = data
    return out


def _check_shape(data: dict, path: Path) -> None:
    """The parts detection reads: a one-line error naming the file rather than a traceback later."""
    detect = data.get("detect", {})
    if not isinstance(detect, dict):
        raise MergeError(f"architecture data {path}: \"detect\" must be an object")
    order = detect.get("order", 0)
    if isinstance(order, bool) or not isinstance(order, (int, float)):
        raise MergeError(f"architecture data {path}: detect \"order\" must be a number, not {order!r}")
    for field in ("text_encoder_prefixes", "markers", "signatures", "partial"):
        value = detect.get(field, []) if field != "partial" else data.get(field, [])
        if not isinstance(value, list):
            raise MergeError(f"architecture data {path}: {field!r} must be a list")
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict) or not all(
            isinstance(entries, list) and all(isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e)
                                              for e in entries) for entries in hosts.values()):
        raise MergeError(f"architecture data {path}: \"hosts\" must map each naming to [prefix, region] pairs")
    components = data.get("components", {})
    if not isinstance(components, dict) or not all(isinstance(c, dict) for c in components.values()):
        raise MergeError(f"architecture data {path}: \"components\" must map each component to an object")


def architecture_data(data_dir=None) -> dict[str, dict]:
    """name -> the parsed `<name>.json` of every architecture in `data_dir` (default: merge_core's own),
    in detection order. Read once per folder."""
    data = _read_dir(str(Path(data_dir) if data_dir is not None else DATA_DIR))
    return dict(sorted(data.items(), key=lambda kv: (kv[1].get("detect", {}).get("order", 1_000_000), kv[0])))


def unet_prefixes(data: Mapping) -> tuple[str, ...]:
    """Every prefix the architecture's hosts give its UNet/DiT region (the region of the `unet` naming),
    longest first: model.diffusion_model. (checkpoint), diffusion_model. (ComfyUI MODEL), '' (bare)."""
    hosts = data.get("hosts", {})
    regions = {region for _, region in hosts.get("unet", ())}
    out: list[str] = []
    for entries in hosts.values():
        for prefix, region in entries:
            if region in regions and prefix not in out:
                out.append(prefix)
    return tuple(sorted(out, key=lambda p: -len(p)))


class _Detector:
    """One architecture's detect section, checked (a bad section is a one-line MergeError)."""

    def __init__(self, name: str, data: Mapping, where: str):
        spec = data.get("detect", {})
        self.name = name
        self.unet_prefixes = unet_prefixes(data)
        self.signatures: list[tuple[str, str, tuple | None]] = []
        for sig in spec.get("signatures", ()):
            if not isinstance(sig, Mapping) or len({"unet_key", "prefix"} & set(sig)) != 1:
                raise MergeError(f"{where}: a detect signature needs one of \"unet_key\" or \"prefix\": {sig!r}")
            shape = sig.get("shape")
            if shape is not None and (not isinstance(shape, list)
                                      or not all(d is None or isinstance(d, int) for d in shape)):
                raise MergeError(f"{where}: detect signature shape {shape!r} is not a list of sizes (null: any)")
            if "unet_key" in sig:
                self.signatures.append(("unet_key", str(sig["unet_key"]), tuple(shape) if shape is not None else None))
            else:
                self.signatures.append(("prefix", str(sig["prefix"]), None))
        self.text_encoder_prefixes = tuple(str(p) for p in spec.get("text_encoder_prefixes", ()))
        self.markers = tuple(str(m) for m in spec.get("markers", ()))
        hosts = data.get("hosts", {})
        # the text encoders' heads in a ComfyUI CLIP (clip_l., clip_g., t5xxl.) and in kohya LoRA names
        self.clip_heads = frozenset(p for p, _ in hosts.get("comfy_clip", ()))
        self.lora_heads = frozenset(c["lora_prefix"] for c in data.get("components", {}).values()
                                    if c.get("lora_prefix"))


@lru_cache(maxsize=None)
def _detectors_for(data_dir: str) -> tuple[_Detector, ...]:
    return tuple(_Detector(name, data, f"architecture data {Path(data_dir) / (name + '.json')}")
                 for name, data in architecture_data(data_dir).items())


def _detectors(data_dir=None) -> tuple[_Detector, ...]:
    return _detectors_for(str(Path(data_dir) if data_dir is not None else DATA_DIR))


def diffusion_architectures(data_dir=None) -> tuple[str, ...]:
    """The architectures the data defines, in detection order."""
    return tuple(d.name for d in _detectors(data_dir))


_DEFAULT = architecture_data()
ARCHITECTURES = tuple(_DEFAULT) + tuple(LM_FAMILIES) + ("unknown",)
# Every prefix the UNet/DiT has under any host's naming, longest first (the bare one, '', last):
# ("model.diffusion_model.", "diffusion_model.", "").
UNET_PREFIXES = tuple(sorted({p for data in _DEFAULT.values() for p in unet_prefixes(data)}, key=lambda p: -len(p)))
DISPLAY_NAMES = {**{name: data.get("display", name) for name, data in _DEFAULT.items()},
                 **{name: display for name, (display, _) in LM_FAMILIES.items()},
                 "lora": "LoRA (not a checkpoint)", "unknown": "unknown architecture"}


# ---------------------------------------------------------------------------------------------
# detection

def _shape(spec) -> tuple:
    return tuple(spec.shape) if hasattr(spec, "shape") else tuple(spec)


def _find(specs: Mapping, suffix: str, prefixes: tuple[str, ...]):
    for prefix in prefixes:
        if prefix + suffix in specs:
            return _shape(specs[prefix + suffix])
    return None


def _has_prefix(specs: Mapping, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and any(str(k).startswith(prefixes) for k in specs)


def _fits(shape: tuple, want: tuple) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def detect_diffusion(specs: Mapping, data_dir=None) -> str | None:
    """The diffusion architecture the data's detect sections give `specs`, 'unknown' for a model with a
    signature key of an unknown shape, or None (nothing of a diffusion model found)."""
    detectors = _detectors(data_dir)
    odd_shape = False
    for det in detectors:
        for kind, value, want in det.signatures:
            if kind == "prefix":
                if _has_prefix(specs, (value,)):
                    return det.name
                continue
            shape = _find(specs, value, det.unet_prefixes)
            if shape is None:
                continue
            if want is None or _fits(shape, want):
                return det.name
            odd_shape = odd_shape or len(shape) == len(want)
    if odd_shape:
        return "unknown"
    # Text-encoder-only or UNet-less dicts: by their text encoders' prefixes (SD1's CLIP-L, SD2's OpenCLIP-H).
    for det in detectors:
        if _has_prefix(specs, det.text_encoder_prefixes):
            return det.name
    return None


def detect_architecture(specs: Mapping, data_dir=None) -> str:
    """Return one of ARCHITECTURES. `specs` maps key -> TensorSpec or shape tuple.

    `data_dir`: a folder of architecture JSON files to detect from instead of merge_core's own."""
    found = detect_diffusion(specs, data_dir)
    if found is not None:
        return found
    if any(".text_model.encoder.layers." in k or k.startswith("text_model.encoder.layers.") for k in specs):
        return "unknown"  # a CLIP text encoder on its own (a host's CLIP state dict): not a language model
    # Language models by key layout (Llama and Mistral share one: config.json tells them apart, lm.py).
    return _detect_lm_layout(specs) or "unknown"


def detect_from_names(keys, data_dir=None) -> str:
    """The diffusion architecture from key names alone (no shapes), for what `detect_architecture` cannot
    place: ComfyUI CLIP keys (clip_l., clip_g., clip_h., t5xxl.), kohya LoRA names (lora_unet_..., lora_te1_...),
    key lists. Returns a name or 'unknown'.

    In turn: a marker only one architecture lists (double_blocks: Flux); the set of text-encoder heads
    (ComfyUI CLIP, then kohya LoRA): the architecture with the fewest text encoders that has them all (ties:
    detection order); a marker several architectures list (input_blocks: SD1/SD2): the first of them."""
    detectors = _detectors(data_dir)
    names = [str(k) for k in keys]
    listed: dict[str, list[str]] = {}
    for det in detectors:
        for marker in det.markers:
            listed.setdefault(marker, []).append(det.name)

    def has(marker: str) -> bool:
        return any(marker in k for k in names)

    for det in detectors:
        if any(len(listed[m]) == 1 and has(m) for m in det.markers):
            return det.name
    for attr in ("clip_heads", "lora_heads"):
        heads = {h for det in detectors for h in getattr(det, attr)}
        seen = {h for h in heads if any(k.startswith(h) for k in names)}
        if seen:
            fits = [det for det in detectors if seen <= getattr(det, attr)]
            if fits:
                return min(fits, key=lambda d: len(getattr(d, attr))).name
    for det in detectors:
        if any(has(m) for m in det.markers):
            return det.name
    return "unknown"


def partial_rules(data_dir=None) -> tuple[tuple[str, int, str | None, str], ...]:
    """(key, dim, group, what) of every architecture's `"partial"` list, each (key, dim) once, in detection
    order: a key ending in `key` (as whole dotted parts) whose models differ along `dim` alone is merged on the
    common part (plan.PARTIAL_MERGE_RULES)."""
    out: dict[tuple[str, int], tuple[str, int, str | None, str]] = {}
    base = Path(data_dir) if data_dir is not None else DATA_DIR
    for name, data in architecture_data(data_dir).items():
        for entry in data.get("partial", ()):
            if (not isinstance(entry, Mapping) or not isinstance(entry.get("key"), str) or not entry["key"]
                    or isinstance(entry.get("dim"), bool) or not isinstance(entry.get("dim"), int) or entry["dim"] < 0):
                raise MergeError(f"architecture data {base / (name + '.json')}: a \"partial\" entry needs a \"key\" "
                                 f"and a \"dim\" (a dimension index): {entry!r}")
            rule = (entry["key"], entry["dim"], entry.get("group"), str(entry.get("what", entry["key"])))
            out.setdefault(rule[:2], rule)
    return tuple(out.values())


def display_name(arch: str) -> str:
    return DISPLAY_NAMES.get(arch, arch)

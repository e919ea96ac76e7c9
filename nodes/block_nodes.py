"""The Block weights node and how its output reaches merge_core (`blocks=` / `overrides=`).

The parsing is merge_core.blocks' (`parse_block_values`, `preset`, `parse_override`); this file only reads the
node's text (one spec, plus `modelN:` rows for methods whose block parameter is per model), checks the values
against the method's parameter and words every error the way the node shows it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..merge_core.arch import detect_from_names, display_name
from ..merge_core.blocks import (PRESETS, SUPPORTED, BlockSpecError, BlockValues, architecture,
                                 architecture_for_keys, parse_block_values, parse_override, preset)
from ..merge_core.errors import MergeError
from .common import CATEGORY, MAX_INPUTS

BLOCK_WEIGHTS = "BLOCK_WEIGHTS"
NO_PRESET = "none"
WHAT = "block weights"
_ROW = re.compile(r"^\s*model\s*(\d+)\s*:(.*)$", re.IGNORECASE)

# Key naming of each merge input, for merge_core.blocks' chains (docs/blocks.md "Key namings").
KEY_KINDS = {"MODEL": "comfy_model", "CLIP": "comfy_clip", "CHECKPOINT": "checkpoint"}


class HostBlockValues(BlockValues):
    """BlockValues that place keys by one host's naming (ComfyUI MODEL / CLIP / checkpoint files)."""

    def __init__(self, values: BlockValues, kind: str):
        super().__init__(values.arch, values.values, values.source)
        self.kind = kind

    def value(self, key: str, kind: str = "auto"):
        return super().value(key, self.kind if kind == "auto" else kind)


@dataclass(frozen=True)
class BlockWeights:
    """What the Block weights node outputs: the parsed spec for one architecture.

    `common`: the values every model's row starts from (the preset, then the lines without a label);
    `rows`: {model number (1-based): that model's own `modelN:` values}; `overrides`: (pattern, value)."""
    arch: str
    common: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    overrides: tuple = ()

    def __repr__(self) -> str:  # also what ComfyUI's caching and IS_CHANGED see
        return f"BlockWeights({self.arch}, {self.common}, {self.rows}, {self.overrides})"

    @property
    def architecture(self):
        return architecture(self.arch)

    def _row(self, number: int) -> BlockValues:
        return BlockValues(self.architecture, {**self.common, **self.rows.get(number, {})})

    def engine_args(self, method, n_models: int, kind: str) -> dict:
        """`blocks=` / `overrides=` for merge_core.engine.merge, checked for `method` and `n_models`."""
        param = method.block_param
        if param is None:
            raise MergeError(f"{method.label} has no parameter that can vary per block: disconnect block_weights")
        label = param.label or param.name
        host_kind = KEY_KINDS[kind]
        blocks = None
        if param.per_model:
            extra = sorted(n for n in self.rows if n > n_models)
            if extra:
                raise MergeError(f"{WHAT}: a model{extra[0]}: row, but only {n_models} models are connected")
            if self.common or self.rows:
                blocks = [HostBlockValues(self._row(i), host_kind) for i in range(1, n_models + 1)]
            if self.overrides:
                raise MergeError(f"{WHAT} overrides set one number per key, but {method.label}'s {label.lower()} "
                                 f"are one per model: write modelN: rows in the block weights text instead")
        else:
            if self.rows:
                first = min(self.rows)
                raise MergeError(f"{WHAT}: {method.label} takes one row ({label} per block); remove the "
                                 f"'model{first}:' label (modelN: rows are for per-model weights)")
            if self.common:
                blocks = HostBlockValues(self._row(0), host_kind)
        for table in (blocks if isinstance(blocks, list) else [blocks] if blocks is not None else []):
            for name, value in table.values.items():
                param.check_scalar(value, f"{WHAT} ({label}, {name})")
        for pattern, value in self.overrides:
            param.check_scalar(value, f"{WHAT} override {pattern} ({label})")
        return {"blocks": blocks, "overrides": list(self.overrides)}

    def check_architecture(self, specs, what: str = "the connected models") -> str:
        """The architecture merge_core detects for `specs` ({key: shape}); an error when its block map is not
        this one's (SD1 and SD2 share theirs)."""
        found = detected_architecture(specs)
        if found in SUPPORTED and architecture(found).blocks != self.architecture.blocks:
            raise MergeError(f"{WHAT} are for {self.architecture.display}, but {what} are {display_name(found)}: "
                             f"pick {found} as the architecture in Block weights")
        return found


def parse(arch_name: str, preset_name: str, text: str, overrides_text: str = "") -> BlockWeights:
    """The node's widgets -> BlockWeights; a BlockSpecError/MergeError names the bad item."""
    if arch_name not in SUPPORTED:
        raise MergeError(f"{WHAT}: unknown architecture {arch_name!r} (one of {', '.join(SUPPORTED)})")
    arch = architecture(arch_name)
    common: dict[str, float] = {}
    if preset_name and preset_name != NO_PRESET:
        if preset_name not in arch.presets:
            raise MergeError(f"{WHAT}: preset {preset_name} is not defined for {arch.display} "
                             f"(its presets: {', '.join(arch.presets)})")
        common.update(preset(arch, preset_name).values)
    plain, rows = [], {}
    for line in (text or "").splitlines():
        m = _ROW.match(line)
        if m is None:
            plain.append(line)
            continue
        number = int(m[1])
        if not 1 <= number <= MAX_INPUTS:
            raise MergeError(f"{WHAT}: model{number}: a node takes models 1 to {MAX_INPUTS}")
        if not m[2].strip():
            raise MergeError(f"{WHAT}: the model{number}: row is empty")
        values = parse_block_values(arch, m[2], what=f"{WHAT} model{number}").values
        rows[number] = {**rows.get(number, {}), **values}
    if "\n".join(plain).strip():
        common.update(parse_block_values(arch, "\n".join(plain), what=WHAT).values)
    overrides = []
    for line in (overrides_text or "").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            overrides.append(parse_override(line, what=f"{WHAT} override"))
    if not common and not rows and not overrides:
        raise MergeError(f"{WHAT}: nothing set: pick a preset, or write block values or overrides")
    return BlockWeights(arch.name, common, rows, tuple(overrides))


def detected_architecture(specs) -> str:
    """merge_core's architecture for {key: shape}, from the architecture data; a ComfyUI CLIP (whose HF-style
    layer names merge_core may read as a language model) by its text encoders' heads (clip_l., clip_g., clip_h.,
    t5xxl.: the data's ComfyUI CLIP prefixes) alone."""
    found = architecture_for_keys(specs)
    if found not in SUPPORTED:
        found = detect_from_names(specs)
    return found


class ManifoldMergeBlockWeights:
    """Block weights (and per-key overrides) for any merge node's optional `block_weights` input."""
    CATEGORY = CATEGORY
    RETURN_TYPES = (BLOCK_WEIGHTS,)
    RETURN_NAMES = ("block_weights",)
    FUNCTION = "run"
    DISPLAY_NAME = "Block weights"
    DESCRIPTION = ("Per-block values of the merge method's block parameter (SLERP t, weighted-sum M, EMA alpha; "
                   "Karcher/WMA: each model's weight, one 'modelN:' row per model), and per-key overrides.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    "architecture": (list(SUPPORTED), {"tooltip": "the models' architecture (SD1.x and SD2.x "
                                                                  "share one block map)"}),
                    "preset": ([NO_PRESET] + list(PRESETS), {"tooltip": "start from a preset; the text's "
                                                                        "entries come on top"}),
                    "text": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "a list of one value per block, or NAME:VALUE entries "
                                                   "(BASE:0, IN00-IN05:0.2, OUT*:1); for Karcher/WMA one line "
                                                   "per model: 'model1: ...', 'model2: ...'"})},
                "optional": {
                    "overrides": ("STRING", {"multiline": True, "default": "",
                                             "tooltip": "one PATTERN=VALUE per line, matched against the "
                                                        "merged keys (attn2=0.5, *.ff.net.*=0)"})}}

    def run(self, architecture, preset, text, overrides=""):
        try:
            return (parse(architecture, preset, text, overrides),)
        except BlockSpecError as exc:
            raise MergeError(str(exc)) from None


BLOCK_NODES = {"ManifoldMergeBlockWeights": ManifoldMergeBlockWeights}

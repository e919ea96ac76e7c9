"""Per-key parameters: block weights and per-key overrides resolved, before any data is read, into the
plain numbers each key's merge gets.

`--blocks` sets the method's block parameter (`Method.block_param`): one block table for a scalar
parameter (slerp t, weighted / add-difference M, ema alpha), one table per model for a per-model one
(karcher / wma weights). A block the table leaves unset keeps the method's value. Overrides
(`pattern=value`) come on top, matched against key names; every pattern must match something.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .blocks import BlockSpecError, BlockValues, architecture, match_overrides, parse_block_values
from .errors import MergeError
from .registry import Bound


@dataclass
class KeyValues:
    """What the engine needs: values per merged key (only where they differ from the method's), and the
    compact record for the recipe."""
    per_key: dict[str, dict] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    override_counts: dict[str, int] = field(default_factory=dict)


def resolve(bound: Bound, keys: Sequence[str], arch_name: str, blocks=None,
            overrides: Sequence[tuple[str, float]] = ()) -> KeyValues:
    """`blocks`: None, a spec (str / dict / BlockValues) for a scalar block parameter, or a list of
    specs (one per model) for a per-model one. `keys`: the merged keys."""
    result = KeyValues()
    if blocks is None and not overrides:
        return result
    method = bound.method
    param = method.block_param
    if param is None:
        raise MergeError(f"method {method.name} has no parameter that can vary per block or per key")
    tables: list[BlockValues] = []
    if blocks is not None:
        try:
            arch = architecture(arch_name)
        except BlockSpecError:
            raise MergeError(f"block weights need a known architecture; the models are {arch_name!r}") from None
        specs = list(blocks) if param.per_model and isinstance(blocks, (list, tuple)) else [blocks]
        if param.per_model and len(specs) != bound.n_models:
            raise MergeError(f"--blocks: {len(specs)} block rows given for {bound.n_models} models; {method.name} "
                             f"takes one row per model (each model's weight per block), in model order")
        if not param.per_model and len(specs) != 1:
            raise MergeError(f"--blocks: {method.name} takes one block row (its {param.name} per block), "
                             f"got {len(specs)}")
        what = "--blocks"
        tables = [s if isinstance(s, BlockValues) else parse_block_values(arch, s, what=what) for s in specs]
        for table in tables:
            for value in table.table().values():
                param.check_scalar(value, f"--blocks ({param.name})")
    matched: dict[str, float] = {}
    if overrides:
        if param.per_model:
            raise MergeError(f"--override sets one number per key; {method.name}'s {param.name} are per model: "
                             f"give --blocks once per model instead")
        matched, result.override_counts = match_overrides(keys, overrides)
    for key in keys:
        if tables:
            if param.per_model:
                base = bound.values[param.name] or [1.0] * bound.n_models
                vals = [t.value(key) for t in tables]
                value = [b if v is None else v for v, b in zip(vals, base)]
                if value == base:
                    value = None
            else:
                value = tables[0].value(key)
        else:
            value = None
        if key in matched:
            value = matched[key]
        if value is not None and value != bound.values[param.name]:
            result.per_key[key] = bound.with_values({param.name: value})
    result.recipe = {"block_parameter": param.name}
    if tables:
        result.recipe["blocks"] = [t.table() for t in tables] if param.per_model else tables[0].table()
        result.recipe["architecture"] = arch_name
    if overrides:
        result.recipe["overrides"] = [{"pattern": p, "value": v, "keys": result.override_counts.get(p, 0)}
                                      for p, v in overrides]
    return result

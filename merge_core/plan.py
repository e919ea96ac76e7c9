"""Planning: decide, before any tensor data is read, what happens to every key.

The plan is a list of KeyTask (merge / copy, which inputs, output shape and
dtype). It is where architecture checks, missing keys and shape mismatches are
resolved, so every error about the inputs is raised before a byte is written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .arch import detect_architecture, display_name
from .errors import ArchitectureMismatch, MissingKeys, ShapeMismatch
from .io.sources import ModelSource
from .io.spec import TensorSpec

# Shape mismatches that are merged on the common part, the rest kept from the larger model.
# (dim, pattern): inpainting / instruct-pix2pix conv_in has 9 / 8 input channels instead of 4;
# text encoders with added tokens have more embedding rows.
PARTIAL_MERGE_RULES: tuple[tuple[int, re.Pattern], ...] = (
    (1, re.compile(r"(^|\.)input_blocks\.0\.0\.weight$")),
    (0, re.compile(r"(token_embedding|embed_tokens|word_embeddings|wte|shared)\.weight$")),
)

FLOAT_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                     "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
for _short, _attr in (("fp8_e4m3fn", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")):
    if hasattr(torch, _attr):
        FLOAT_DTYPE_NAMES[_short] = FLOAT_DTYPE_NAMES[_attr] = getattr(torch, _attr)
# What a user can ask for as the output dtype (fp8: math still in fp32, out-of-range values saturated).
OUTPUT_DTYPES = ("auto", "fp16", "bf16", "fp32") + tuple(n for n in ("fp8_e4m3fn", "fp8_e5m2") if n in FLOAT_DTYPE_NAMES)


@dataclass(frozen=True)
class KeyTask:
    key: str
    action: str                      # "merge" or "copy"
    sources: tuple[int, ...]         # for merge: all models; for copy: the one model copied from
    out_spec: TensorSpec
    use_base: bool = False
    partial_dim: int | None = None   # merge only the first `common` entries along this dim
    common: int | None = None
    extra_from: int | None = None    # model whose tensor provides the part beyond `common`


@dataclass
class MergePlan:
    tasks: list[KeyTask]
    architecture: str
    architectures: list[str]
    missing: dict[str, list[str]] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    forced_copies: dict[str, str] = field(default_factory=dict)
    no_base: list[str] = field(default_factory=list)

    def out_specs(self) -> dict[str, TensorSpec]:
        return {t.key: t.out_spec for t in self.tasks}


def _partial_dim(key: str, shapes: Sequence[tuple[int, ...]]) -> int | None:
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        return None
    diff_dims = {d for d in range(len(shapes[0])) if len({s[d] for s in shapes}) > 1}
    if len(diff_dims) != 1:
        return None
    (dim,) = diff_dims
    for rule_dim, pattern in PARTIAL_MERGE_RULES:
        if rule_dim == dim and pattern.search(key):
            return dim
    return None


def output_dtype(requested: str, first_spec: TensorSpec) -> torch.dtype:
    """'auto' keeps the first model's dtype for each float key (mixed-dtype models stay as they are)."""
    if not first_spec.is_float:
        return first_spec.dtype
    if requested == "auto":
        return first_spec.dtype
    return FLOAT_DTYPE_NAMES[requested]


def check_architectures(sources: Sequence[ModelSource], force: bool) -> tuple[str, list[str]]:
    archs = [detect_architecture(s.specs()) for s in sources]
    if len(set(archs)) > 1 and not force:
        listing = "; ".join(f"{s.name}: {display_name(a)}" for s, a in zip(sources, archs))
        raise ArchitectureMismatch(
            f"cannot merge different architectures ({listing}). Use --force to merge only the keys "
            f"they share.")
    return archs[0], archs


def build_plan(models: Sequence[ModelSource], base: ModelSource | None = None, *, dtype: str = "auto",
               strict: bool = False, force: bool = False) -> MergePlan:
    arch, archs = check_architectures(list(models) + ([base] if base else []), force)
    plan = MergePlan(tasks=[], architecture=arch, architectures=archs[:len(models)])
    seen: set[str] = set()
    ordered_keys: list[str] = []
    # Union of keys, first model's order first; across forced different architectures the
    # output is the first model with the keys it shares with the others merged.
    key_sources = models[:1] if len(set(archs)) > 1 else models
    for model in key_sources:
        for key in model.keys():
            if key not in seen:
                seen.add(key)
                ordered_keys.append(key)

    for key in ordered_keys:
        holders = [i for i, m in enumerate(models) if key in m]
        first = models[holders[0]].spec(key)
        out_dtype = output_dtype(dtype, first)
        if len(holders) < len(models):
            plan.missing[key] = [models[i].name for i in range(len(models)) if i not in holders]
            plan.tasks.append(KeyTask(key, "copy", (holders[0],), TensorSpec(first.shape, out_dtype)))
            continue
        specs = [models[i].spec(key) for i in holders]
        if not first.is_float or any(not s.is_float for s in specs):
            # Integers/bools (e.g. position_ids) are indices, not weights: copied, never averaged.
            plan.tasks.append(KeyTask(key, "copy", (0,), TensorSpec(first.shape, out_dtype)))
            continue
        shapes = [s.shape for s in specs]
        use_base = base is not None and key in base and base.spec(key).shape == first.shape
        if base is not None and not use_base:
            plan.no_base.append(key)
        if len(set(shapes)) == 1:
            plan.tasks.append(KeyTask(key, "merge", tuple(holders), TensorSpec(first.shape, out_dtype), use_base))
            continue
        dim = _partial_dim(key, shapes)
        if dim is not None:
            sizes = [s[dim] for s in shapes]
            extra_from = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
            out_shape = shapes[extra_from]
            plan.partial[key] = (f"shapes {', '.join(str(list(s)) for s in shapes)}: merged the first "
                                 f"{min(sizes)} along dim {dim}, rest from {models[extra_from].name}")
            plan.tasks.append(KeyTask(key, "merge", tuple(holders), TensorSpec(out_shape, out_dtype),
                                      use_base=False, partial_dim=dim, common=min(sizes),
                                      extra_from=extra_from))
            continue
        if force:
            plan.forced_copies[key] = f"shapes differ ({', '.join(str(list(s)) for s in shapes)}); copied from {models[0].name}"
            plan.tasks.append(KeyTask(key, "copy", (0,), TensorSpec(first.shape, out_dtype)))
            continue
        listing = ", ".join(f"{models[i].name} {list(s)}" for i, s in zip(holders, shapes))
        raise ShapeMismatch(f"key {key!r} has shapes that cannot be merged: {listing}")

    if strict and plan.missing:
        sample = "; ".join(f"{k} (missing in {', '.join(v)})" for k, v in list(plan.missing.items())[:5])
        raise MissingKeys(f"{len(plan.missing)} keys are not in every model (--strict): {sample}")
    return plan

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

from . import lm
from .arch import detect_architecture, display_name, partial_rules
from .errors import ArchitectureMismatch, MissingKeys, ShapeMismatch
from .io.sources import ModelSource
from .io.spec import TensorSpec

@dataclass(frozen=True)
class PartialRule:
    """A shape mismatch merged on the common part, the rest kept from the larger model (never padded or
    truncated). Tensors of one `group` take their extra part from the same model: the one largest along
    the group's dims over all its tensors (ties: the first)."""
    dim: int
    pattern: re.Pattern
    group: str | None
    what: str


# The diffusion architectures' rules are data (the "partial" list of data/architectures/*.json: inpainting /
# instruct-pix2pix conv_in with 9 / 8 input channels instead of 4; text encoders with added tokens, each
# encoder on its own, as SDXL has two vocabularies); language models' vocabulary-sized tensors
# (lm.VOCAB_RULES: embeddings, lm_head, their biases) form one group.
PARTIAL_MERGE_RULES: tuple[PartialRule, ...] = (
    *(PartialRule(dim, re.compile(r"(^|\.)" + re.escape(key) + "$"), group, what)
      for key, dim, group, what in partial_rules()),
    *(PartialRule(dim, pattern, "vocab", "vocabulary") for dim, pattern in lm.VOCAB_RULES),
)


def partial_rule(key: str) -> PartialRule | None:
    return next((r for r in PARTIAL_MERGE_RULES if r.pattern.search(key)), None)


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
    source_key: str | None = None    # for copy: the key's name in that source, when it differs (a baked VAE)


@dataclass
class MergePlan:
    tasks: list[KeyTask]
    architecture: str
    architectures: list[str]
    missing: dict[str, list[str]] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    forced_copies: dict[str, str] = field(default_factory=dict)
    no_base: list[str] = field(default_factory=list)
    lm: list = field(default_factory=list)      # lm.LMInfo (or None) per model: family, config, folder
    vocab_from: int | None = None               # the model the extra vocabulary rows come from
    vocab_rows: int | None = None               # the output's vocabulary rows (when the models differ)

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
    rule = partial_rule(key)
    return dim if rule is not None and rule.dim == dim else None


def _group_providers(models: Sequence[ModelSource], keys: Sequence[str]) -> dict[str, tuple[int, int]]:
    """group -> (model index, size): the model largest along the group's dims (ties: the first)."""
    sizes: dict[str, list[int]] = {}
    for key in keys:
        rule = partial_rule(key)
        if rule is None or rule.group is None:
            continue
        row = sizes.setdefault(rule.group, [0] * len(models))
        for i, model in enumerate(models):
            if key in model and len(model.spec(key).shape) > rule.dim:
                row[i] = max(row[i], model.spec(key).shape[rule.dim])
    return {g: (max(range(len(row)), key=lambda i: (row[i], -i)), max(row)) for g, row in sizes.items()}


def output_dtype(requested: str, first_spec: TensorSpec) -> torch.dtype:
    """'auto' keeps the first model's dtype for each float key (mixed-dtype models stay as they are)."""
    if not first_spec.is_float:
        return first_spec.dtype
    if requested == "auto":
        return first_spec.dtype
    return FLOAT_DTYPE_NAMES[requested]


def _lm_infos(sources: Sequence[ModelSource], archs: Sequence[str]) -> list:
    return [lm.lm_info(s.path, s.specs()) if a in lm.LM_FAMILIES or a == "unknown" else None
            for s, a in zip(sources, archs)]


def check_architectures(sources: Sequence[ModelSource], force: bool) -> tuple[str, list[str]]:
    """Every model must be of one architecture: SD kinds from their keys, language models by family
    (config.json's model_type, else key patterns) and with the same hidden size and layer count."""
    archs, _, _ = _check_architectures(sources, force)
    return archs[0], archs


def _check_architectures(sources: Sequence[ModelSource], force: bool) -> tuple[list[str], list, bool]:
    archs = [detect_architecture(s.specs()) for s in sources]
    infos = _lm_infos(sources, archs)
    archs = [info.family if info is not None else a for a, info in zip(archs, infos)]
    names = [display_name(a) if info is None else f"{info.display}"
             + (f" (model_type {info.family!r} from config.json)" if info.source == "config.json" else
                " (from its keys)") for a, info in zip(archs, infos)]
    differ = len(set(archs)) > 1
    if differ and all(info is not None for info in infos):
        differ = not all(lm.compatible(infos[0], info) for info in infos[1:])
    if differ and not force:
        listing = "; ".join(f"{s.name}: {n}" for s, n in zip(sources, names))
        raise ArchitectureMismatch(
            f"cannot merge different architectures ({listing}). Use --force to merge only the keys "
            f"they share.")
    if not force and all(info is not None for info in infos):
        for i, info in enumerate(infos[1:], 1):
            for what, a, b in (("hidden sizes", infos[0].hidden, info.hidden),
                               ("layer counts", infos[0].layers, info.layers)):
                if a is not None and b is not None and a != b:
                    raise ArchitectureMismatch(
                        f"cannot merge {sources[0].name} and {sources[i].name}: different {what} ({a} and {b}). "
                        f"Use --force to merge only the keys they share.")
    return archs, infos, differ


def build_plan(models: Sequence[ModelSource], base: ModelSource | None = None, *, dtype: str = "auto",
               strict: bool = False, force: bool = False) -> MergePlan:
    archs, infos, differ = _check_architectures(list(models) + ([base] if base else []), force)
    plan = MergePlan(tasks=[], architecture=archs[0], architectures=archs[:len(models)], lm=infos[:len(models)])
    seen: set[str] = set()
    ordered_keys: list[str] = []
    # Union of keys, first model's order first; across forced different architectures the
    # output is the first model with the keys it shares with the others merged.
    key_sources = models[:1] if differ else models
    for model in key_sources:
        for key in model.keys():
            if key not in seen:
                seen.add(key)
                ordered_keys.append(key)
    providers = _group_providers(models, ordered_keys)

    for key in ordered_keys:
        holders = [i for i, m in enumerate(models) if key in m]
        first = models[holders[0]].spec(key)
        out_dtype = output_dtype(dtype, first)
        if len(holders) < len(models):
            rule = partial_rule(key)
            if rule is not None and rule.group is not None and rule.group in providers and not force:
                provider, size = providers[rule.group]
                have = first.shape[rule.dim] if len(first.shape) > rule.dim else None
                if have != size:
                    raise ShapeMismatch(
                        f"key {key!r} is only in {', '.join(models[i].name for i in holders)} ({have} rows) but "
                        f"the output vocabulary has {size} rows (from {models[provider].name}); the models "
                        f"differ in tied embeddings and vocabulary size")
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
            group = partial_rule(key).group
            extra_from = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
            if group is not None:
                extra_from, _ = providers[group]
                if sizes[extra_from] != max(sizes):
                    larger = models[holders[sizes.index(max(sizes))]].name
                    raise ShapeMismatch(
                        f"key {key!r}: {larger} has {max(sizes)} entries along dim {dim} but "
                        f"{models[holders[extra_from]].name}, which has the largest vocabulary, has "
                        f"{sizes[extra_from]}; the extra rows must all come from one model")
                plan.vocab_from, plan.vocab_rows = holders[extra_from], sizes[extra_from]
            out_shape = shapes[extra_from]
            if base is not None and key not in plan.no_base:
                plan.no_base.append(key)  # a partial merge runs on the models' shared block, without the base
            plan.partial[key] = (f"shapes {', '.join(str(list(s)) for s in shapes)}: merged the first "
                                 f"{min(sizes)} along dim {dim}, rest from {models[holders[extra_from]].name}")
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

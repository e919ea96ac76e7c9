"""What A1111's Checkpoint Merger users expect around a merge: bake in a VAE, discard weights by regex, drop
EMA weights and other training leftovers. Applied to the plan, before any tensor data is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .errors import BadCheckpoint, MergeError
from .io.sources import ModelSource
from .io.spec import TensorSpec
from .plan import KeyTask, MergePlan

# Weights a finished checkpoint does not need: the EMA copy training keeps beside the model.
TRAINING_LEFTOVERS = re.compile(r"^(model_ema\.|ema_model\.|model\.ema\.)")
VAE_PREFIXES = {"flux": "vae."}  # where each architecture's checkpoint keeps its VAE (others: first_stage_model.)
DEFAULT_VAE_PREFIX = "first_stage_model."
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


@dataclass
class EditReport:
    discarded: list[str] = field(default_factory=list)
    dropped_ema: list[str] = field(default_factory=list)
    vae_keys: int = 0
    vae_name: str | None = None


def compile_discard(pattern: str | None) -> re.Pattern | None:
    if not pattern or not pattern.strip():
        return None
    try:
        return re.compile(pattern.strip())
    except re.error as exc:
        raise MergeError(f"discard weights: {pattern!r} is not a valid regular expression ({exc})") from None


def _vae_key_map(vae: ModelSource, prefix: str) -> dict[str, str]:
    """Output key -> key in the VAE file (a bare VAE, or a checkpoint's VAE part under any known prefix)."""
    mapping: dict[str, str] = {}
    for key in vae.keys():
        for known in (prefix, DEFAULT_VAE_PREFIX, "vae."):
            if key.startswith(known):
                mapping[prefix + key[len(known):]] = key
                break
        else:
            if key.startswith(_VAE_ROOTS):
                mapping[prefix + key] = key
    return mapping


def apply_edits(plan: MergePlan, vae_index: int | None = None, vae: ModelSource | None = None,
                discard: str | None = None, drop_ema: bool = False) -> tuple[MergePlan, EditReport]:
    """A new plan: keys matching `discard` or (with drop_ema) EMA leftovers are left out; the VAE keys are
    copied from `vae` (source number `vae_index` in the engine's list) instead of merged."""
    report = EditReport()
    pattern = compile_discard(discard)
    tasks: list[KeyTask] = []
    vae_map: dict[str, str] = {}
    if vae is not None:
        prefix = VAE_PREFIXES.get(plan.architecture, DEFAULT_VAE_PREFIX)
        vae_map = _vae_key_map(vae, prefix)
        ours = {t.key for t in plan.tasks if t.key.startswith(prefix)}
        if not vae_map or not ours:
            raise BadCheckpoint(f"{vae.name}: not a VAE for these models (no {prefix}… / encoder.… / decoder.… "
                                f"weights in common)")
        missing = sorted(ours - set(vae_map))
        if missing:
            raise BadCheckpoint(f"{vae.name}: not a VAE for this architecture (it has no {missing[0]!r})")
        report.vae_name = vae.name
    for task in plan.tasks:
        if drop_ema and TRAINING_LEFTOVERS.match(task.key):
            report.dropped_ema.append(task.key)
            continue
        if pattern is not None and pattern.search(task.key):
            report.discarded.append(task.key)
            continue
        if task.key in vae_map:
            spec = vae.spec(vae_map[task.key])
            if spec.shape != task.out_spec.shape:
                raise BadCheckpoint(f"{vae.name}: {vae_map[task.key]!r} has shape {list(spec.shape)}, the models "
                                    f"have {list(task.out_spec.shape)}; not a VAE for these models")
            dtype = task.out_spec.dtype if spec.is_float else spec.dtype
            tasks.append(replace(task, action="copy", sources=(vae_index,), out_spec=TensorSpec(spec.shape, dtype),
                                 use_base=False, partial_dim=None, common=None, extra_from=None,
                                 source_key=vae_map[task.key]))
            report.vae_keys += 1
            continue
        tasks.append(task)
    if pattern is not None and not report.discarded:
        raise MergeError(f"discard weights: {discard!r} matches no key of the models")
    if not tasks:
        raise MergeError("nothing would be left to write: every key was discarded")
    return replace(plan, tasks=tasks), report

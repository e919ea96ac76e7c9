"""Key names between hosts, from the architecture data: a ComfyUI MODEL / CLIP state dict <-> checkpoint keys.

Each component of `data/architectures/<arch>.json` has its prefix per naming (`checkpoint_prefix`,
`comfy_prefix`), so `diffusion_model.X` (ComfyUI MODEL) is `model.diffusion_model.X` in a checkpoint and
`clip_g.X` (ComfyUI CLIP) is `conditioner.embedders.1.X` (SDXL) or `text_encoders.clip_g.X` (SD3).

Under a prefix the weights usually keep their names. Where a checkpoint stores a text encoder in another
layout (`"checkpoint_layout": "openclip"`: SD2's OpenCLIP-H, SDXL's OpenCLIP-bigG, whereas ComfyUI holds them in
the HF CLIP layout) the names are converted with OPENCLIP_NAMES: q/k/v projections are concatenated into one
`in_proj_weight` (and split back), `text_projection` is transposed, `position_ids` has no OpenCLIP counterpart.

    rename_state_dict(sd, "sdxl", "comfy", "checkpoint")     # tensors
    rename_specs(specs, "sdxl", "checkpoint", "comfy")       # shapes only
    rename("clip_l.transformer.text_model.final_layer_norm.weight", "sd1", "comfy", "checkpoint")
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from .blocks import Architecture, architecture
from .errors import MergeError

KINDS = ("checkpoint", "comfy")
_KIND_ALIASES = {"comfy_model": "comfy", "comfy_clip": "comfy", "comfyui": "comfy"}
_PREFIX_FIELD = {"checkpoint": "checkpoint_prefix", "comfy": "comfy_prefix"}
_KIND_TEXT = {"checkpoint": "checkpoint", "comfy": "ComfyUI MODEL/CLIP"}

# HF CLIP name <-> OpenCLIP name, both relative to the component's prefix. {n}: a layer index, {p}: weight or
# bias, {qkv}: q, k or v (the three HF projections are one fused OpenCLIP tensor, q rows first).
# op: "copy", "transpose" (HF Linear [out, in] vs OpenCLIP's x @ proj), "qkv" (fused), "drop" (no counterpart).
OPENCLIP_NAMES: tuple[tuple[str, str | None, str], ...] = (
    ("transformer.text_model.embeddings.token_embedding.weight", "model.token_embedding.weight", "copy"),
    ("transformer.text_model.embeddings.position_embedding.weight", "model.positional_embedding", "copy"),
    ("transformer.text_model.embeddings.position_ids", None, "drop"),
    ("transformer.text_model.final_layer_norm.{p}", "model.ln_final.{p}", "copy"),
    ("transformer.text_model.encoder.layers.{n}.layer_norm1.{p}", "model.transformer.resblocks.{n}.ln_1.{p}", "copy"),
    ("transformer.text_model.encoder.layers.{n}.layer_norm2.{p}", "model.transformer.resblocks.{n}.ln_2.{p}", "copy"),
    ("transformer.text_model.encoder.layers.{n}.mlp.fc1.{p}", "model.transformer.resblocks.{n}.mlp.c_fc.{p}", "copy"),
    ("transformer.text_model.encoder.layers.{n}.mlp.fc2.{p}", "model.transformer.resblocks.{n}.mlp.c_proj.{p}", "copy"),
    ("transformer.text_model.encoder.layers.{n}.self_attn.out_proj.{p}",
     "model.transformer.resblocks.{n}.attn.out_proj.{p}", "copy"),
    ("transformer.text_model.encoder.layers.{n}.self_attn.{qkv}_proj.{p}",
     "model.transformer.resblocks.{n}.attn.in_proj_{p}", "qkv"),
    ("transformer.text_projection.weight", "model.text_projection", "transpose"),
    ("logit_scale", "model.logit_scale", "copy"),
)
_FIELDS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>weight|bias)", "qkv": r"(?P<qkv>[qkv])"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(s) if i % 2 == 0 else _FIELDS[s] for i, s in enumerate(parts)) + "$")


_TABLE = tuple((_compile(hf), hf, _compile(oc) if oc else None, oc, op) for hf, oc, op in OPENCLIP_NAMES)


@dataclass(frozen=True)
class Rename:
    """One output key: from `sources` by `op` ("copy"; "transpose"; "cat": the sources concatenated along
    dim 0; "split": part `index` of 3 along dim 0 of the one source)."""
    target: str
    sources: tuple[str, ...]
    op: str = "copy"
    index: int = 0


def _kind(kind: str) -> str:
    k = _KIND_ALIASES.get(str(kind), str(kind))
    if k not in KINDS:
        names = ", ".join(KINDS + tuple(_KIND_ALIASES))
        raise MergeError(f"unknown key naming {kind!r} for renaming (one of: {names})")
    return k


def _components(arch: Architecture, kind: str) -> list[tuple[str, str, dict]]:
    out = []
    for name, comp in arch.components.items():
        prefix = comp.get(_PREFIX_FIELD[kind])
        if prefix:
            out.append((prefix, name, comp))
    return sorted(out, key=lambda e: -len(e[0]))


def _layout(comp: Mapping, kind: str) -> str:
    return comp.get("checkpoint_layout", "hf") if kind == "checkpoint" else "hf"


def _convert(rel: str, from_layout: str, to_layout: str):
    """(name, op, qkv letter) of `rel` in the other layout; None when the table has no entry for it."""
    if (from_layout, to_layout) not in (("hf", "openclip"), ("openclip", "hf")):
        raise MergeError(f"no conversion from the {from_layout} layout to the {to_layout} layout")
    for hf_re, hf, oc_re, oc, op in _TABLE:
        if from_layout == "hf":
            m = hf_re.match(rel)
            if m:
                if op == "drop":
                    return None, "drop", None
                fields = m.groupdict()
                return oc.format(**fields), op, fields.get("qkv")
        elif oc_re is not None:
            m = oc_re.match(rel)
            if m:
                fields = m.groupdict()
                if op == "qkv":
                    return [hf.format(**fields, qkv=x) for x in "qkv"], op, None
                return hf.format(**fields), op, None
    return None


def plan_renames(keys: Iterable[str], arch, from_kind: str, to_kind: str = "checkpoint",
                 unknown: str = "error") -> list[Rename]:
    """How every key of `keys` (named as `from_kind` names them) is named under `to_kind`.

    Kinds: "checkpoint" (LDM/SGM, or SD3/Flux as ComfyUI saves them) and "comfy" (a ComfyUI MODEL's
    `diffusion_model.` / a CLIP's `clip_l.`, `clip_h.`, `clip_g.`, `t5xxl.`). `unknown`: what to do with a key
    no component holds under both namings (a checkpoint's VAE has no ComfyUI MODEL/CLIP name): "error" (a
    MergeError naming it), "drop" or "keep" (unchanged). Keys the target layout has no name for
    (`position_ids` in OpenCLIP) are always dropped."""
    return _plan(keys, arch, from_kind, to_kind, unknown)


def _unmapped(key: str, unknown: str, out: list, why: str) -> None:
    """A key with no name in the target naming: an error, left out ("drop") or kept as it is ("keep")."""
    if unknown == "error":
        raise MergeError(f"{key}: {why}")
    if unknown == "keep":
        out.append(Rename(key, (key,)))


def _plan(keys, arch, from_kind: str, to_kind: str, unknown: str, lone: bool = False) -> list[Rename]:
    arch = architecture(arch)
    src, dst = _kind(from_kind), _kind(to_kind)
    if unknown not in ("error", "drop", "keep"):
        raise MergeError(f"unknown={unknown!r}: one of error, drop, keep")
    components = _components(arch, src)
    targets = {name: comp.get(_PREFIX_FIELD[dst]) for _, name, comp in components}
    out: list[Rename] = []
    fused: dict[str, dict[str, str]] = {}
    for key in keys:
        hit = next(((p, n, c) for p, n, c in components if key.startswith(p)), None)
        if hit is None or not targets.get(hit[1]):
            _unmapped(key, unknown, out, f"no {arch.display} component has this key under both "
                                         f"{_KIND_TEXT[src]} and {_KIND_TEXT[dst]} naming")
            continue
        prefix, name, comp = hit
        rel, to_prefix = key[len(prefix):], targets[name]
        a, b = _layout(comp, src), _layout(comp, dst)
        if a == b:
            out.append(Rename(to_prefix + rel, (key,)))
            continue
        converted = _convert(rel, a, b)
        if converted is None:
            _unmapped(key, unknown, out, f"{arch.display} {name} has no {b} name for this key "
                                         f"(the {_KIND_TEXT[dst]} layout of that text encoder differs)")
            continue
        new, op, letter = converted
        if op == "drop":
            continue
        if op == "qkv" and a == "hf":
            fused.setdefault(to_prefix + new, {})[letter] = key
        elif op == "qkv":
            out.extend(Rename(to_prefix + n, (key,), "split", i) for i, n in enumerate(new))
        else:
            out.append(Rename(to_prefix + new, (key,), op))
    for target, parts in fused.items():
        missing = [x for x in "qkv" if x not in parts]
        if missing and not lone:
            some = next(iter(parts.values()))
            raise MergeError(f"{some}: its attention has no {'/'.join(missing)} projection, so {target} "
                             f"(q, k and v in one tensor) cannot be built")
        out.append(Rename(target, tuple(parts[x] for x in "qkv" if x in parts), "cat"))
    seen: dict[str, str] = {}
    for r in out:
        if r.target in seen:
            raise MergeError(f"{r.sources[0]} and {seen[r.target]} both become {r.target}")
        seen[r.target] = r.sources[0]
    return out


def _shape(spec) -> tuple[int, ...]:
    return tuple(spec.shape) if hasattr(spec, "shape") else tuple(spec)


def _split_size(key: str, shape: tuple[int, ...]) -> int:
    if not shape or shape[0] % 3:
        raise MergeError(f"{key}: shape {list(shape)} is not three equal q/k/v parts along its first dimension")
    return shape[0] // 3


def rename_specs(specs: Mapping, arch, from_kind: str, to_kind: str = "checkpoint",
                 unknown: str = "error") -> dict[str, tuple[int, ...]]:
    """{key: shape} under `to_kind` naming (see plan_renames)."""
    out = {}
    for r in plan_renames(specs, arch, from_kind, to_kind, unknown):
        shapes = [_shape(specs[k]) for k in r.sources]
        if r.op == "cat":
            if len({s[1:] for s in shapes}) != 1:
                raise MergeError(f"{r.target}: q/k/v shapes {[list(s) for s in shapes]} differ")
            out[r.target] = (sum(s[0] for s in shapes),) + shapes[0][1:]
        elif r.op == "split":
            out[r.target] = (_split_size(r.sources[0], shapes[0]),) + shapes[0][1:]
        elif r.op == "transpose":
            out[r.target] = tuple(reversed(shapes[0]))
        else:
            out[r.target] = shapes[0]
    return out


def rename_state_dict(state_dict: Mapping, arch, from_kind: str, to_kind: str = "checkpoint",
                      unknown: str = "error") -> dict:
    """The tensors of `state_dict` under `to_kind` naming (see plan_renames); unchanged tensors are not copied."""
    import torch

    out = {}
    for r in plan_renames(state_dict, arch, from_kind, to_kind, unknown):
        tensors = [state_dict[k] for k in r.sources]
        if r.op == "cat":
            if len({tuple(t.shape[1:]) for t in tensors}) != 1:
                raise MergeError(f"{r.target}: q/k/v shapes {[list(t.shape) for t in tensors]} differ")
            out[r.target] = torch.cat(tensors, dim=0)
        elif r.op == "split":
            d = _split_size(r.sources[0], tuple(tensors[0].shape))
            out[r.target] = tensors[0][r.index * d:(r.index + 1) * d]
        elif r.op == "transpose":
            if tensors[0].dim() != 2:
                raise MergeError(f"{r.sources[0]}: expected a matrix to transpose, got shape {list(tensors[0].shape)}")
            out[r.target] = tensors[0].t().contiguous()
        else:
            out[r.target] = tensors[0]
    return out


def rename(key: str, arch, from_kind: str, to_kind: str = "checkpoint") -> str:
    """One key under `to_kind` naming. A q/k/v projection gives the fused key it becomes part of; a fused
    OpenCLIP `in_proj` (three keys), a key without a name there (`position_ids` in OpenCLIP) and a key of no
    component are MergeErrors."""
    plan = _plan([key], arch, from_kind, to_kind, "error", lone=True)
    if len(plan) != 1:
        what = "three keys (q, k and v)" if plan else "no key"
        raise MergeError(f"{key}: becomes {what} under {_KIND_TEXT[_kind(to_kind)]} naming"
                         + ("; use rename_state_dict" if plan else ""))
    return plan[0].target

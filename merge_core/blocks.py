"""Block maps per architecture, and users' block-weight specs.

The architectures are data: `merge_core/data/architectures/<name>.json` lists each model's
blocks in order, the finer names (TE, TE1, TE2, T5, VAE) that may override BASE, the key
prefixes every host uses (checkpoint, ComfyUI MODEL, ComfyUI CLIP, kohya LoRA, bare UNet)
and, per region, ordered regexes that map a key to its block. See docs/blocks.md. The same files
(read by merge_core.arch) drive the detection (`detect`), plan.py's partial-merge rules (`partial`) and
the renames between hosts (merge_core.naming: the components' prefixes and `checkpoint_layout`).

Every key has a *chain* of block names, finest first, ending in a list-form block:
SD1 `cond_stage_model.transformer...` -> ("TE", "BASE"); `...input_blocks.3.1...` -> ("IN03",).
A spec's value for a key is the value of the first name in that chain the spec sets.
"""
from __future__ import annotations

import fnmatch
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .arch import architecture_data, detect_architecture, detect_from_names, display_name
from .errors import MergeError
from .inputs import read_data_file

SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux")
KINDS = ("auto", "checkpoint", "comfy_model", "comfy_clip", "lora", "diffusers", "unet")
_NAME_ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "sd1.x": "sd1", "sd2.x": "sd2", "sd21": "sd2", "sd3.5": "sd3",
                 "sd35": "sd3", "flux1": "flux", "flux.1": "flux"}

# Presets: name -> description. The values are computed by _preset_values from the
# architecture's groups; every value is in [0, strength] (strength 1 by default).
PRESETS = {
    "flat": "every block at the strength (1 unless given: flat:0.5)",
    "grad_in_out": "a linear ramp over the model's blocks in order: 0 at the first input block, 1 at the last "
                   "output block; BASE 0",
    "grad_out_in": "the reverse ramp: 1 at the first input block, 0 at the last output block; BASE 1",
    "smooth": "a smoothstep (3t^2 - 2t^3) ramp from 0 at the first input block to 1 at the last output block; BASE 0",
    "ring": "(1 + cos 2*pi*t) / 2 over the blocks: 1 at both ends, 0 in the middle; BASE 1",
    "in_only": "the input group at 1 (SD: IN00-INnn; DiT: IN and the first third of the transformer blocks), "
               "everything else 0",
    "mid_only": "the middle group at 1 (SD: M00; DiT: the middle third of the transformer blocks), everything else 0",
    "out_only": "the output group at 1 (SD: OUT00-OUTnn; DiT: the last third of the transformer blocks and OUT), "
                "everything else 0",
    "base_only": "BASE at 1 (text encoders, VAE, time/label embeddings...), every UNet/transformer block 0",
    "te_only": "the text encoder(s) at 1, everything else (VAE, embeddings, all blocks) 0",
    "model_only": "every UNet/transformer block at 1, BASE 0 (so the text encoders and VAE 0)",
}


class BlockSpecError(MergeError):
    """A block-weight spec, block file or per-key override is invalid (one-line message)."""


# ---------------------------------------------------------------------------------------------
# architecture data

class _Rule:
    __slots__ = ("regex", "template", "n")

    def __init__(self, spec: Mapping):
        self.regex = re.compile(spec["re"])
        self.template = spec["block"]
        self.n = spec.get("n")

    def apply(self, m: re.Match) -> str:
        groups = [m.group(0)] + [int(g) if g is not None and g.isdigit() else g for g in m.groups()]
        n = None
        if self.n:
            n = self.n[0] + sum(groups[g] * mul for g, mul in self.n[1:])
        return self.template.format(*groups, n=n)


def _families(data: Mapping, counts: Mapping[str, int]) -> list[tuple[str, tuple[str, ...], str]]:
    out = []
    for entry in data["blocks"]:
        if "family" in entry:
            fam = entry["family"]
            members = tuple(f"{fam}{i:02d}" for i in range(counts.get(fam, entry["count"])))
        else:
            fam = entry["name"]
            members = (fam,)
        out.append((fam, members, entry.get("covers", "")))
    return out


class Architecture:
    """One architecture's block map (built from its data file; use `architecture(name)`)."""

    def __init__(self, data: Mapping, counts: Mapping[str, int] | None = None):
        self.data = data
        self.name: str = data["name"]
        self.display: str = data["display"]
        self.description: str = data.get("description", "")
        self.ss_base_model_version: tuple[str, ...] = tuple(data.get("ss_base_model_version", ()))
        self.modelspec_architecture: tuple[str, ...] = tuple(data.get("modelspec_architecture", ()))
        # component -> {"layout": layout component name, "name": fine block, "checkpoint_prefix": ...}
        self.components: dict[str, dict] = {k: dict(v) for k, v in data.get("components", {}).items()}
        counts = dict(counts or {})

        self._families = _families(data, counts)      # [(family, members, covers)]
        self._variable: dict[str, tuple[int, ...]] = {e["family"]: tuple(e["counts"])
                                                      for e in data["blocks"] if "counts" in e}
        self.blocks: tuple[str, ...] = tuple(b for _, members, _ in self._families for b in members)
        self._family_of = {b: fam for fam, members, _ in self._families for b in members}
        self._covers = {fam: covers for fam, _, covers in self._families}
        fine = data.get("fine", {})
        self.fine_names: tuple[str, ...] = tuple(fine)
        self._parent = {name: spec["parent"] for name, spec in fine.items()}
        self._fine_covers = {name: spec.get("covers", "") for name, spec in fine.items()}
        self.names: tuple[str, ...] = self.blocks + self.fine_names
        self._name_set = frozenset(self.names)
        self.aliases: dict[str, tuple[str, ...]] = {k.upper(): tuple(v) for k, v in data.get("aliases", {}).items()}
        self.groups: dict[str, tuple[str, ...]] = self._build_groups(data.get("groups", {}))

        # list forms: the canonical one first, then alternates (by name)
        self.list_forms: dict[str, tuple[str, ...]] = {"blocks": self.blocks}
        self._list_form_text: dict[str, str] = {"blocks": ""}
        for form, spec in data.get("list_forms", {}).items():
            self.list_forms[form] = self._expand(spec["blocks"])
            self._list_form_text[form] = spec.get("description", "")
        for fam, accepted in (self._variable.items() if not counts else ()):  # sized: its own count only
            for n in accepted:
                if n == len(self._members(fam)):
                    continue
                other = _families(data, {**counts, fam: n})
                self.list_forms[f"{fam}{n}"] = tuple(b for _, members, _ in other for b in members)
                self._list_form_text[f"{fam}{n}"] = f"with {n} {fam} blocks"

        self._hosts: dict[str, list[tuple[str, str]]] = {}
        for kind, entries in data["hosts"].items():
            self._hosts[kind] = sorted(((p, r) for p, r in entries), key=lambda e: -len(e[0]))
        auto = {}
        for kind, entries in self._hosts.items():
            for prefix, region in entries:
                if prefix:
                    auto.setdefault(prefix, region)
        self._auto = sorted(auto.items(), key=lambda e: -len(e[0]))
        self._regions: dict[str, tuple[str, list[_Rule] | None, str]] = {}
        for region, spec in data["regions"].items():
            rules = [_Rule(r) for r in spec["rules"]] if "rules" in spec else None
            self._regions[region] = (spec.get("component", "other"), rules, spec.get("block", region))
        self.presets: dict[str, str] = {name: text for name, text in PRESETS.items()
                                        if name != "mid_only" or self.groups.get("mid")}
        self._chains: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}

    # -- names ---------------------------------------------------------------------------
    def _members(self, fam: str) -> tuple[str, ...]:
        for f, members, _ in self._families:
            if f == fam:
                return members
        return ()

    def _expand(self, patterns: Iterable[str]) -> tuple[str, ...]:
        out: list[str] = []
        for pat in patterns:
            hits = [n for n in self.names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"{self.name}: pattern {pat!r} matches no block")
            out.extend(hits)
        return tuple(out)

    def _build_groups(self, spec: Mapping) -> dict[str, tuple[str, ...]]:
        groups = {g: self._expand(pats) for g, pats in spec.items() if g != "stack"}
        if "stack" in spec:  # a DiT's transformer blocks: split into thirds by position
            stack = self._expand(spec["stack"])
            n = len(stack)
            first = [b for i, b in enumerate(stack) if i * 3 < n]
            last = [b for i, b in enumerate(stack) if i * 3 >= 2 * n]
            mid = [b for b in stack if b not in first and b not in last]
            groups["in"] = tuple(groups.get("in", ())) + tuple(first)
            groups["mid"] = tuple(mid)
            groups["out"] = tuple(last) + tuple(groups.get("out", ()))
        return groups

    def compact_names(self, names: Sequence[str] | None = None) -> str:
        """'BASE, IN00-IN11, M00, OUT00-OUT11, TE, VAE': runs of a family shown as ranges."""
        names = list(self.names if names is None else names)
        parts: list[str] = []
        i = 0
        while i < len(names):
            j = i
            fam = self._family_of.get(names[i])
            while (j + 1 < len(names) and fam is not None and self._family_of.get(names[j + 1]) == fam
                   and len(self._members(fam)) > 1):
                j += 1
            parts.append(names[i] if j == i else f"{names[i]}-{names[j]}")
            i = j + 1
        return ", ".join(parts)

    def parent(self, name: str) -> str | None:
        return self._parent.get(name)

    def family(self, name: str) -> str | None:
        return self._family_of.get(name)

    # -- keys ----------------------------------------------------------------------------
    def _locate(self, key: str, kind: str) -> tuple[str | None, str]:
        if kind == "auto":
            hosts = self._auto
        elif kind in self._hosts:
            hosts = self._hosts[kind]
        else:
            raise BlockSpecError(f"unknown key naming {kind!r} (one of: {', '.join(KINDS)})")
        for prefix, region in hosts:
            if key.startswith(prefix):
                return region, key[len(prefix):]
        if kind in ("auto", "checkpoint"):  # a UNet/DiT-only file without prefix (e.g. BFL's flux1-dev)
            for prefix, region in self._hosts.get("unet", ()):
                rules = self._regions[region][1]
                if key.startswith(prefix) and rules and any(r.regex.search(key[len(prefix):]) for r in rules):
                    return region, key[len(prefix):]
        return None, key

    def _resolve(self, key: str, kind: str) -> tuple[str, tuple[str, ...]]:
        hit = self._chains.get((key, kind))
        if hit is not None:
            return hit
        region, rest = self._locate(key, kind)
        component, block = "other", "BASE"
        if region is not None:
            component, rules, fixed = self._regions[region]
            if rules is None:
                block = fixed
            else:
                for rule in rules:
                    m = rule.regex.search(rest)
                    if m:
                        block = rule.apply(m)
                        break
        if block not in self._name_set:  # an index this model's list form lacks (odd model): BASE
            block = "BASE"
        chain = [block]
        while chain[-1] in self._parent:
            chain.append(self._parent[chain[-1]])
        hit = (component, tuple(chain))
        if len(self._chains) < 200_000:
            self._chains[(key, kind)] = hit
        return hit

    def chain(self, key: str, kind: str = "auto") -> tuple[str, ...]:
        """Block names for `key`, finest first; the last is always one of `blocks`."""
        return self._resolve(key, kind)[1]

    def block(self, key: str, kind: str = "auto") -> str:
        """The list-form block of `key` (the last name of its chain)."""
        return self._resolve(key, kind)[1][-1]

    def component(self, key: str, kind: str = "auto") -> str:
        """The key's component as the layouts name it: diffuser, clip_l, clip_h, clip_g, t5xxl, vae, other."""
        return self._resolve(key, kind)[0]

    def rule_hits(self, key: str, kind: str = "auto") -> list[str]:
        """Every rule of the key's region that matches it (for checks: rules must not overlap)."""
        region, rest = self._locate(key, kind)
        if region is None:
            return []
        rules = self._regions[region][1]
        if rules is None:
            return [region]
        return [r.regex.pattern for r in rules if r.regex.search(rest)]

    def sized(self, keys: Iterable[str], kind: str = "auto") -> "Architecture":
        """This architecture with its variable families (SD3's joint blocks) cut to the count `keys` have."""
        if not self._variable:
            return self
        full = _load(self.name)  # the most blocks: every index of the keys has its name there
        top: dict[str, int] = {}
        for key in keys:
            block = full.block(key, kind)
            fam = full._family_of.get(block)
            if fam in full._variable:
                top[fam] = max(top.get(fam, 0), int(block[len(fam):]) + 1)
        counts = {fam: n for fam, n in top.items() if n != len(full._members(fam))}
        return Architecture(self.data, counts) if counts else full

    def __repr__(self) -> str:
        return f"Architecture({self.name!r}, {len(self.blocks)} blocks)"


@lru_cache(maxsize=None)
def _load(name: str) -> Architecture:
    return Architecture(architecture_data()[name])


def architecture(name: str) -> Architecture:
    """The block map of 'sd1', 'sd2', 'sdxl', 'sd3' or 'flux' (a few spellings like 'sd15' accepted)."""
    if isinstance(name, Architecture):
        return name
    key = str(name).strip().lower()
    key = _NAME_ALIASES.get(key, key)
    if key not in SUPPORTED:
        raise BlockSpecError(f"block weights are not defined for {display_name(str(name))!s} "
                             f"(supported: {', '.join(SUPPORTED)})")
    return _load(key)


def architecture_for_keys(keys, data_dir=None) -> str:
    """Detect the architecture from key names (and shapes, when `keys` maps key -> shape/spec).

    Also reads ComfyUI MODEL/CLIP keys and kohya LoRA names (arch.detect_from_names: the data's detect
    markers and its hosts' text-encoder prefixes). Returns one of SUPPORTED, a language-model family or
    'unknown'. SD1 and SD2 share the block map; without shapes a bare UNet reads as 'sd1'."""
    specs = keys if isinstance(keys, Mapping) else {k: () for k in keys}
    arch = detect_architecture(specs, data_dir)
    if arch != "unknown":
        return arch
    return detect_from_names(specs, data_dir)


# ---------------------------------------------------------------------------------------------
# block values

class BlockValues:
    """Values per block name (list-form and fine names) for one architecture."""

    def __init__(self, arch: Architecture, values: Mapping[str, float], source: str = ""):
        self.arch = arch
        order = {n: i for i, n in enumerate(arch.names)}
        self.values: dict[str, float] = dict(sorted(values.items(), key=lambda kv: order[kv[0]]))
        self.source = source

    def for_block(self, name: str) -> float | None:
        """Value of a block name, following the chain (TE unset -> BASE)."""
        while name is not None:
            if name in self.values:
                return self.values[name]
            name = self.arch.parent(name)
        return None

    def value(self, key: str, kind: str = "auto") -> float | None:
        """Value for the key's finest named block in its chain; None when the spec leaves it unset."""
        for name in self.arch.chain(key, kind):
            if name in self.values:
                return self.values[name]
        return None

    def table(self) -> dict[str, float]:
        """Block name -> value, in the architecture's order (for recipe metadata)."""
        return dict(self.values)

    def spec(self) -> str:
        """The values as a named spec ('BASE:0, IN00-IN05:0.2, M00:1'); parses back to equal values."""
        parts: list[str] = []
        items = list(self.values.items())
        i = 0
        while i < len(items):
            name, value = items[i]
            fam = self.arch.family(name)
            j = i
            while (j + 1 < len(items) and fam is not None and len(self.arch._members(fam)) > 1
                   and self.arch.family(items[j + 1][0]) == fam and items[j + 1][1] == value):
                j += 1
            label = name if j == i else f"{name}-{items[j][0]}"
            parts.append(f"{label}:{value!r}")
            i = j + 1
        return ", ".join(parts)

    def is_complete(self) -> bool:
        """True when every list-form block has a value (so every key has one)."""
        return all(b in self.values for b in self.arch.blocks)

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockValues) and other.arch.name == self.arch.name and other.values == self.values

    def __repr__(self) -> str:
        return f"BlockValues({self.arch.name!r}, {self.values!r})"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _number(text, where: str) -> float:
    if isinstance(text, bool):
        raise BlockSpecError(f"{where}: {text!r} is not a number")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s)
        except ValueError:
            raise BlockSpecError(f"{where}: {s!r} is not a number") from None
    if not math.isfinite(value):
        raise BlockSpecError(f"{where}: {text!r} is not a finite number")
    return value


def _list_counts(arch: Architecture) -> dict[int, str]:
    return {len(blocks): form for form, blocks in arch.list_forms.items()}


def _from_list(arch: Architecture, items: Sequence, what: str) -> BlockValues:
    counts = _list_counts(arch)
    n = len(items)
    if n not in counts:
        expected = " or ".join(f"{len(b)} ({arch.compact_names(b)})" for b in arch.list_forms.values())
        msg = f"{what}: {n} value{'s' if n != 1 else ''}, but {arch.display} takes {expected}"
        others = [a for a in SUPPORTED if a != arch.name and n in _list_counts(architecture(a))]
        if others:
            shown = "/".join(dict.fromkeys(architecture(a).display for a in others))
            msg = (f"{what}: {n} values is a {shown} block list; the models are {arch.display} "
                   f"({len(arch.blocks)} blocks)")
        raise BlockSpecError(msg)
    names = arch.list_forms[counts[n]]
    values = {}
    for i, (name, item) in enumerate(zip(names, items)):
        values[name] = _number(item, f"{what} value {i + 1} ({name})")
    return BlockValues(arch, values, "list")


def _not_a_block(arch: Architecture, name: str, what: str) -> BlockSpecError:
    article = "an" if arch.display.startswith("S") else "a"  # an SDXL / an SD1.x / a Flux
    return BlockSpecError(f"{what}: {name} is not {article} {arch.display} block "
                          f"({arch.display}: {arch.compact_names()})")


def _canonical(arch: Architecture, name: str) -> str:
    """IN4 -> IN04, D3 -> D03, M -> M00 (a one-block family); other names unchanged."""
    if name in arch._name_set:
        return name
    m = re.fullmatch(r"([A-Z]+)(\d{1,2})", name)
    if m and len(arch._members(m[1])) > 1:
        return f"{m[1]}{int(m[2]):02d}"
    members = arch._members(name)
    return members[0] if len(members) == 1 else name


def _resolve_names(arch: Architecture, token: str, what: str) -> list[str]:
    """Block names selected by NAME, a family (IN = IN00..IN11), A-B (within one family), or a glob (*, ?, [])."""
    tok = token.strip().upper()
    if not tok:
        raise BlockSpecError(f"{what}: an entry has no block name")
    if any(c in tok for c in "*?["):
        hits = [n for n in arch.names if fnmatch.fnmatchcase(n, tok)]
        if not hits:
            raise BlockSpecError(f"{what}: {token.strip()} matches no {arch.display} block "
                                 f"({arch.display}: {arch.compact_names()})")
        return hits
    if "-" in tok:
        a, _, b = (_canonical(arch, p.strip()) for p in tok.partition("-"))
        for end in (a, b):
            if end not in arch.blocks:
                raise _not_a_block(arch, end, what)
        fa, fb = arch.family(a), arch.family(b)
        members = arch._members(fa)
        if fa != fb:
            raise BlockSpecError(f"{what}: range {a}-{b} spans two block families; a range stays within one "
                                 f"(e.g. {a}-{members[-1]}, then more entries)")
        i, j = sorted((members.index(a), members.index(b)))
        return list(members[i:j + 1])
    if tok in arch.aliases:
        return list(arch.aliases[tok])
    name = _canonical(arch, tok)
    if name in arch._name_set:
        return [name]
    if len(arch._members(tok)) > 1:  # a whole family: IN, OUT, D, S, J
        return list(arch._members(tok))
    raise _not_a_block(arch, tok, what)


_SPLIT = re.compile(r"[,;\n]")
_PRESET = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:[:=(]\s*([^)]*?)\s*\)?)?\s*$")


def _preset_entry(arch: Architecture, entry: str, what: str) -> BlockValues | None:
    m = _PRESET.match(entry)
    if not m or m[1].lower() not in PRESETS or m[1].upper() in arch._name_set or m[1].upper() in arch.aliases:
        return None
    strength = _number(m[2], f"{what}: preset {m[1]}") if m[2] else 1.0
    return preset(arch, m[1].lower(), strength)


def parse_block_values(arch: Architecture | str, spec, *, what: str = "--blocks") -> BlockValues:
    """Parse a user's block-weight spec for `arch`.

    spec: a comma list of len(arch.blocks) numbers (or another of the arch's list forms);
    named entries "BASE:0, IN00-IN05:0.2, M00=1, OUT*:0.8" (ranges within one family, globs,
    fine names TE/TE1/TE2/T5/VAE; later entries win; a preset name as an entry sets its values
    first); a preset name ("grad_in_out", "flat:0.5"); a dict {name: value} (from YAML/JSON,
    may hold "preset"); a list of numbers; or a BlockValues."""
    arch = architecture(arch)
    if isinstance(spec, BlockValues):
        if spec.arch.name != arch.name:
            raise BlockSpecError(f"{what}: block values for {spec.arch.display}, but the models are {arch.display}")
        return spec
    if isinstance(spec, (list, tuple)):
        return _from_list(arch, list(spec), what)
    if isinstance(spec, Mapping):
        values: dict[str, float] = {}
        sources = []
        for name, raw in spec.items():
            if not isinstance(name, str):
                raise BlockSpecError(f"{what}: block name {name!r} is not text")
            if name.strip().lower() == "preset":
                if isinstance(raw, Mapping):
                    raw_name, strength = raw.get("name"), raw.get("strength", 1.0)
                else:
                    raw_name, strength = raw, None
                base = _preset_entry(arch, str(raw_name) if strength is None else f"{raw_name}:{strength}", what)
                if base is None:
                    raise BlockSpecError(f"{what}: unknown preset {raw_name!r} (presets: {', '.join(arch.presets)})")
                values.update(base.values)
                sources.append(str(raw_name))
                continue
            for block in _resolve_names(arch, name, what):
                values[block] = _number(raw, f"{what}: {name.strip()}")
        return BlockValues(arch, values, "named")
    if not isinstance(spec, str):
        raise BlockSpecError(f"{what}: expected text, a list or a mapping, not {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise BlockSpecError(f"{what}: empty block spec")
    entries = [e.strip() for e in _SPLIT.split(text)]
    if len(entries) > 1 and not entries[-1]:
        entries.pop()  # a trailing comma
    if len(entries) == 1:
        hit = _preset_entry(arch, entries[0], what)
        if hit is not None:
            return hit
    if not any(":" in e or "=" in e for e in entries):
        if len(entries) == 1 and not _looks_number(entries[0]):
            raise BlockSpecError(f"{what}: {entries[0]!r} is not a preset (presets: {', '.join(arch.presets)}); "
                                 f"give NAME:VALUE entries or {len(arch.blocks)} values")
        return _from_list(arch, entries, what)
    values = {}
    for entry in entries:
        if not entry:
            raise BlockSpecError(f"{what}: empty entry in {text!r}")
        base = _preset_entry(arch, entry, what)
        if base is not None:
            values.update(base.values)
            continue
        if ":" not in entry and "=" not in entry:
            raise BlockSpecError(f"{what}: entry {entry!r} has no block name; write NAME:VALUE for every entry "
                                 f"or give a plain list of {len(arch.blocks)} values")
        sep = min(i for i in (entry.find(":"), entry.find("=")) if i >= 0)
        name, raw = entry[:sep], entry[sep + 1:]
        for block in _resolve_names(arch, name, what):
            values[block] = _number(raw, f"{what}: {name.strip()}")
    return BlockValues(arch, values, "named")


def _looks_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# presets

def _ramp(arch: Architecture, f) -> dict[str, float]:
    body = [b for b in arch.blocks if b != "BASE"]
    n = len(body)
    values = {b: f(i / (n - 1) if n > 1 else 0.0) for i, b in enumerate(body)}
    return {"BASE": f(0.0), **values}


def _preset_values(arch: Architecture, name: str) -> dict[str, float]:
    if name == "flat":
        return {b: 1.0 for b in arch.blocks}
    if name == "grad_in_out":
        return _ramp(arch, lambda t: t)
    if name == "grad_out_in":
        return _ramp(arch, lambda t: 1.0 - t)
    if name == "smooth":
        return _ramp(arch, lambda t: t * t * (3.0 - 2.0 * t))
    if name == "ring":
        return _ramp(arch, lambda t: (1.0 + math.cos(2.0 * math.pi * t)) / 2.0)
    if name in ("in_only", "mid_only", "out_only"):
        group = set(arch.groups.get(name[:-5], ()))
        return {b: 1.0 if b in group else 0.0 for b in arch.blocks}
    if name == "base_only":
        return {b: 1.0 if b == "BASE" else 0.0 for b in arch.blocks}
    if name == "te_only":
        values = {b: 0.0 for b in arch.blocks}
        values.update({b: 1.0 for b in arch.groups.get("te", ())})
        return values
    if name == "model_only":
        return {b: 0.0 if b == "BASE" else 1.0 for b in arch.blocks}
    raise KeyError(name)


def preset(arch: Architecture | str, name: str, strength: float = 1.0) -> BlockValues:
    """A preset's block values (see PRESETS), scaled by `strength`; values in [0, strength]."""
    arch = architecture(arch)
    key = str(name).strip().lower()
    if key not in arch.presets:
        raise BlockSpecError(f"unknown block preset {name!r} for {arch.display} (presets: {', '.join(arch.presets)})")
    strength = _number(strength, f"preset {key} strength")
    values = {b: round(v * strength, 6) for b, v in _preset_values(arch, key).items()}
    return BlockValues(arch, values, f"preset:{key}" + ("" if strength == 1.0 else f":{_fmt(strength)}"))


# ---------------------------------------------------------------------------------------------
# files and per-key overrides

def load_block_file(path) -> dict | list | str:
    """Read a YAML or JSON block file: one spec (mapping, list or text) or per-model specs (a mapping)."""
    p = Path(path)
    data = read_data_file(p, "block file", BlockSpecError)
    if data is None or data == {} or data == [] or (isinstance(data, str) and not data.strip()):
        raise BlockSpecError(f"block file {p}: empty")
    if not isinstance(data, (dict, list, str)):
        raise BlockSpecError(f"block file {p}: expected a mapping, a list or a block spec, "
                             f"not {type(data).__name__}")
    _check_file_content(data, p)
    return data


def _check_file_content(data, p: Path, where: str = "") -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            if not isinstance(k, str):
                raise BlockSpecError(f"block file {p}: key {k!r}{where} is not text")
            _check_file_content(v, p, f" in {k}")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, (dict, list)):
                raise BlockSpecError(f"block file {p}: nested list/mapping{where} in a value list")
            _check_file_content(item, p, where)
    elif isinstance(data, bool) or not isinstance(data, (int, float, str)):
        raise BlockSpecError(f"block file {p}: value {data!r}{where} is not a number or text")


def parse_override(text: str, *, what: str = "--override") -> tuple[str, float]:
    """'PATTERN=VALUE' -> (pattern, value)."""
    s = str(text).strip()
    pattern, sep, raw = s.rpartition("=")
    pattern = pattern.strip()
    if not sep or not pattern or not raw.strip():
        raise BlockSpecError(f"{what}: {s!r} is not PATTERN=VALUE (e.g. attn2=0.5 or *.ff.net.*=0)")
    return pattern, _number(raw, f"{what} {pattern}")


def _component_match(key_parts: list[str], pat_parts: list[str]) -> bool:
    n = len(pat_parts)
    return any(key_parts[i:i + n] == pat_parts for i in range(len(key_parts) - n + 1))


def match_overrides(keys: Iterable[str], overrides: Sequence[tuple[str, float]]
                    ) -> tuple[dict[str, float], dict[str, int]]:
    """Per-key ("elemental") overrides. A pattern with * ? [ is a glob on the whole key; one
    without matches keys holding it as whole dot-separated components ("attn2" matches
    "...attn2.to_k.weight", not "...attn20..."). Later overrides win.

    Returns (key -> value for matched keys, pattern -> keys matched). A pattern matching
    nothing raises BlockSpecError."""
    keys = list(keys)
    result: dict[str, float] = {}
    counts: dict[str, int] = {}
    split = [k.split(".") for k in keys]
    for pattern, value in overrides:
        pat = str(pattern).strip()
        if not pat:
            raise BlockSpecError("--override: empty pattern")
        value = _number(value, f"--override {pat}")
        if any(c in pat for c in "*?["):
            hits = [k for k in keys if fnmatch.fnmatchcase(k, pat)]
        else:
            parts = pat.strip(".").split(".")
            hits = [k for k, kp in zip(keys, split) if _component_match(kp, parts)]
        if not hits:
            raise BlockSpecError(f"--override: pattern {pat!r} matches no key")
        counts[pat] = counts.get(pat, 0) + len(hits)
        for k in hits:
            result[k] = value
    return result, counts


# ---------------------------------------------------------------------------------------------
# text

def describe(arch: Architecture | str) -> str:
    """The text of `python -m merge_core blocks ARCH`."""
    arch = architecture(arch)
    lines = [f"{arch.display} ({arch.name}): {arch.description}", "",
             f"Blocks, in list order ({len(arch.blocks)} values):"]
    for fam, members, covers in arch._families:
        label = members[0] if len(members) == 1 else f"{members[0]}-{members[-1]}"
        lines.append(f"  {label:<12} {covers}")
    if arch.fine_names:
        lines += ["", "Finer names (override their parent for those keys; unset, they follow it):"]
        for name in arch.fine_names:
            lines.append(f"  {name:<12} {arch._fine_covers[name]} (else {arch.parent(name)})")
    if arch.aliases:
        lines.append("  aliases: " + "; ".join(f"{a} = {'+'.join(v)}" for a, v in arch.aliases.items()))
    others = [(form, blocks) for form, blocks in arch.list_forms.items() if form != "blocks"]
    if others:
        lines += ["", "Other list forms accepted:"]
        for form, blocks in others:
            lines.append(f"  {len(blocks)} values: {arch.compact_names(blocks)}"
                         + (f" ({arch._list_form_text[form]})" if arch._list_form_text.get(form) else ""))
    lines += ["", "Presets (values in [0, 1]; NAME:S scales them by S):"]
    for name, text in arch.presets.items():
        lines.append(f"  {name:<12} {text}")
    lines += ["", "Spec: a list of values in the order above, NAME:VALUE entries "
                  "(ranges like IN00-IN05 within a family, globs like OUT*), or a preset name."]
    return "\n".join(lines)

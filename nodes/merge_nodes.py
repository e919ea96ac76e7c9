"""Merge nodes generated from merge_core's method registry, and the from-disk checkpoint merger.

Every registered method gets a MODEL and a CLIP node whose widgets come from its `Param`s (`build()`; a method
registered later gets its nodes the next time `build()` runs, e.g. at ComfyUI's start). Names and inputs of the
nodes that existed before generation are kept (saved workflows load): Karcher/SLERP nodes keep their names and
input names, the moving-average node (SMA/EMA/WMA with a method picker) and "Merge checkpoints" (every method) are
grouped nodes whose widgets are the union of their methods' parameters; widgets added later go at the end.
"""
from __future__ import annotations

import math
import os
import re

from ..merge_core import registry
from ..merge_core.engine import merge as engine_merge
from ..merge_core.errors import MergeError
from .block_nodes import BLOCK_WEIGHTS
from .common import (CATEGORY, MAX_INPUTS, NONE, checkpoint_inputs, checkpoint_paths, merge_state_dicts,
                     parse_numbers, plain_file_name)

UNET_PREFIX = "diffusion_model."
# Names kept from the hand-written nodes (saved workflows refer to them).
LEGACY_NAMES = {"karcher": "Karcher", "slerp": "Slerp"}
INPUT_NAMES = {"karcher_iter": "iterations", "karcher_tol": "tolerance"}
CHECKPOINT_WIDGETS = ("weights", "t", "alpha", "multiplier")  # the file merger's original widget order
UNBOUNDED = 1.0e4  # widget range of a side a parameter leaves open
BLOCK_INPUT = {"block_weights": (BLOCK_WEIGHTS, {"tooltip": "from a Block weights node: the method's block "
                                                            "parameter per block / per key"})}
# Front-end hints (javascript/manifold_merge.js reads them from the node definition, under this key of an input's
# options): {"method_widgets": {method: [widget, ...]}} on a method picker (only the chosen method's widgets are
# shown), {"grow": True} on optional model sockets (added one at a time as they are connected) and
# {"with": socket} on a per-model widget (shown with its socket). Data, so the script lists no method.
FRONT_END = "manifold"
SAVE_AS_TIP = ("file name of the merged checkpoint (.safetensors is added; no folders): written next to "
               "ckpt_1 in the checkpoints folder (models/checkpoints, or ckpt_1's subfolder there), so it shows in "
               "the checkpoint pickers after a refresh (R); never over an existing file; empty = not saved")


# ------------------------------------------------------------------------------------------------
# widgets from Params

def input_name(param) -> str:
    return INPUT_NAMES.get(param.name, param.name)


def per_input(param) -> bool:
    """A per-model parameter shown as one widget per model input (`weight1..N`); one whose default depends on
    the number of models (WMA's N..1) cannot be a fixed widget value and is a text list instead."""
    return param.per_model and not callable(param.default)


def per_input_name(param, i: int) -> str:
    return f"weight{i}" if param.name == "weights" else f"{param.name}{i}"


def per_input_default(param, i: int) -> float:
    """Input i's (1-based) widget default: from a list default, else 1 (equal weights when none is given)."""
    if isinstance(param.default, (list, tuple)):
        return param.default[i - 1] if i <= len(param.default) else 1.0
    return 1.0 if param.default is None else param.default


def _step(default) -> float:
    if isinstance(default, (int, float)) and default:
        return min(0.01, 10.0 ** (math.floor(math.log10(abs(default))) - 1))
    return 0.01


def number_widget(param, default=None) -> tuple:
    """FLOAT/INT widget with the parameter's default and range (an open minimum is nudged inside)."""
    default = param.default if default is None else default
    tip = f"{param.help} ({param.range_text()})".strip()
    if param.kind is int:
        lo = int(param.minimum) + (1 if param.min_open else 0) if param.minimum is not None else -int(UNBOUNDED)
        hi = int(param.maximum) if param.maximum is not None else int(UNBOUNDED)
        # control_after_generate off: ComfyUI's front end would add a "randomize" widget after an INT named seed,
        # re-seeding (and re-merging) at every queue and showing for every method of a grouped node.
        return ("INT", {"default": int(default), "min": lo, "max": hi, "tooltip": tip,
                        "control_after_generate": False})
    step = _step(default)
    lo = -UNBOUNDED if param.minimum is None else param.minimum + (step / 10 if param.min_open else 0.0)
    hi = UNBOUNDED if param.maximum is None else param.maximum
    return ("FLOAT", {"default": min(max(float(default), lo), hi), "min": lo, "max": hi, "step": step,
                      "tooltip": tip})


def list_widget(param, tip: str | None = None) -> tuple:
    what = "one number per model, in input order" if param.per_model else "a number"
    return ("STRING", {"default": "", "tooltip": f"{tip or param.help}: {what}; empty = the default"})


def widget(param) -> tuple:
    """The widget of a parameter that is not per input: a number, or a text when it has no fixed default."""
    if param.per_model or param.default is None or callable(param.default):
        return list_widget(param)
    return number_widget(param)


def widget_value(param, raw, what: str):
    """A widget's value as merge_core's `params` takes it (None: not given, the method's default)."""
    if isinstance(raw, str):
        numbers = parse_numbers(raw, what, int if param.kind is int else float)
        if numbers is None or param.per_model:
            return numbers
        if len(numbers) != 1:
            raise MergeError(f"{what}: one number, got {len(numbers)}")
        return numbers[0]
    return raw


# ------------------------------------------------------------------------------------------------
# messages in the node's words

def _flag_names(methods) -> dict[str, str]:
    names = {"--blocks": "block_weights", "--override": "block weights override"}
    for method in methods:
        for p in method.params:
            for flag in (p.flag,) + p.flags:
                names.setdefault(flag, input_name(p))
    return names


_HINTS = ((re.compile(r"\s*Use --force[^.]*\."), " Connect models of one architecture."),
          (re.compile(r"\(use --overwrite to replace it\)"), "(pick another save_as name)"))


def node_words(text: str, methods) -> str:
    """merge_core's one-line message with CLI flags replaced by the node's input names."""
    for pattern, repl in _HINTS:
        text = pattern.sub(repl, text)
    for flag, name in sorted(_flag_names(methods).items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", name, text)
    return text


def run_merge(methods, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except MergeError as exc:
        raise type(exc)(node_words(str(exc), methods)) from None


# ------------------------------------------------------------------------------------------------
# MODEL / CLIP plumbing

def _weights_of(objs, kind: str) -> list[dict]:
    from . import bridge
    if kind == "MODEL":
        return [bridge.effective_weights(o, UNET_PREFIX) for o in objs]
    return bridge.clip_weights(objs)


def _with_weights(target, kind: str, merged: dict):
    """A clone of the first input carrying the merged weights as patches (MODEL, or CLIP's patcher)."""
    from . import bridge
    if kind == "MODEL":
        return bridge.patched_clone(target, merged)
    clone = target.clone()
    clone.patcher = bridge.patched_clone(target.patcher, merged)
    return clone


def merge_objects(objs, kind: str, method, values: dict, base=None, block_weights=None, names=None):
    """Merge ComfyUI MODELs / CLIPs (and a base) with `method`; returns the merged state dict."""
    sds = _weights_of(list(objs) + ([base] if base is not None else []), kind)
    base_sd = sds.pop() if base is not None else None
    names = names or [f"{kind.lower()}{i + 1}" for i in range(len(objs))]
    kw = {}
    if block_weights is not None:
        kw = block_weights.engine_args(method, len(sds), kind)
        block_weights.check_architecture({k: tuple(v.shape) for k, v in sds[0].items()})
        kw["block_architecture"] = block_weights.arch
    return run_merge([method], merge_state_dicts, sds, method.name, names, params=values, base=base_sd, **kw)


# ------------------------------------------------------------------------------------------------
# node classes

def model_input_names(method, kind: str) -> list[str]:
    low, n = kind.lower(), min(method.max_models, MAX_INPUTS)
    if method.max_models <= 3:  # A/B(/C) as in "A + M*(B - C)"
        return [f"{low}_{'abc'[i]}" for i in range(n)]
    return [f"{low}{i + 1}" for i in range(n)]


def _camel(label: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", label)
    return "".join(w[:1].upper() + w[1:] for w in words)


def class_stem(method) -> str:
    return LEGACY_NAMES.get(method.name) or _camel(method.label) or _camel(method.name)


def _description(methods, kind: str) -> str:
    parts = []
    for m in methods:
        params = "; ".join(f"{input_name(p)}: {p.help}" for p in m.params)
        parts.append(f"{m.label}: {m.help}" + (f" ({params})" if params else ""))
    return " | ".join(parts) + (f". Inputs: {kind}s; optional block_weights from a Block weights node."
                                if kind else "")


class _Node:
    CATEGORY = CATEGORY
    FUNCTION = "run"


def method_node(method, kind: str) -> type:
    """The MODEL or CLIP node of one registered method."""
    low = kind.lower()
    inputs = model_input_names(method, kind)
    per_inputs = [p for p in method.params if per_input(p)]
    others = [p for p in method.params if not per_input(p)]

    def INPUT_TYPES(cls):
        required, optional = {}, {}
        for i, name in enumerate(inputs):
            grows = i >= method.min_models
            target = optional if grows else required
            target[name] = (kind, {FRONT_END: {"grow": True}}) if grows else (kind,)
            for p in per_inputs:
                spec = number_widget(p, per_input_default(p, i + 1))
                target[per_input_name(p, i + 1)] = (spec[0], {**spec[1], FRONT_END: {"with": name}}) if grows \
                    else spec
        required.update({input_name(p): widget(p) for p in others})
        if method.takes_base:
            optional[f"base_{low}"] = (kind,)
        return {"required": required, "optional": {**optional, **BLOCK_INPUT}}

    def run(self, block_weights=None, **kw):
        objs, per_model = [], {p.name: [] for p in per_inputs}
        for i, name in enumerate(inputs):
            if kw.get(name) is None:
                continue
            objs.append(kw[name])
            for p in per_inputs:
                per_model[p.name].append(kw.get(per_input_name(p, i + 1), per_input_default(p, i + 1)))
        values = {**per_model}
        for p in others:
            values[p.name] = widget_value(p, kw.get(input_name(p)), input_name(p))
        values = {k: v for k, v in values.items() if v is not None}
        run_merge([method], method.bind, len(objs), values)
        base = kw.get(f"base_{low}")
        merged = merge_objects(objs, kind, method, values, base, block_weights,
                               [inputs[i] for i in range(len(inputs)) if kw.get(inputs[i]) is not None])
        return (_with_weights(objs[0], kind, merged),)

    name = f"ManifoldMerge{class_stem(method)}{kind.title()}"
    return type(name, (_Node,), {
        "INPUT_TYPES": classmethod(INPUT_TYPES), "run": run, "RETURN_TYPES": (kind,), "METHOD": method.name,
        "DISPLAY_NAME": f"{method.label} merge ({kind})", "DESCRIPTION": _description([method], kind),
        "__module__": __name__})


def group_widgets(methods, first=()) -> tuple[dict, dict, dict]:
    """Union of the methods' parameter widgets (per-model ones as text lists): (first, rest, name -> params)."""
    specs, targets = {}, {}
    for m in methods:
        for p in m.params:
            name = input_name(p)
            if name in specs and specs[name][0] != widget(p)[0]:
                name = f"{m.name.replace('-', '_')}_{p.name}"  # same name, other kind: keep both apart
            if name not in specs:
                specs[name] = list_widget(p) if p.per_model else widget(p)
            elif specs[name][0] in ("FLOAT", "INT"):  # shared widget: the widest range
                old = specs[name][1]
                new = widget(p)[1]
                specs[name] = (specs[name][0], {**old, "min": min(old["min"], new["min"]),
                                                "max": max(old["max"], new["max"])})
            targets.setdefault(name, []).append((m.name, p.name))
    head = {n: specs[n] for n in first if n in specs}
    tail = {n: s for n, s in specs.items() if n not in head}
    return head, tail, targets


def method_picker(methods, names, targets: dict) -> tuple:
    """The method combo, carrying which widget belongs to which method (for the front end)."""
    shown = {m.name: [w for w, pairs in targets.items() if any(mn == m.name for mn, _ in pairs)] for m in methods}
    return (list(names), {"tooltip": "the merge method; only its widgets are used (and shown)",
                          FRONT_END: {"method_widgets": shown}})


def group_values(method, targets: dict, kw: dict) -> dict:
    values = {}
    for name, pairs in targets.items():
        for method_name, param_name in pairs:
            if method_name == method.name and kw.get(name) is not None:
                value = widget_value(method.param(param_name), kw[name], name)
                if value is not None:
                    values[param_name] = value
    return values


def moving_average_node(kind: str) -> type:
    """SMA / EMA / WMA in one node with a method picker (the original node; each also has its own)."""
    low = kind.lower()
    names = ("sma", "ema", "wma")
    inputs = [f"{low}{i}" for i in range(1, MAX_INPUTS + 1)]

    def methods():
        return [registry.get(n) for n in names]

    def INPUT_TYPES(cls):
        head, tail, targets = group_widgets(methods())
        return {"required": {"method": method_picker(methods(), names, targets), inputs[0]: (kind,),
                             inputs[1]: (kind,), **head, **tail},
                "optional": {**{n: (kind, {FRONT_END: {"grow": True}}) for n in inputs[2:]}, **BLOCK_INPUT}}

    def run(self, method, block_weights=None, **kw):
        entry = registry.get(method)
        _, _, targets = group_widgets(methods())
        values = run_merge(methods(), group_values, entry, targets, kw)
        objs = [kw[n] for n in inputs if kw.get(n) is not None]
        run_merge([entry], entry.bind, len(objs), values)
        merged = merge_objects(objs, kind, entry, values, None, block_weights,
                               [n for n in inputs if kw.get(n) is not None])
        return (_with_weights(objs[0], kind, merged),)

    return type(f"ManifoldMergeMovingAverage{kind.title()}", (_Node,), {
        "INPUT_TYPES": classmethod(INPUT_TYPES), "run": run, "RETURN_TYPES": (kind,),
        "DISPLAY_NAME": f"Moving average SMA/EMA/WMA ({kind})",
        "DESCRIPTION": ("SMA (equal weights), EMA (each newer input weighs alpha) or WMA (weights, default N..1: "
                        f"the first input weighs most) of 2-8 {kind}s; optional block_weights."),
        "__module__": __name__})


class ManifoldMergeCheckpoints:
    """Streams 2-8 checkpoint files through merge_core (never all loaded) and returns MODEL, CLIP, VAE."""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "run"
    DISPLAY_NAME = "Merge checkpoints (streamed from disk)"
    DESCRIPTION = ("Any merge method over 2-8 checkpoint files from models/checkpoints, streamed by merge_core "
                   "(the models are never all loaded); only the chosen method's widgets are used. save_as (optional) "
                   "also writes the merged checkpoint next to ckpt_1 in the checkpoints folder (models/checkpoints), "
                   "so it appears in the checkpoint pickers; an existing file is never replaced. Optional "
                   "block_weights.")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional = checkpoint_inputs()
        methods = registry.all_methods()
        head, tail, targets = group_widgets(methods, CHECKPOINT_WIDGETS)
        return {"required": {**required, "method": method_picker(methods, registry.method_names(), targets), **head,
                             "save_as": ("STRING", {"default": "", "tooltip": SAVE_AS_TIP})},
                "optional": {**optional, **tail, **BLOCK_INPUT}}

    @classmethod
    def IS_CHANGED(cls, **kw):
        import folder_paths
        stamps = []
        for key, name in sorted(kw.items()):
            if key.startswith("ckpt_") and name != NONE:
                path = folder_paths.get_full_path("checkpoints", name)
                stamps.append(os.path.getmtime(path) if path else 0)
        return f"{stamps}{sorted((k, repr(v)) for k, v in kw.items() if not k.startswith('ckpt_'))}"

    def run(self, method, save_as, block_weights=None, **kw):
        from . import bridge
        methods = registry.all_methods()
        entry = run_merge(methods, registry.get, method)
        paths = checkpoint_paths(kw)
        output = None
        if save_as.strip():  # beside the first input checkpoint
            output = os.path.join(os.path.dirname(paths[0]), plain_file_name(save_as, "save_as"))
        _, _, targets = group_widgets(methods, CHECKPOINT_WIDGETS)
        params = run_merge(methods, group_values, entry, targets, kw)
        run_merge([entry], entry.bind, len(paths), params)
        extra = {}
        if block_weights is not None:
            extra = run_merge([entry], block_weights.engine_args, entry, len(paths), "CHECKPOINT")
            from ..merge_core.io import open_model
            with open_model(paths[0]) as first:
                block_weights.check_architecture(first.specs(), "the checkpoints")
            extra["block_architecture"] = block_weights.arch
        result = run_merge([entry], engine_merge, paths, entry.name, output=output, params=params,
                           device=bridge.torch_device(), progress=bridge.progress_callback(), **extra)
        return load_result(output, result)


def load_result(output, result):
    import comfy.sd
    import folder_paths
    embeddings = folder_paths.get_folder_paths("embeddings")
    if output is not None:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            output, output_vae=True, output_clip=True, embedding_directory=embeddings)
    else:
        model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
            result.state_dict, output_vae=True, output_clip=True, embedding_directory=embeddings)
    return (model, clip, vae)


def build() -> dict[str, type]:
    """Every merge node, from the registry as it is now (a method registered later: call again)."""
    nodes = {}
    for method in registry.all_methods():
        if method.min_models > MAX_INPUTS:
            continue  # needs more inputs than a node has
        for kind in ("MODEL", "CLIP"):
            cls = method_node(method, kind)
            nodes.setdefault(cls.__name__, cls)
    for kind in ("MODEL", "CLIP"):
        cls = moving_average_node(kind)
        nodes[cls.__name__] = cls
    nodes["ManifoldMergeCheckpoints"] = ManifoldMergeCheckpoints
    return nodes


MERGE_NODES = build()

"""Karcher / SLERP / moving-average nodes for MODEL and CLIP, and the from-disk checkpoint merger."""
from __future__ import annotations

import os

from ..merge_core import registry
from .common import (CATEGORY, NONE, checkpoint_inputs, checkpoint_paths, collect, merge_state_dicts,
                     optional_inputs, parse_numbers, plain_file_name)

UNET_PREFIX = "diffusion_model."


def _weights_of(objs, kind: str) -> tuple[list[dict], list[str]]:
    from . import bridge
    if kind == "MODEL":
        sds = [bridge.effective_weights(o, UNET_PREFIX) for o in objs]
    else:
        sds = [bridge.effective_weights(o.patcher, None, bridge.SKIP_CLIP_KEYS) for o in objs]
    return sds, [f"{kind.lower()}{i + 1}" for i in range(len(objs))]


def _run(objs, kind: str, method: str, **kw):
    sds, names = _weights_of(objs, kind)
    merged = merge_state_dicts(sds, method, names, **kw)
    return (_with_weights(objs[0], kind, merged),)


def _with_weights(target, kind: str, merged: dict):
    """A clone of the first input carrying the merged weights as patches (MODEL, or CLIP's patcher)."""
    from . import bridge
    if kind == "MODEL":
        return bridge.patched_clone(target, merged)
    clone = target.clone()
    clone.patcher = bridge.patched_clone(target.patcher, merged)
    return clone


class _Node:
    CATEGORY = CATEGORY
    FUNCTION = "run"


def _named(cls, prefix: str, kind: str):
    cls.RETURN_TYPES = (kind,)
    cls.__name__ = cls.__qualname__ = f"ManifoldMerge{prefix}{kind.title()}"
    return cls


def _karcher_class(kind: str):
    low = kind.lower()

    class Karcher(_Node):
        DESCRIPTION = (f"Weighted Karcher (Riemannian) mean of 2-8 {kind}s: whole-tensor directions averaged "
                       f"on the sphere, magnitude = weighted mean of norms.")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {f"{low}1": (kind,), "weight1": ("FLOAT", {"default": 1.0, "min": -10, "max": 10, "step": 0.01}),
                                 f"{low}2": (kind,), "weight2": ("FLOAT", {"default": 1.0, "min": -10, "max": 10, "step": 0.01}),
                                 "iterations": ("INT", {"default": 10, "min": 0, "max": 1000}),
                                 "tolerance": ("FLOAT", {"default": 1e-5, "min": 1e-12, "max": 1.0, "step": 1e-6})},
                    "optional": optional_inputs(kind, with_weight=True)}

        def run(self, iterations, tolerance, **kwargs):
            objs, weights = collect(kwargs, low, with_weight=True)
            return _run(objs, kind, "karcher", weights=weights, karcher_iter=iterations, karcher_tol=tolerance)

    return _named(Karcher, "Karcher", kind)


def _slerp_class(kind: str):
    low = kind.lower()

    class Slerp(_Node):
        DESCRIPTION = f"Whole-tensor SLERP of two {kind}s (t = 0 gives the first); with a base, of their task vectors."

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {f"{low}_a": (kind,), f"{low}_b": (kind,),
                                 "t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})},
                    "optional": {f"base_{low}": (kind,)}}

        def run(self, t, **kwargs):
            a, b, base = kwargs[f"{low}_a"], kwargs[f"{low}_b"], kwargs.get(f"base_{low}")
            if base is None:
                return _run([a, b], kind, "slerp", t=t)
            sds, names = _weights_of([a, b, base], kind)
            merged = merge_state_dicts(sds[:2], "slerp", names[:2], t=t, base=sds[2])
            return (_with_weights(a, kind, merged),)

    return _named(Slerp, "Slerp", kind)


def _moving_average_class(kind: str):
    low = kind.lower()

    class MovingAverage(_Node):
        DESCRIPTION = ("SMA (equal weights), EMA (each newer input weighs alpha) or WMA (weights, default N..1: the "
                       f"first input weighs most) of 2-8 {kind}s.")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"method": (["sma", "ema", "wma"],), f"{low}1": (kind,), f"{low}2": (kind,),
                                 "alpha": ("FLOAT", {"default": 0.5, "min": 0.001, "max": 1.0, "step": 0.01}),
                                 "weights": ("STRING", {"default": "", "multiline": False})},
                    "optional": optional_inputs(kind)}

        def run(self, method, alpha, weights, **kwargs):
            objs, _ = collect(kwargs, low)
            return _run(objs, kind, method, alpha=alpha, weights=parse_numbers(weights, "weights"))

    return _named(MovingAverage, "MovingAverage", kind)


class ManifoldMergeCheckpoints:
    """Streams 2-8 checkpoint files through merge_core (never all loaded) and returns MODEL, CLIP, VAE."""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        required, optional = checkpoint_inputs()
        return {"required": {**required, "method": (registry.method_names(),),
                             "weights": ("STRING", {"default": ""}),
                             "t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                             "alpha": ("FLOAT", {"default": 0.5, "min": 0.001, "max": 1.0, "step": 0.01}),
                             "multiplier": ("FLOAT", {"default": 0.5, "min": -2.0, "max": 2.0, "step": 0.01}),
                             "save_as": ("STRING", {"default": ""})},
                "optional": optional}

    @classmethod
    def IS_CHANGED(cls, **kw):
        import folder_paths
        stamps = []
        for key, name in sorted(kw.items()):
            if key.startswith("ckpt_") and name != NONE:
                path = folder_paths.get_full_path("checkpoints", name)
                stamps.append(os.path.getmtime(path) if path else 0)
        return f"{stamps}{sorted((k, v) for k, v in kw.items() if not k.startswith('ckpt_'))}"

    def run(self, method, weights, t, alpha, multiplier, save_as, **kw):
        import comfy.sd
        import folder_paths

        from ..merge_core.engine import merge
        from . import bridge
        paths = checkpoint_paths(kw)
        output = None
        if save_as.strip():  # beside the first input checkpoint
            output = os.path.join(os.path.dirname(paths[0]), plain_file_name(save_as, "save_as"))
        raw = {"weights": parse_numbers(weights, "weights"), "t": t, "alpha": alpha, "multiplier": multiplier}
        params = {p.name: raw[p.name] for p in registry.get(method).params if raw.get(p.name) is not None}
        result = merge(paths, method, output=output, params=params, device=bridge.torch_device(),
                       progress=bridge.progress_callback())
        if output is not None:
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
                output, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))
        else:
            model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
                result.state_dict, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return (model, clip, vae)


MERGE_NODES = {}
for _kind in ("MODEL", "CLIP"):
    for _factory in (_karcher_class, _slerp_class, _moving_average_class):
        _cls = _factory(_kind)
        MERGE_NODES[_cls.__name__] = _cls
MERGE_NODES["ManifoldMergeCheckpoints"] = ManifoldMergeCheckpoints

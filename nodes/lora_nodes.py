"""Hyper-merge, hyper LoRA loader and LoRA extraction nodes."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..merge_core.errors import MergeError
from .common import CATEGORY, checkpoint_inputs, checkpoint_paths, parse_numbers, plain_file_name, plain_name


def _loras_dir() -> str:
    import folder_paths
    return folder_paths.get_folder_paths("loras")[0]

def hyper_sets() -> dict[str, list[str]]:
    """Hyper sets in the loras folder: {NAME: [NAME_0-64.safetensors, ...] in index order}."""
    import folder_paths
    sets: dict[str, list[tuple[int, str]]] = {}
    for rel in folder_paths.get_filename_list("loras"):
        stem = rel.rsplit(".", 1)[0]
        head, _, tail = stem.rpartition("_")
        index, _, rank = tail.partition("-")
        if head and index.isdigit() and rank.isdigit():
            sets.setdefault(head, []).append((int(index), rel))
    return {name: [rel for _, rel in sorted(files)] for name, files in sets.items()}

class ManifoldMergeHyperMerge:
    """Checkpoints -> hyper checkpoint (into checkpoints) + LoRAs (into loras) + multipliers + report."""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("multipliers", "report")
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        required, optional = checkpoint_inputs()
        return {"required": {**required,
                             "ranks": ("STRING", {"default": "64,64,32,32"}),
                             "iterations": ("INT", {"default": 6, "min": 1, "max": 100}),
                             "name": ("STRING", {"default": "hyper"}),
                             "dtype": (["float16", "bfloat16", "float32"],)},
                "optional": optional}

    def run(self, ranks, iterations, name, dtype, **kw):
        from ..merge_core.hyper.pipeline import HyperConfig, format_report, run_hyper
        from . import bridge
        paths = checkpoint_paths(kw)
        rank_list = [int(r) for r in (parse_numbers(ranks, "ranks") or [])]
        ckpt_dir = os.path.dirname(paths[0])  # the hyper checkpoint goes beside the first input
        # run_hyper builds the whole set in a hidden temporary folder and places every file under the
        # no-replace rule (nothing that exists is overwritten; a set is whole or absent).
        result = run_hyper(HyperConfig(models=paths, name=plain_name(name, "name"), out_dir=ckpt_dir,
                                       lora_dir=_loras_dir(), ranks=rank_list, iterations=iterations,
                                       device=str(bridge.torch_device()), dtype=dtype, floor=False,
                                       progress=bridge.progress_callback()))
        multipliers = result.multipliers_path.read_text()
        return {"ui": {"text": [multipliers]}, "result": (multipliers, format_report(result.report))}

NO_SOURCE = "(none: use manual_strengths)"
SOURCE_SEP = " / "
_SET_MODELS: dict[tuple, list[str]] = {}


def set_models(files: list[str]) -> list[str]:
    """The source models of a hyper set, from its first LoRA's `manifold_hyper_lambdas` metadata (header only;
    cached by file and mtime). [] when it cannot be read."""
    import folder_paths
    path = folder_paths.get_full_path("loras", files[0]) if files else None
    if not path:
        return []
    try:
        key = (path, os.path.getmtime(path))
        if key not in _SET_MODELS:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            _SET_MODELS[key] = sorted(json.loads(meta.get("manifold_hyper_lambdas", "{}")))
        return _SET_MODELS[key]
    except Exception:  # noqa: BLE001 - unreadable or not a safetensors file: the set lists no models
        return []


def source_choices() -> list[str]:
    """The source_model drop-down: every known set's models as "SET / MODEL" (the front end narrows the list to
    the chosen set), after the "use manual_strengths" entry."""
    return [NO_SOURCE] + [f"{name}{SOURCE_SEP}{model}" for name, files in sorted(hyper_sets().items())
                          for model in set_models(files)]


def source_name(hyper_set: str, source_model: str) -> str:
    """The model name a source_model value stands for: "SET / MODEL" from the drop-down, or a bare name typed in
    a workflow saved before the drop-down existed ("" or the none entry: no source model)."""
    value = (source_model or "").strip()
    if value == NO_SOURCE:
        return ""
    head, sep, tail = value.partition(SOURCE_SEP)
    if sep:
        if head != hyper_set:
            raise MergeError(f"source_model {value!r} is a model of the hyper set {head!r}, but hyper_set is "
                             f"{hyper_set!r}: pick one of {hyper_set!r}'s models")
        return tail.strip()
    return value


class ManifoldMergeHyperLoraLoader:
    """Applies a hyper set's LoRAs at one source model's strengths (from the LoRA metadata) or manual ones."""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "hyper_set": (sorted(hyper_sets()) or ["(no hyper sets in loras)"],),
                             "source_model": (source_choices(), {
                                 "tooltip": "the model of the hyper set whose strengths are applied (read from the "
                                            "LoRAs' metadata); the none entry uses manual_strengths",
                                 "manifold": {"narrow_by": "hyper_set"}}),  # the front end lists the set's models
                             "manual_strengths": ("STRING", {"default": ""})}}

    @classmethod
    def VALIDATE_INPUTS(cls, source_model):
        # not checked against the drop-down: a workflow saved when this was a text field has a bare model name
        # (e.g. "model_b"); run() checks the name against the set's metadata and says which models it has.
        return isinstance(source_model, str) or "source_model: expected a model name"

    def run(self, model, clip, hyper_set, source_model, manual_strengths):
        import comfy.sd
        import comfy.utils
        import folder_paths
        files = hyper_sets().get(hyper_set)
        if not files:
            raise MergeError(f"no hyper set named {hyper_set!r} in the loras folder")
        lora_sds, metas = [], []
        for rel in files:
            sd, meta = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", rel), safe_load=True,
                                                   return_metadata=True)
            lora_sds.append(sd)
            metas.append(meta or {})
        strengths = parse_numbers(manual_strengths, "manual_strengths")
        if strengths is None:
            source_model = source_name(hyper_set, source_model)
            if not source_model.strip():
                raise MergeError("give source_model (a model of the hyper set) or manual_strengths")
            strengths = []
            for rel, meta in zip(files, metas):
                table = json.loads(meta.get("manifold_hyper_lambdas", "{}"))
                if source_model not in table:
                    raise MergeError(f"{rel}: no strength for {source_model!r}; models in this set: "
                                     f"{', '.join(sorted(table))}")
                strengths.append(float(table[source_model]))
        if len(strengths) != len(files):
            raise MergeError(f"{hyper_set} has {len(files)} LoRAs but {len(strengths)} strengths were given")
        for sd, s in zip(lora_sds, strengths):
            model, clip = comfy.sd.load_lora_for_models(model, clip, sd, s, s)
        return (model, clip)

class ManifoldMergeExtractLora:
    """MODEL (and CLIP) minus a base -> kohya LoRA in the loras folder (UNet and text encoders; the ComfyUI
    keys renamed to checkpoint keys by merge_core.naming, from the architecture data)."""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("summary",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "base_model": ("MODEL",),
                             "rank": ("INT", {"default": 64, "min": 1, "max": 1024}),
                             "conv_rank": ("INT", {"default": 0, "min": 0, "max": 1024}),
                             "filename": ("STRING", {"default": "extracted_lora"})},
                "optional": {"clip": ("CLIP",), "base_clip": ("CLIP",)}}

    def run(self, model, base_model, rank, conv_rank, filename, clip=None, base_clip=None):
        from ..merge_core.lora.extract import extract_lora
        from ..merge_core.naming import rename_state_dict
        from . import bridge
        out = Path(_loras_dir()) / plain_file_name(filename, "filename")

        def as_checkpoint(m, c):
            unet = bridge.effective_weights(m, "diffusion_model.")
            arch = self.architecture(unet)
            sd = rename_state_dict(unet, arch, "comfy_model", "checkpoint")
            if c is not None:
                sd.update(rename_state_dict(bridge.effective_weights(c.patcher, None, bridge.SKIP_CLIP_KEYS), arch,
                                            "comfy_clip", "checkpoint"))
            return sd

        info = extract_lora(as_checkpoint(base_model, base_clip), as_checkpoint(model, clip), out, rank,
                            conv_rank or None, device=str(bridge.torch_device()))
        text = (f"wrote {out.name}: {info['modules']} modules, relative error over them "
                f"{info['relative_error']:.4f}")
        return {"ui": {"text": [text]}, "result": (text,)}

    @staticmethod
    def architecture(unet) -> str:
        """The architecture of a ComfyUI MODEL's UNet/DiT weights ({"diffusion_model.X": tensor}), from the data."""
        from ..merge_core.arch import display_name
        from ..merge_core.blocks import SUPPORTED, architecture_for_keys
        found = architecture_for_keys({k: tuple(v.shape) for k, v in unet.items()})
        if found not in SUPPORTED:
            raise MergeError(f"Extract LoRA: cannot tell the model's architecture from its weights (supported: "
                             f"{', '.join(display_name(a) for a in SUPPORTED)})")
        return found


LORA_NODES = {"ManifoldMergeHyperMerge": ManifoldMergeHyperMerge,
              "ManifoldMergeHyperLoraLoader": ManifoldMergeHyperLoraLoader,
              "ManifoldMergeExtractLora": ManifoldMergeExtractLora}

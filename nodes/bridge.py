"""The only place that talks to ComfyUI's internals (imported lazily by the nodes).

Reads a MODEL/CLIP's effective weights (base weight + pending patches, e.g. from an upstream LoRA),
hands merged tensors back as patches on a clone, and connects merge_core's progress callback to
ComfyUI's progress bar and its Cancel button.
"""
from __future__ import annotations

import inspect

import torch

SKIP_CLIP_KEYS = (".position_ids", ".logit_scale")
# Weights a CLIP holds although the checkpoint has none: SD1/SD2's CLIP-L text_projection is created with
# torch.empty and never loaded (ComfyUI drops it when saving), so it may hold NaN. Merged only when finite.
MAYBE_UNLOADED_CLIP_KEYS = (".transformer.text_projection.weight",)


def _comfy():
    import comfy.lora
    import comfy.model_management
    import comfy.utils
    return comfy


def torch_device():
    return _comfy().model_management.get_torch_device()


def effective_weights(patcher, prefix: str | None = None, skip=()) -> dict[str, torch.Tensor]:
    """{key: weight with the patcher's pending patches applied} (no copy when there are none)."""
    comfy = _comfy()
    out = {}
    for key, entries in patcher.get_key_patches(prefix).items():
        if key.endswith(skip):
            continue
        weight = entries[0][0]
        if len(entries) > 1:
            weight = comfy.lora.calculate_weight(entries[1:], weight.to(torch.float32, copy=True), key)
        out[key] = weight
    return out


def clip_weights(clips) -> list[dict[str, torch.Tensor]]:
    """Effective weights of CLIPs for merging; an unloaded (non-finite) weight stays out, so the clone keeps
    the first input's own, as ComfyUI would."""
    sds = [effective_weights(c.patcher, None, SKIP_CLIP_KEYS) for c in clips]
    for key in {k for sd in sds for k in sd if k.endswith(MAYBE_UNLOADED_CLIP_KEYS)}:
        if any(key in sd and not bool(torch.isfinite(sd[key]).all()) for sd in sds):
            for sd in sds:
                sd.pop(key, None)
    return sds


def supports_set_patch() -> bool:
    try:
        return '"set"' in inspect.getsource(_comfy().lora.calculate_weight)
    except (OSError, TypeError):
        return False


def patched_clone(patcher, merged: dict[str, torch.Tensor]):
    """A clone of `patcher` whose weights are replaced by `merged` (inputs untouched)."""
    clone = patcher.clone()
    if supports_set_patch():
        clone.add_patches({k: ("set", (w,)) for k, w in merged.items()}, 1.0, 1.0)
    else:  # before ComfyUI 2024-11: weight * 0 + 1 * w
        clone.add_patches({k: (w,) for k, w in merged.items()}, 1.0, 0.0)
    return clone


def progress_callback():
    """merge_core progress -> ComfyUI progress bar; the queue's Cancel raises inside the merge."""
    comfy = _comfy()
    state = {}

    def update(done: int, total: int, key: str):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return update


def intermediate_device():
    return _comfy().model_management.intermediate_device()

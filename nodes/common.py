"""Node plumbing shared by every node: optional inputs, weights, and running merge_core."""
from __future__ import annotations

from ..merge_core.engine import merge
from ..merge_core.inputs import parse_numbers, plain_name  # noqa: F401  (parse_numbers: used by the nodes)

CATEGORY = "Manifold Merge"
MAX_INPUTS = 8


def optional_inputs(kind: str, first: int = 3, with_weight: bool = False) -> dict:
    opts = {}
    for i in range(first, MAX_INPUTS + 1):
        opts[f"{kind.lower()}{i}"] = (kind,)
        if with_weight:
            opts[f"weight{i}"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})
    return opts


def collect(kwargs: dict, kind: str, with_weight: bool = False):
    """(inputs, weights) from model1..model8 / weight1..weight8, skipping unconnected ones."""
    items, weights = [], []
    for i in range(1, MAX_INPUTS + 1):
        obj = kwargs.get(f"{kind}{i}")
        if obj is not None:
            items.append(obj)
            weights.append(float(kwargs.get(f"weight{i}", 1.0)))
    return items, (weights if with_weight else None)


NONE = "(none)"


def checkpoint_inputs() -> tuple[dict, dict]:
    """Required ckpt_1/ckpt_2 and optional ckpt_3..ckpt_8 pickers over the checkpoints folder."""
    import folder_paths
    files = folder_paths.get_filename_list("checkpoints")
    required = {"ckpt_1": (files,), "ckpt_2": (files,)}
    optional = {f"ckpt_{i}": ([NONE] + files,) for i in range(3, MAX_INPUTS + 1)}
    return required, optional


def checkpoint_paths(kwargs: dict) -> list[str]:
    """Full paths of the picked checkpoints, in input order, skipping the '(none)' ones."""
    import folder_paths
    names = [kwargs[f"ckpt_{i}"] for i in range(1, MAX_INPUTS + 1) if kwargs.get(f"ckpt_{i}") not in (None, NONE)]
    return [folder_paths.get_full_path_or_raise("checkpoints", n) for n in names]


def plain_file_name(value: str, what: str) -> str:
    """A .safetensors file name typed into a node; a path (or hidden name) is refused."""
    return plain_name(value, what) + ".safetensors"


def merge_state_dicts(state_dicts, method: str, names, **kw) -> dict:
    """Merge in float32 on the host's device; results come back in each key's original dtype."""
    from . import bridge
    result = merge(state_dicts, method, names=names, device=bridge.torch_device(), dtype="auto",
                   output_device=bridge.intermediate_device(), progress=bridge.progress_callback(), threads=1,
                   **kw)
    return result.state_dict

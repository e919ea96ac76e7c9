"""The usual "difference of two checkpoints -> LoRA" (truncated SVD per covered layer), with its error."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MergeError
from ..io.sources import open_model
from ..plan import FLOAT_DTYPE_NAMES, check_architectures
from ..threads import SMALL_UNIT, thread_policy
from ..hyper.decompose import module_seed, truncated_svd
from .format import balanced_factors, base_model_metadata, factors_to_lora_tensors, save_lora
from .keys import layer_deltas, lora_modules


@torch.no_grad()
def extract_lora(base, model, output, rank: int, conv_rank: int | None = None, device: str = "cpu",
                 dtype: str = "fp16", overwrite: bool = False, seed: int = 0, progress=None,
                 threads: int | None = None) -> dict:
    """3x3 convolutions are included only with `conv_rank` (as kohya does); 1x1 convs count as linear."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise MergeError("ranks must be positive integers")
    output = Path(output)
    if output.exists() and not overwrite:
        raise MergeError(f"{output}: already exists (use --overwrite to replace it)")
    dtype_name = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}.get(
        str(dtype).lower(), str(dtype).lower())
    if dtype_name not in ("fp16", "bf16", "fp32"):
        raise MergeError(f"unknown dtype {dtype!r} (float16, bfloat16 or float32)")
    out_dtype = FLOAT_DTYPE_NAMES[dtype_name]
    dev = torch.device(device)
    tensors, totals = {}, [0.0, 0.0]
    with open_model(base) as b, open_model(model) as m:
        arch, _ = check_architectures([b, m], force=False)
        modules = lora_modules(b.specs(), arch)
        largest = max((mod.out_features * mod.in_features for mod in modules), default=0)
        # layer after layer; small layers (a test model, SD's attention) run best on one intra-op thread
        with thread_policy(threads, dev, workers=1, small=largest < SMALL_UNIT):
            _extract(m, b, modules, rank, conv_rank, dev, out_dtype, seed, progress, tensors, totals)
    total_sq, error_sq = totals
    if not tensors:
        raise MergeError("the two models do not differ in any LoRA-covered layer")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            **base_model_metadata(arch),
            "manifold_extracted_from": f"{Path(str(model)).name} - {Path(str(base)).name}"}
    if conv_rank:
        meta.update({"ss_network_args": f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_rank}"}}'})
    save_lora(output, tensors, meta, overwrite=overwrite)
    return {"output": str(output), "modules": len(tensors) // 3,
            "relative_error": error_sq / total_sq if total_sq else 0.0}


def _extract(m, b, modules, rank, conv_rank, dev, out_dtype, seed, progress, tensors, totals) -> None:
    """Truncated SVD of every covered layer's difference into `tensors`; totals: [|delta|^2, |error|^2]."""
    for i, module in enumerate(modules):
        k3 = module.is_conv and module.shape[2] * module.shape[3] > 1
        r = conv_rank if k3 else rank
        if module.key not in m:
            raise MergeError(f"{m.name}: has no {module.key!r}")
        (delta,) = layer_deltas([m], b, module, dev)
        sq = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
        totals[0] += sq
        if r is None or sq == 0.0:
            totals[1] += sq
            continue
        r = min(r, *delta.shape)
        gen = torch.Generator().manual_seed(module_seed(seed, module.name))
        u, v = truncated_svd(delta, r, None, gen, power_iters=4)
        totals[1] += max(sq - float(torch.linalg.vector_norm(u, dtype=torch.float64) ** 2), 0.0)
        up, down = balanced_factors(u, v)
        tensors.update(factors_to_lora_tensors(module, up.cpu(), down.cpu(), out_dtype))
        if progress is not None:
            progress(i + 1, len(modules), module.name)

"""Fit the LoRA strengths of a model that was not in the hyper set (least squares, one streaming pass).

Streams everything one module at a time, the LoRA factors included (a Flux set at ranks 64 64 32 32
holds ~1.3 G factor values, 5 GB in float32, which are never all in memory)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MergeError
from ..io.sources import open_model
from ..lora.format import lora_factors, lora_module_names, strength_tag
from ..lora.keys import layer_deltas, lora_modules
from ..plan import check_architectures
from ..threads import SMALL_UNIT, map_ordered, thread_policy, workers_for
from . import decompose as D
from .pipeline import stem


def find_hyper_set(prefix) -> tuple[Path, list[Path]]:
    """DIR/NAME (or the hyper checkpoint's own path, DIR/NAME_hyper.safetensors) -> (DIR/NAME_hyper.safetensors,
    [DIR/NAME_0-64.safetensors, ...] in index order)."""
    prefix = Path(prefix)
    if prefix.name.endswith("_hyper.safetensors"):
        prefix = prefix.with_name(prefix.name[:-len("_hyper.safetensors")])
    hyper = prefix.parent / f"{prefix.name}_hyper.safetensors"
    if not hyper.is_file():
        raise MergeError(f"{hyper}: hyper checkpoint not found (give --hyper DIR/NAME)")
    loras = []
    for path in prefix.parent.glob(f"{prefix.name}_*-*.safetensors"):
        index = path.stem[len(prefix.name) + 1:].split("-")[0]
        if index.isdigit():
            loras.append((int(index), path))
    if not loras:
        raise MergeError(f"{prefix.parent}: no LoRA files named {prefix.name}_K-RANK.safetensors")
    return hyper, [p for _, p in sorted(loras)]


@torch.no_grad()
def project_model(prefix, model, device: str = "cpu", threads: int | None = None) -> dict:
    hyper_path, lora_paths = find_hyper_set(prefix)
    dev = torch.device(device)
    loras = []
    try:
        for path in lora_paths:
            loras.append(open_model(path))
        with open_model(hyper_path) as hyper, open_model(model) as src:
            arch, _ = check_architectures([hyper, src], force=False)
            total = _fit(hyper, src, loras, lora_modules(hyper.specs(), arch), lora_paths, hyper_path, dev,
                         threads)
    finally:
        for lora in loras:
            lora.close()
    lam = D.solve_lambdas(total.gram_dd, total.cross)                    # [K, 1]
    err = D.squared_error(total.gram_dd, total.cross, total.delta_sq, lam)
    names = [p.stem for p in lora_paths]
    lambdas = [float(x) for x in lam[:, 0]]
    return {"model": stem(model), "lambdas": lambdas,
            "relative_error": float(err[0] / total.delta_sq[0]) if float(total.delta_sq[0]) else 0.0,
            "tags": " ".join(strength_tag(n, x) for n, x in zip(names, lambdas))}


def _fit(hyper, src, loras, modules, lora_paths, hyper_path, dev, threads) -> D.LayerFit:
    names = [set(lora_module_names(lora)) for lora in loras]
    modules = [m for m in modules if all(m.name in n for n in names)]
    if not modules:
        raise MergeError(f"{lora_paths[0]}: its modules do not match {hyper_path}")
    k_count = len(loras)
    total = D.LayerFit(torch.zeros(k_count, k_count, dtype=torch.float64),
                       torch.zeros(1, k_count, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    for module in modules:
        if module.key not in src:
            raise MergeError(f"{src.name}: has no {module.key!r}")
    largest = max(m.out_features * m.in_features for m in modules)
    workers = workers_for(largest, threads, len(modules))
    small = largest < SMALL_UNIT

    def fit(module):
        (delta,) = layer_deltas([src], hyper, module, dev)
        factors = []
        for lora in loras:
            up, down, scale = lora_factors(lora, module.name)
            if up.shape[0] != module.out_features or down.shape[1] != module.in_features:
                raise MergeError(f"{lora.name}: {module.name} is {up.shape[0]}x{down.shape[1]}, "
                                 f"{hyper_path.name} has {module.out_features}x{module.in_features} there")
            factors.append(((up * scale).to(dev), down.T.to(dev)))   # D = up @ down * scale
        return D.layer_accumulators([delta], factors)

    # the policy is set once here (worker threads take torch's setting when they start); layers are
    # summed in order, so the result does not depend on the number of threads
    with thread_policy(threads, dev, workers=workers, small=small):
        for layer_fit in map_ordered(fit, modules, workers):
            total.gram_dd += layer_fit.gram_dd
            total.cross += layer_fit.cross
            total.delta_sq += layer_fit.delta_sq
    return total

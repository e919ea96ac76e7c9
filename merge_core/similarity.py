"""How far apart checkpoints are: pairwise cosine similarity of whole models.

SLERP and the Karcher mean only differ from a plain average when the models
point in different directions; this is the number that says how much. Streams
one key at a time (one Gram matrix per key, summed in float64), so memory is
N x the largest tensor, as in a merge.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import MergeCancelled, MergeError
from .io.sources import open_model
from .methods import gram_matrix

Progress = Callable[[int, int, str], "bool | None"]


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """cos[i, j] = G[i, j] / sqrt(G[i, i] G[j, j]); a zero model has cosine 0 with everything but itself."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    cos.fill_diagonal_(1.0)
    return cos.clamp(-1.0, 1.0)


def _block_namer(source):
    """key -> its block (the list-form block of the first model's architecture), or None where the
    architecture has no block map. Which blocks two models differ in is what a block-weight user needs."""
    from .arch import detect_architecture
    from .blocks import BlockSpecError, architecture
    try:
        arch = architecture(detect_architecture(source.specs()))
    except BlockSpecError:
        return None
    if hasattr(arch, "sized"):
        arch = arch.sized(source.keys())

    def block_of(key: str) -> str:
        return arch.block(key)
    block_of.order = list(arch.blocks)
    block_of.arch = arch.name
    return block_of


@torch.no_grad()
def pairwise_cosine(models: Sequence, names: Sequence[str] | None = None, base=None,
                    progress: Progress | None = None) -> dict:
    """Cosine similarity of every pair of models over the float keys they all share (same shape).

    With `base`, the cosines are of the task vectors (model - base), which is
    what SLERP/Karcher in base mode interpolate. Returns names, the matrix (as
    lists), the number of keys compared and the keys skipped, and the same matrix per
    block of the architecture (`blocks`: block name -> matrix, in the usual order).
    """
    if len(models) < 2:
        raise MergeError("pick at least two models to compare")
    sources = [open_model(m, names[i] if names else None) for i, m in enumerate(models)]
    base_source = open_model(base) if base is not None else None
    try:
        first = sources[0]
        keys, skipped = [], []
        for key, spec in first.specs().items():
            shared = all(key in s and s.spec(key).shape == spec.shape and s.spec(key).dtype.is_floating_point
                         for s in sources) and spec.dtype.is_floating_point
            if shared and base_source is not None:
                shared = key in base_source and base_source.spec(key).shape == spec.shape
            (keys if shared else skipped).append(key)
        if not keys:
            raise MergeError(f"{', '.join(s.name for s in sources)}: no floating-point tensors in common to compare")
        gram = torch.zeros(len(sources), len(sources), dtype=torch.float64)
        block_of = _block_namer(first)
        block_grams: dict[str, torch.Tensor] = {}
        for done, key in enumerate(keys, 1):
            tensors = [s.load(key) for s in sources]
            base_tensor = base_source.load(key) if base_source is not None else None
            key_gram = gram_matrix(tensors, base_tensor, compute_dtype=torch.float64)  # cosines near 1 need it
            gram += key_gram
            if block_of is not None:
                block = block_of(key)
                block_grams[block] = block_grams.get(block, 0) + key_gram
            for s in sources + ([base_source] if base_source is not None else []):
                s.release(key)
            if progress is not None and progress(done, len(keys), key) is False:
                raise MergeCancelled("comparison cancelled")
        blocks = {}
        if block_of is not None:
            order = {b: i for i, b in enumerate(block_of.order)}
            for block in sorted(block_grams, key=lambda b: order.get(b, len(order))):
                blocks[block] = cosine_from_gram(block_grams[block]).tolist()
        return {"names": [s.name for s in sources], "cosine": cosine_from_gram(gram).tolist(),
                "norms": gram.diagonal().clamp_min(0).sqrt().tolist(), "keys_compared": len(keys),
                "keys_skipped": skipped, "blocks": blocks,
                "architecture": block_of.arch if block_of is not None else None}
    finally:
        for s in sources + ([base_source] if base_source is not None else []):
            s.close()

"""A hyper set read back from its files, independently of merge_core's writer: the strengths from the
multipliers file and each LoRA module's weight delta by kohya's formula. The bench computes our errors
with it (the report's own figures are not taken on trust) and the tests check the written files with it."""
from __future__ import annotations

from pathlib import Path

import torch


def read_multipliers(path: Path) -> dict[str, list[float]]:
    """`name: <lora:A:0.8312> <lora:B:-0.1200>` lines -> {name: [0.8312, -0.12]}."""
    strengths = {}
    for line in Path(path).read_text().splitlines():
        name, tags = line.split(": ", 1)
        strengths[name] = [float(t.rsplit(":", 1)[1].rstrip(">")) for t in tags.split()]
    return strengths


def lora_delta(lora, module_name: str) -> torch.Tensor:
    """up @ down x alpha / rank of one module of an open LoRA file, float32, as [out, in_flat]."""
    down = lora.load(f"{module_name}.lora_down.weight").float()
    up = lora.load(f"{module_name}.lora_up.weight").float()
    alpha, rank = float(lora.load(f"{module_name}.alpha")), down.shape[0]
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * (alpha / rank)

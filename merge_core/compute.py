"""From a method name and its parameters to a per-key tensor function.

`MethodConfig.merge_tensors(tensors, base, out_dtype)` is what the engine calls
for every merged key; it only dispatches to the pure functions in `methods`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import methods

METHODS = ("karcher", "slerp", "sma", "ema", "wma", "weighted", "add-difference")
BASE_METHODS = ("karcher", "slerp")
PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class MethodConfig:
    name: str
    n_models: int
    weights: tuple[float, ...] | None = None
    t: float = 0.5
    alpha: float = 0.5
    multiplier: float = 0.5
    karcher_iter: int = 10
    karcher_tol: float = 1e-5
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        n = self.n_models
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r} (choose from {', '.join(METHODS)})")
        need = {"slerp": (2, 2), "weighted": (2, 2), "add-difference": (3, 3)}.get(self.name, (2, 100))
        if not need[0] <= n <= need[1]:
            count = str(need[0]) if need[0] == need[1] else f"{need[0]}-{need[1]}"
            raise ValueError(f"method {self.name} takes {count} models, got {n}")
        if self.weights is not None and self.name in ("karcher", "wma") and len(self.weights) != n:
            raise ValueError(f"{len(self.weights)} weights given for {n} models")
        if self.name == "karcher":
            methods.normalize_weights(self.weights or [1.0] * n)  # raises on a zero sum
            if self.karcher_iter < 0 or self.karcher_tol <= 0:
                raise ValueError("--karcher-iter must be >= 0 and --karcher-tol > 0")
        if self.name == "slerp" and not 0.0 <= self.t <= 1.0:
            raise ValueError(f"SLERP t must be in [0, 1], got {self.t}")
        if self.name == "ema":
            methods.ema_coefficients(n, self.alpha)  # raises on a bad alpha
        if self.name == "wma":
            methods.wma_coefficients(n, self.weights)

    def fixed_coefficients(self) -> list[float] | None:
        """Coefficients that do not depend on the data (None for karcher/slerp)."""
        n = self.n_models
        if self.name == "sma":
            return methods.sma_coefficients(n)
        if self.name == "ema":
            return methods.ema_coefficients(n, self.alpha)
        if self.name == "wma":
            return methods.wma_coefficients(n, self.weights)
        if self.name == "weighted":
            return [1.0 - self.multiplier, self.multiplier]
        if self.name == "add-difference":
            return [1.0, self.multiplier, -self.multiplier]
        return None

    def reported_weights(self) -> list[float] | None:
        if self.name == "karcher":
            return methods.normalize_weights(self.weights or [1.0] * self.n_models)
        return self.fixed_coefficients()

    def merge_tensors(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
                      out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        kw = dict(out_dtype=out_dtype, compute_dtype=self.compute_dtype, out=out)
        if self.name == "karcher":
            return methods.karcher_mean(tensors, self.weights, self.karcher_iter, self.karcher_tol, base=base, **kw)
        if self.name == "slerp":
            return methods.slerp(tensors[0], tensors[1], self.t, base=base, **kw)
        return methods.linear_combination(tensors, self.fixed_coefficients(), **kw)

    def recipe_params(self) -> dict:
        params: dict = {}
        if self.name == "karcher":
            params.update(weights=list(self.weights) if self.weights else None, karcher_iter=self.karcher_iter,
                          karcher_tol=self.karcher_tol)
        elif self.name == "slerp":
            params["t"] = self.t
        elif self.name == "ema":
            params["alpha"] = self.alpha
        elif self.name == "wma":
            params["weights"] = list(self.weights) if self.weights else [self.n_models - i for i in range(self.n_models)]
        elif self.name in ("weighted", "add-difference"):
            params["multiplier"] = self.multiplier
        params["precision"] = "fp64" if self.compute_dtype == torch.float64 else "fp32"
        return params

"""The decomposition itself, as small functions on tensors (no files here).

Model m, layer l:   W[m,l] ~ H[l] + sum_k lam[k,m] * D[k,l],   D[k,l] = U[k,l] @ V[k,l].T (rank r_k)

with one lam[k,m] per model and LoRA k shared by all layers (it is a LoRA strength).

1. Initialise lam from the principal components of the models around H: the
   M x M Gram matrix G[m,n] = sum_l <dW[m,l], dW[n,l]> (dW = W - H), its top K
   eigenvectors; the larger ranks go to the larger components.
2. Each round streams every layer once. Per layer, every D[k] is refitted in
   turn against what the other LoRAs leave (Gauss-Seidel): for fixed lam the
   best D[k] is the rank-r_k truncation of (sum_m lam[k,m] dW[m] - sum_{j!=k}
   c[k,j] D[j]) / c[k,k] with c = lam @ lam.T, found by a subspace iteration
   warm-started from the previous round's basis (seeded: the same inputs give
   the same files). The same pass accumulates A[j,k] = sum_l <D[j], D[k]>,
   b[m,k] = sum_l <dW[m], D[k]> and n[m] = sum_l |dW[m]|^2.
3. Then every model's K strengths are solved together by least squares
   (A lam[:,m] = b[m]); the loss n - 2 lam.b + lam.A.lam comes for free.
   Stop after `iterations` rounds or when the loss improves by less than `tol`.

The reference tool fitted one LoRA at a time (greedy deflation), started lam
at ones and normalised by layer means; see docs/hyper.md for the comparison.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

Tensor = torch.Tensor
OVERSAMPLE = 8


@dataclass
class LayerFit:
    """Per-layer accumulators of one round (all small)."""
    gram_dd: Tensor      # [K, K]  <D_j, D_k>
    cross: Tensor        # [M, K]  <dW_m, D_k>
    delta_sq: Tensor     # [M]     |dW_m|^2


@dataclass
class RoundResult:
    lam: Tensor                      # [K, M]
    loss: Tensor                     # [M] squared error per model over the covered layers
    delta_sq: Tensor                 # [M]
    per_layer: list[LayerFit] = field(default_factory=list)


def pca_lambdas(gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k eigenvectors of the M x M Gram matrix as initial strengths [k, M] (each row scaled to
    max |lam| = 1), and all eigenvalues in descending order.

    M models around their mean span at most M-1 directions. Asking for more LoRAs than that is still
    useful (a second LoRA on the same direction adds rank to it), so LoRAs beyond the available
    directions start on the largest directions again, in order."""
    values, vectors = torch.linalg.eigh(gram.double())
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    scale = float(values.clamp_min(0).max()) if values.numel() else 0.0
    directions = max(1, int((values > 1e-9 * max(scale, 1e-300)).sum()))
    lam = torch.stack([vectors[:, i % directions] for i in range(k)])
    lam = lam / lam.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    # a fixed sign per component (largest entry positive) keeps outputs reproducible
    sign = torch.sign(lam.gather(1, lam.abs().argmax(dim=1, keepdim=True)))
    return (lam * sign).float(), values.float()


def assign_ranks(ranks: Sequence[int]) -> list[int]:
    """Larger ranks to larger components: components are ordered by eigenvalue."""
    return sorted((int(r) for r in ranks), reverse=True)


def module_seed(seed: int, name: str) -> int:
    """A seed per LoRA module from its name, so results do not depend on key order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def _orthonormal(y: Tensor) -> Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def truncated_svd(target: Tensor, rank: int, start: Tensor | None, generator: torch.Generator,
                  power_iters: int) -> tuple[Tensor, Tensor]:
    """Rank-`rank` truncation of `target` as (u [out, r] = U*S, v [in, r] orthonormal).

    Subspace iteration from `start` (the previous basis, padded with seeded random columns)."""
    out_dim, in_dim = target.shape
    q = min(rank + OVERSAMPLE, out_dim, in_dim)
    extra = q - (0 if start is None else start.shape[1])
    basis = start if start is not None else target.new_zeros(in_dim, 0)
    if extra > 0:
        noise = torch.randn(in_dim, extra, generator=generator, dtype=target.dtype).to(target.device)
        basis = torch.cat([basis, noise], dim=1)
    basis = basis[:, :q]
    y = target @ basis
    for _ in range(power_iters):
        y = target @ (target.T @ _orthonormal(y))
    qy = _orthonormal(y)
    small = qy.T @ target                                   # [q, in]
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    r = min(rank, s.numel())
    return (qy @ ub[:, :r]) * s[:r], vh[:r].T.contiguous()


def fit_layer(deltas: Sequence[Tensor], lam: Tensor, ranks: Sequence[int],
              previous: list[tuple[Tensor, Tensor]] | None, generator: torch.Generator,
              power_iters: int) -> tuple[list[tuple[Tensor, Tensor]], LayerFit]:
    """One layer of one round: refit every D_k (Gauss-Seidel), return factors and accumulators.

    deltas: M tensors [out, in_flat] (float32 or float64), lam: [K, M]."""
    k_count = lam.shape[0]
    lam = lam.to(deltas[0].dtype).to(deltas[0].device)
    c = lam @ lam.T                                          # [K, K]
    factors: list[tuple[Tensor, Tensor]] = [f for f in previous] if previous else []
    for k in range(k_count):
        if c[k, k] <= 0:
            u = deltas[0].new_zeros(deltas[0].shape[0], ranks[k])
            v = deltas[0].new_zeros(deltas[0].shape[1], ranks[k])
        else:
            target = torch.zeros_like(deltas[0])
            for m, delta in enumerate(deltas):
                target.add_(delta, alpha=float(lam[k, m]))
            for j, (uj, vj) in enumerate(factors):  # round 1: only the LoRAs fitted so far
                if j != k:
                    target.addmm_(uj.to(target.dtype), vj.to(target.dtype).T, alpha=-float(c[k, j]))
            target /= c[k, k]
            start = factors[k][1].to(target.dtype) if previous is not None else None
            u, v = truncated_svd(target, ranks[k], start, generator, power_iters)
            del target
        if k < len(factors):
            factors[k] = (u, v)
        else:
            factors.append((u, v))
    return factors, layer_accumulators(deltas, factors)


def layer_accumulators(deltas: Sequence[Tensor], factors: Sequence[tuple[Tensor, Tensor]]) -> LayerFit:
    """<D_j, D_k>, <dW_m, D_k> and |dW_m|^2 for one layer, with all K LoRAs stacked into one
    [out, sum r] / [in, sum r] pair so the work is a few matrix products."""
    dtype = deltas[0].dtype
    u_all = torch.cat([u.to(dtype) for u, _ in factors], dim=1)
    v_all = torch.cat([v.to(dtype) for _, v in factors], dim=1)
    sizes = [v.shape[1] for _, v in factors]
    segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(u_all.device)
    onehot = torch.nn.functional.one_hot(segment, len(sizes)).to(dtype)          # [sum r, K]
    pair = (u_all.T @ u_all) * (v_all.T @ v_all)                                  # [sum r, sum r]
    gram_dd = onehot.T @ pair @ onehot                                            # [K, K]
    stacked = torch.stack(list(deltas))                                           # [M, out, in]
    projected = stacked @ v_all                                                   # [M, out, sum r]
    cross = (projected * u_all).sum(dim=1) @ onehot                               # [M, K]
    delta_sq = torch.linalg.vector_norm(stacked.reshape(len(deltas), -1), dim=1, dtype=torch.float64) ** 2
    return LayerFit(gram_dd.double().cpu(), cross.double().cpu(), delta_sq.cpu())


def solve_lambdas(gram_dd: Tensor, cross: Tensor) -> Tensor:
    """Least squares strengths of every model at once: A lam[:, m] = b[m]  ->  lam [K, M]."""
    a = gram_dd.double()
    ridge = 1e-12 * float(torch.diagonal(a).sum().clamp_min(1e-300))
    a = a + ridge * torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.solve(a, cross.double().T).float()


def squared_error(gram_dd: Tensor, cross: Tensor, delta_sq: Tensor, lam: Tensor) -> Tensor:
    """|dW_m - sum_k lam[k,m] D_k|^2 for every model, from the accumulators: [M]."""
    lam = lam.double()
    quadratic = torch.einsum("km,kj,jm->m", lam, gram_dd.double(), lam)
    return (delta_sq.double() - 2 * (cross.double() * lam.T).sum(dim=1) + quadratic).clamp_min(0)


def normalize_components(lam: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each LoRA's strengths to max |lam| = 1; returns (lam, scale to multiply its D by)."""
    scale = lam.abs().amax(dim=1).clamp_min(1e-30)
    return lam / scale[:, None], scale

"""The reference hyper-merge algorithm (tfernd/hyper-merge, as described in
shared/docs/reference-algorithms.md §3), re-implemented for comparison only.

Greedy: one LoRA at a time, each fitted by ALS with one global strength per
model, strengths started at ones, per-layer *mean* weighting in the strength
step, strengths divided by max|lam| on every round but the last, a 0.1%
relative-loss stop, torch.svd_lowrank(q=r, niter=2), and deflation of the
model differences after each LoRA. The differences are held in memory in
float16, as the reference held the models' LoRA layers in CPU RAM.
"""
from __future__ import annotations

import torch


def reference_hyper(deltas: list[list[torch.Tensor]], ranks, iterations: int = 6, seed: int = 0):
    """deltas[l][m]: [out, in_flat] float16 (W_m - H). Returns (lam [K, M], factors[l][k] = (u, v))."""
    torch.manual_seed(seed)
    m_count = len(deltas[0])
    lams, factors = [], [[] for _ in deltas]
    for rank in ranks:
        lam = torch.ones(m_count)
        prev_loss = 1e4
        layer_d = [None] * len(deltas)
        for it in range(iterations):
            # D-step: exact rank-r minimiser for fixed lam, per layer
            denom = float((lam ** 2).sum())
            for i, layer in enumerate(deltas):
                target = sum(float(lam[m]) * layer[m].float() for m in range(m_count)) / denom
                r = min(rank, *target.shape)
                u, s, v = torch.svd_lowrank(target, q=r, niter=2)
                layer_d[i] = (u * s, v)
            # lam-step with per-layer means
            num = torch.zeros(m_count)
            den = 0.0
            loss = 0.0
            for i, layer in enumerate(deltas):
                u, v = layer_d[i]
                d = u @ v.T
                numel = d.numel()
                den += float((d ** 2).sum()) / numel
                for m in range(m_count):
                    num[m] += float((d * layer[m].float()).sum()) / numel
            lam = num / den
            if it < iterations - 1:
                lam = lam / lam.abs().max()
            for i, layer in enumerate(deltas):
                u, v = layer_d[i]
                d = u @ v.T
                loss += sum(float(((layer[m].float() - lam[m] * d) ** 2).mean()) for m in range(m_count)) / m_count
            if abs(prev_loss - loss) / max(prev_loss, 1e-30) < 1e-3:
                break
            prev_loss = loss
        # deflation
        for i, layer in enumerate(deltas):
            u, v = layer_d[i]
            d = u @ v.T
            for m in range(m_count):
                layer[m] = (layer[m].float() - float(lam[m]) * d).half()
            factors[i].append(layer_d[i])
        lams.append(lam)
    return torch.stack(lams), factors

"""The decomposition itself, as small functions on tensors (no files here).

Model m, layer l:   W[m,l] ~ H[l] + sum_k lam[k,m] * D[k,l],   D[k,l] of rank r_k,

with one lam[k,m] per model and LoRA k shared by all layers (it is a LoRA strength).

1. Sketch (one streaming pass, `sketch_directions`): per layer, orthonormal bases
   Q [out, p] and P [in, p]: the unions of the dominant column and row spaces of
   the layer's principal direction matrices E_j = sum_m v_j[m] dW[m] (a randomized
   range finder on each, two power iterations, pipeline.SKETCH_POWER_ITERS; p = the
   sum of `direction_widths`; a side no wider than p is kept whole), the small
   cores C[m] = Q^T dW[m] P, |dW[m]|^2 and the M x M Gram
   matrix. Every D restricted to that subspace (D = Q X P^T) has
       |dW[m] - sum_k lam[k,m] D[k]|^2 = (|dW[m]|^2 - |C[m]|^2) + |C[m] - sum_k lam[k,m] X[k]|^2
   exactly, so all rounds run on the cores in memory, never on the files again.
2. Initialise lam from the principal components of the Gram matrix (top K
   eigenvectors; larger ranks to larger components).
3. Rounds on the cores (`fit_cores`, batched over layers of one shape): every
   X[k] is refitted in turn (Gauss-Seidel) as the rank-r_k truncation of
   (sum_m w[m] lam[k,m] C[m] - sum_{j!=k} c[k,j] X[j]) / c[k,k], c = lam diag(w) lam^T,
   the exact minimiser of sum_m w[m] |C[m] - sum_k lam[k,m] X[k]|^2 for fixed lam.
   Then every model's K strengths are solved by least squares (A lam[:,m] = b[m]);
   the error n - 2 lam.b + lam.A.lam comes from the accumulators.
4. Weights (no model pays for the others): w[m] = e[m]^(p-1) / n[m] with e[m]
   the relative error of model m in the previous round: iteratively reweighted
   least squares for min (1/M sum_m e[m]^p)^(1/p) (p = 1: mean relative error;
   p -> infinity: the worst model), damped, with no model allowed above its error at the start.
   Starts: principal components, greedy (`greedy_start`) and the reference tool's way (`greedy_start`
   with ones / per-layer means); the pipeline keeps the best result that leaves no model worse off than
   the reference way's. See docs/hyper.md.
5. Exact refinement (`refit_exact`, driven by pipeline._refine_exact): more streaming passes that refit
   every D_k on the full differences (the sketch's subspace is the rounds' limit on flat spectra).

The reference tool fitted one LoRA at a time (greedy deflation), started lam
at ones and normalised by layer means; see docs/hyper.md for the comparison.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..threads import map_ordered, workers_for

Tensor = torch.Tensor
OVERSAMPLE = 8


@dataclass
class LayerFit:
    """Per-layer accumulators of one round (all small)."""
    gram_dd: Tensor      # [K, K]  <D_j, D_k>
    cross: Tensor        # [M, K]  <dW_m, D_k>
    delta_sq: Tensor     # [M]     |dW_m|^2
    core_sq: Tensor | None = None   # [M] |C_m|^2 when the fit lives in a sketch (C_m = Q^T dW_m P)


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
                  power_iters: int, minus: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Rank-`rank` truncation of `target` - a Uc Vc^T (minus = (Uc, Vc), a low-rank correction applied in
    every product, never formed) as (u [out, r] = U*S, v [in, r] orthonormal).

    Subspace iteration from `start` (the previous basis, padded with seeded random columns)."""
    out_dim, in_dim = target.shape

    def mul(x: Tensor) -> Tensor:
        y = target @ x
        return y if minus is None else y.sub_(minus[0] @ (minus[1].T @ x))

    def rmul(y: Tensor) -> Tensor:
        x = target.T @ y
        return x if minus is None else x.sub_(minus[1] @ (minus[0].T @ y))

    q = min(rank + OVERSAMPLE, out_dim, in_dim)
    extra = q - (0 if start is None else start.shape[1])
    basis = start if start is not None else target.new_zeros(in_dim, 0)
    if extra > 0:
        noise = torch.randn(in_dim, extra, generator=generator, dtype=target.dtype).to(target.device)
        basis = torch.cat([basis, noise], dim=1)
    basis = basis[:, :q]
    y = mul(basis)
    for _ in range(power_iters):
        y = mul(rmul(_orthonormal(y)))
    qy = _orthonormal(y)
    small = rmul(qy).T                                      # [q, in] = qy^T target
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    r = min(rank, s.numel())
    return (qy @ ub[:, :r]) * s[:r], vh[:r].T.contiguous()


def refit_exact(deltas: Sequence[Tensor], lam: Tensor, weights: Tensor, factors: Sequence[tuple[Tensor, Tensor]],
                ranks: Sequence[int], generator: torch.Generator,
                power_iters: int = 1) -> tuple[list[tuple[Tensor, Tensor]], LayerFit]:
    """The exact refinement of one layer (docs/hyper.md, step 5): one Gauss-Seidel sweep on the full
    differences, every D_k refitted in turn as the rank-r_k truncation of

        (sum_m w[m] lam[k,m] dW[m] - sum_{j!=k} c[k,j] D[j]) / c[k,k],   c = lam diag(w) lam^T,

    the exact minimiser of sum_m w[m] |dW[m] - sum_k lam[k,m] D[k]|^2 for fixed lam (the rounds' D-step,
    without the sketch's subspace), by subspace iteration warm-started from the current factors' row
    space (`factors`: (U*S [out, r], V [in, r]) in full coordinates). The other LoRAs' term is applied as a
    low-rank correction inside the products (never a dense matrix). Returns the new factors and the
    accumulators on the full differences (core_sq None: the error is exact)."""
    dtype = deltas[0].dtype
    lam64 = lam.double()
    w = weights.double()
    c = (lam64 * w) @ lam64.T
    new = [(u.to(dtype), v.to(dtype)) for u, v in factors]
    for k in range(lam.shape[0]):
        if float(c[k, k]) <= 0:
            continue
        coef = (w * lam64[k] / c[k, k]).tolist()
        target = deltas[0] * coef[0]
        for m in range(1, len(deltas)):
            target.add_(deltas[m], alpha=coef[m])
        others = [j for j in range(lam.shape[0]) if j != k]
        minus = None
        if others:
            minus = (torch.cat([new[j][0] * float(c[k, j] / c[k, k]) for j in others], dim=1),
                     torch.cat([new[j][1] for j in others], dim=1))
        new[k] = truncated_svd(target, ranks[k], new[k][1], generator, power_iters, minus)
        del target
    return new, layer_accumulators(deltas, new)


def layer_accumulators(deltas: Sequence[Tensor], factors: Sequence[tuple[Tensor, Tensor]]) -> LayerFit:
    """<D_j, D_k>, <dW_m, D_k> and |dW_m|^2 for one layer. <D_j, D_k> from the factors (small products);
    <dW_m, D_k> from each D_k formed once (out x in x r_k) and M dot products, cheaper than projecting
    every model onto every LoRA (M x out x in x r_k)."""
    dtype = deltas[0].dtype
    u_all = torch.cat([u.to(dtype) for u, _ in factors], dim=1)
    v_all = torch.cat([v.to(dtype) for _, v in factors], dim=1)
    sizes = [v.shape[1] for _, v in factors]
    segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(u_all.device)
    onehot = torch.nn.functional.one_hot(segment, len(sizes)).to(dtype)          # [sum r, K]
    pair = (u_all.T @ u_all) * (v_all.T @ v_all)                                  # [sum r, sum r]
    gram_dd = onehot.T @ pair @ onehot                                            # [K, K]
    cross = torch.zeros(len(deltas), len(factors), dtype=torch.float64)
    for k, (u, v) in enumerate(factors):   # one D_k at a time (out x in each)
        cross[:, k] = inner_products(deltas, [u.to(dtype) @ v.to(dtype).T])[:, 0]
    delta_sq = torch.diagonal(gram_matrix(deltas)).clone()
    return LayerFit(gram_dd.double().cpu(), cross, delta_sq)


def solve_lambdas(gram_dd: Tensor, cross: Tensor) -> Tensor:
    """Least squares strengths of every model at once: A lam[:, m] = b[m]  ->  lam [K, M]."""
    a = gram_dd.double()
    ridge = 1e-12 * float(torch.diagonal(a).sum().clamp_min(1e-300))
    a = a + ridge * torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.solve(a, cross.double().T).float()


def squared_error(gram_dd: Tensor, cross: Tensor, delta_sq: Tensor, lam: Tensor,
                  core_sq: Tensor | None = None) -> Tensor:
    """|dW_m - sum_k lam[k,m] D_k|^2 for every model, from the accumulators: [M].

    With core_sq (the fit lives in a sketch): (|dW|^2 - |C|^2) + (|C|^2 - 2 lam.b + lam.A.lam), so the
    cancellation uses the cores' own energy (float32 bases are orthonormal only to ~1e-7)."""
    lam = lam.double()
    quadratic = torch.einsum("km,kj,jm->m", lam, gram_dd.double(), lam)
    inner = delta_sq.double() if core_sq is None else core_sq.double()
    err = (inner - 2 * (cross.double() * lam.T).sum(dim=1) + quadratic).clamp_min(0)
    if core_sq is not None:
        err = err + (delta_sq.double() - core_sq.double()).clamp_min(0)
    return err


def fit_error(fit: LayerFit, lam: Tensor) -> Tensor:
    return squared_error(fit.gram_dd, fit.cross, fit.delta_sq, lam, fit.core_sq)


def normalize_components(lam: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each LoRA's strengths to max |lam| = 1; returns (lam, scale to multiply its D by)."""
    scale = lam.abs().amax(dim=1).clamp_min(1e-30)
    return lam / scale[:, None], scale


# --- sketch + cores -----------------------------------------------------------------------------

@dataclass
class LayerSketch:
    q: Tensor | None          # [out, a] orthonormal column basis, None = identity (a = out)
    p: Tensor | None          # [in, b] orthonormal row basis, None = identity (b = in)
    cores: Tensor             # [M, a, b]  Q^T dW_m P
    delta_sq: Tensor          # [M] float64 |dW_m|^2
    gram: Tensor              # [M, M] float64 <dW_m, dW_n>


def _range(parts: Sequence[Tensor], width: int, generator: torch.Generator, power_iters: int,
           apply, apply_t) -> Tensor:
    """Orthonormal basis of the dominant range of sum_m apply(part_m) apply(part_m)^T: randomized
    range finder with `power_iters` power iterations. apply(m, x) = A_m x, apply_t(m, y) = A_m^T y."""
    y = None
    for m, part in enumerate(parts):
        omega = torch.randn(part, width, generator=generator, dtype=torch.float32)
        term = apply(m, omega)
        y = term if y is None else y.add_(term)
    for _ in range(power_iters):
        basis = _orthonormal(y)
        y = None
        for m in range(len(parts)):
            term = apply(m, apply_t(m, basis))
            y = term if y is None else y.add_(term)
    return _orthonormal(y)


def sketch_layer(deltas: Sequence[Tensor], width: int, generator: torch.Generator,
                 power_iters: int = 2) -> LayerSketch:
    """Bases of the dominant column/row spaces of all differences of one layer and their cores.

    deltas: M tensors [out, in] float32. A side no wider than `width` is kept whole (exact)."""
    gram = gram_matrix(deltas)
    delta_sq = torch.diagonal(gram).clone()
    stacked = torch.stack(list(deltas))                                     # [M, out, in]
    m_count, out_dim, in_dim = stacked.shape
    device = stacked.device
    q = p = None
    if out_dim > width:
        q = _range([in_dim] * m_count, width, generator, power_iters,
                   lambda m, x: stacked[m] @ x.to(device), lambda m, y: stacked[m].T @ y)
        left = torch.matmul(q.T, stacked)                                   # [M, width, in]
    else:
        left = stacked
    if in_dim > width:
        rows = left.shape[1]
        p = _range([rows] * m_count, width, generator, power_iters,
                   lambda m, x: left[m].T @ x.to(device), lambda m, y: left[m] @ y)
        cores = left @ p                                                    # [M, a, width]
    else:
        cores = left
    return LayerSketch(q, p, cores.contiguous(), delta_sq, gram)


def direction_widths(ranks: Sequence[int], directions: int) -> list[int]:
    """Sketch columns per principal direction of a layer's differences (`sketch_directions`): the ranks
    of the LoRAs that start on it (LoRA k on direction k mod `directions`, as `pca_lambdas` starts them)
    plus half of that (at least 2 x OVERSAMPLE); a direction no LoRA starts on gets OVERSAMPLE columns
    (the rounds may still move strengths toward it)."""
    assigned = [0] * max(1, directions)
    for k, r in enumerate(ranks):
        assigned[k % len(assigned)] += int(r)
    return [r + max(2 * OVERSAMPLE, r // 2) if r else OVERSAMPLE for r in assigned]


def sketch_directions(deltas: Sequence[Tensor], ranks: Sequence[int], generator: torch.Generator,
                      power_iters: int = 2) -> LayerSketch:
    """Bases of one layer from its principal directions, and the cores (docs/hyper.md, step 1).

    The layer's M differences give an M x M Gram matrix; its eigenvectors v_j (at most M - 1 directions:
    the differences from the average sum to zero) give the direction matrices E_j = sum_m v_j[m] dW_m. A
    randomized range finder on each E_j alone (`direction_widths` columns, `power_iters` power iterations)
    gives its dominant column and row spaces; Q and P are the orthonormalised unions (width p = the sum).
    Every product is with one [out, in] matrix, not with all M, so the sketch costs about
    (2 + 2 power_iters) x out x in x p, where sketching the M differences together costs M times that per
    product; and each LoRA's starting direction gets its own columns, however small its share of the
    energy. A side no wider than p is kept whole (exact)."""
    m_count = len(deltas)
    out_dim, in_dim = deltas[0].shape
    device, dtype = deltas[0].device, deltas[0].dtype
    gram = gram_matrix(deltas)
    delta_sq = torch.diagonal(gram).clone()
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    top = float(values.clamp_min(0).max()) if values.numel() else 0.0
    directions = max(1, min(m_count - 1, int((values > 1e-9 * max(top, 1e-300)).sum())))
    widths = direction_widths(ranks, directions)
    width = sum(widths)
    q = p = None
    if out_dim > width or in_dim > width:
        cols, rows = [], []
        for j, w in enumerate(widths):
            w = min(w, out_dim, in_dim)
            coef = vectors[:, j].tolist()
            e = deltas[0] * coef[0]                                         # [out, in]
            for m in range(1, m_count):
                e.add_(deltas[m], alpha=coef[m])
            omega = torch.randn(in_dim, w, generator=generator, dtype=torch.float32).to(device, dtype)
            y = e @ omega
            for _ in range(power_iters):
                y = e @ (e.T @ _orthonormal(y))
            qj = _orthonormal(y)
            cols.append(qj)
            rows.append(_orthonormal(e.T @ qj))
            del e
        if out_dim > width:
            q = _orthonormal(torch.cat(cols, dim=1))
        if in_dim > width:
            p = _orthonormal(torch.cat(rows, dim=1))

    def core(delta):  # Q^T dW P, the cheaper order first
        if q is not None and p is not None and out_dim < in_dim:
            return q.T @ (delta @ p)
        left = delta if q is None else q.T @ delta
        return left if p is None else left @ p

    cores = torch.stack([core(d) for d in deltas])                          # [M, a, b]
    return LayerSketch(q, p, cores.contiguous(), delta_sq, gram.cpu())


GRAM_CHUNK = 1 << 16   # elements per block in inner_products (float32 sums within a block: ~1e-6)


def inner_products(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """<x_i, y_j> [len(xs), len(ys)] in float64, read once in blocks of GRAM_CHUNK elements (one small
    matrix product each, summed in float64), without stacked copies of the tensors. One float32 product
    or dot over a whole layer (tens of millions of terms) comes out low by up to 1e-3 relative, enough to
    move a reported error of 0.017 to 0.014."""
    fx = [x.reshape(-1) for x in xs]
    fy = fx if ys is xs else [y.reshape(-1) for y in ys]
    total = torch.zeros(len(fx), len(fy), dtype=torch.float64)
    for lo in range(0, fx[0].numel(), GRAM_CHUNK):
        bx = torch.stack([f[lo:lo + GRAM_CHUNK] for f in fx])
        by = bx if fy is fx else torch.stack([f[lo:lo + GRAM_CHUNK] for f in fy])
        total += (bx @ by.T).double().cpu()
    return total


def gram_matrix(deltas: Sequence[Tensor]) -> Tensor:
    """<dW_m, dW_n> of one layer's differences [M, M] (float64), `inner_products` of them with themselves."""
    return inner_products(deltas, deltas)


@dataclass
class CoreGroup:
    """Layers whose cores have one shape and whose LoRAs have the same ranks, batched."""
    index: list[int]          # layer indices
    cores: Tensor             # [B, M, a, b]
    ranks: list[int]          # per LoRA
    core_sq: Tensor           # [B, M] float64 |C_m|^2
    factors: list[tuple[Tensor, Tensor]] | None = None   # per LoRA: (U*S [B, a, r], V [B, b, r])


def _batched_truncation(target: Tensor, rank: int, start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rank-`rank` truncation of every matrix of a batch [B, a, b] as (U*S [B, a, r], V [B, b, r]).

    Small matrices: a full SVD. Larger ones (min(a, b) > 2 (rank + OVERSAMPLE)): subspace iteration on
    rank + OVERSAMPLE columns, warm-started from `start` (the previous round's V) with one power
    iteration, or from seeded noise with two: 2.7x faster than the full SVD on 288 x 288 cores (ranks 64),
    1.8 % above the optimal truncation error cold, 0.3 % after one warm round, 0.1 % after two."""
    batch, a, b = target.shape
    q = rank + OVERSAMPLE
    if min(a, b) <= 2 * q:
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        r = min(rank, s.shape[-1])
        return u[..., :r] * s[..., None, :r], vh[..., :r, :].transpose(-1, -2)
    generator = torch.Generator().manual_seed(batch * 1_000_003 + a * 1009 + b * 17 + rank)
    noise = torch.randn(batch, b, q - (0 if start is None else start.shape[-1]), generator=generator,
                        dtype=target.dtype).to(target.device)
    basis = noise if start is None else torch.cat([start.to(target.dtype), noise], dim=-1)
    y = target @ basis                                                      # [B, a, q]
    for _ in range(1 if start is not None else 2):
        y = target @ (target.transpose(-1, -2) @ torch.linalg.qr(y).Q)
    qy = torch.linalg.qr(y).Q
    small = qy.transpose(-1, -2) @ target                                   # [B, q, b]
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (qy @ ub[..., :rank]) * s[..., None, :rank], vh[..., :rank, :].transpose(-1, -2)


CORE_CHUNK = 32   # layers per batch in fit_cores: the D-step is per layer, so memory is bounded by a chunk


def fit_cores(group: CoreGroup, lam: Tensor, weights: Tensor, workers: int = 1) -> tuple[Tensor, Tensor]:
    """One Gauss-Seidel sweep over the LoRAs of a group of layers; returns the accumulators
    <X_j, X_k> [B, K, K] and <C_m, X_k> [B, M, K] (float64) of the new factors.

    lam [K, M], weights [M] (the D-step minimises sum_m weights[m] |C_m - sum_k lam[k,m] X_k|^2). Layers
    are independent for fixed lam, so the group is swept CORE_CHUNK layers at a time: the dense products
    and the float64 accumulators exist for one chunk only (for 350 SD1.5 cores of 288 x 288 in one batch
    they were 2.4 GB per call); the chunks run on `workers` threads (the caller sets torch's threads)."""
    device = group.cores.device
    lam = lam.to(device=device, dtype=torch.float64)
    w = weights.to(device=device, dtype=torch.float64)
    c = (lam * w) @ lam.T                                                   # [K, K]
    batch = group.cores.shape[0]

    def chunk(lo):
        hi = min(batch, lo + CORE_CHUNK)
        previous = None if group.factors is None else [(u[lo:hi], v[lo:hi]) for u, v in group.factors]
        return _sweep(group.cores[lo:hi], previous, group.ranks, lam, w, c)

    chunks = range(0, batch, CORE_CHUNK)
    workers = workers_for(CORE_CHUNK * group.cores[0].numel(), workers, len(chunks))  # 1 for small cores
    parts, grams, crosses = [], [], []
    for factors, gram_dd, cross in map_ordered(chunk, chunks, workers):
        parts.append(factors)
        grams.append(gram_dd)
        crosses.append(cross)
    group.factors = [(torch.cat([f[k][0] for f in parts]), torch.cat([f[k][1] for f in parts]))
                     for k in range(lam.shape[0])]
    return torch.cat(grams), torch.cat(crosses)


def _sweep(cores: Tensor, previous, ranks, lam: Tensor, w: Tensor, c: Tensor):
    """fit_cores on one chunk of layers: (factors, <X_j, X_k> [B, K, K], <C_m, X_k> [B, M, K])."""
    batch, m_count, a, b = cores.shape
    dtype = cores.dtype
    k_count = lam.shape[0]
    dense: list[Tensor | None] = [None] * k_count
    if previous is not None:
        dense = [u @ v.transpose(-1, -2) for u, v in previous]
    new = []
    for k in range(k_count):
        if float(c[k, k]) <= 0:
            u = cores.new_zeros(batch, a, ranks[k])
            v = cores.new_zeros(batch, b, ranks[k])
        else:
            coef = (w * lam[k] / c[k, k]).to(dtype)                         # [M]
            target = torch.einsum("m,bmij->bij", coef, cores)
            for j in range(k_count):
                if j != k and dense[j] is not None:
                    target.sub_(dense[j], alpha=float(c[k, j] / c[k, k]))
            start = None if previous is None else previous[k][1]
            u, v = _batched_truncation(target, ranks[k], start)
            del target
        new.append((u, v))
        dense[k] = u @ v.transpose(-1, -2)
    return (new, *_accumulate(cores, dense))


def _accumulate(cores: Tensor, dense: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """<X_j, X_k> [B, K, K] and <C_m, X_k> [B, M, K] of one chunk, in float64: the error
    n - 2 lam.b + lam.A.lam cancels, and near-exact fits need it."""
    batch, m_count, a, b = cores.shape
    stack = torch.stack(list(dense), dim=1).reshape(batch, len(dense), a * b).double()   # [B, K, ab]
    gram_dd = stack @ stack.transpose(1, 2)
    cross = cores.reshape(batch, m_count, a * b).double() @ stack.transpose(1, 2)
    return gram_dd.cpu(), cross.cpu()


def greedy_start(groups: Sequence[CoreGroup], k_count: int, rounds: int = 10,
                 layer_weights: Sequence[Tensor] | None = None, ones: bool = False, workers: int = 1) -> Tensor:
    """A start for the joint rounds: LoRA after LoRA on what the previous ones leave (deflation), each
    with its strengths started at the top principal component of that residual and `rounds` alternating
    steps. Sets every group's factors; returns lam [K, M].

    The reference tool's variant: `ones` (strengths start at 1), `layer_weights` (per group [B]: the
    lambda step weights each layer by 1/numel, its per-layer means) and a 0.1 % relative stop."""
    residual = [g.cores.clone() for g in groups]
    m_count = groups[0].cores.shape[1]
    lams, factors = [], [[] for _ in groups]
    for k in range(k_count):
        if ones:
            lam = torch.ones(1, m_count)
        else:
            gram = sum((r.flatten(2).double().transpose(0, 1).flatten(1) @ r.flatten(2).double()
                        .transpose(0, 1).flatten(1).T).cpu() for r in residual)
            lam, _ = pca_lambdas(gram, 1)
        subs = [CoreGroup(g.index, r, [g.ranks[k]], g.core_sq) for g, r in zip(groups, residual)]
        weights = torch.ones(m_count)
        previous = None
        for _ in range(rounds):
            dd = torch.zeros(1, 1, dtype=torch.float64)
            cross = torch.zeros(m_count, 1, dtype=torch.float64)
            for gi, sub in enumerate(subs):
                a, b = fit_cores(sub, lam, weights, workers)
                if layer_weights is not None:
                    a = a * layer_weights[gi][:, None, None]
                    b = b * layer_weights[gi][:, None, None]
                dd += a.sum(dim=0)
                cross += b.sum(dim=0)
            lam = solve_lambdas(dd, cross)
            if layer_weights is not None:   # the reference's stop: 0.1 % relative change (of the captured part)
                captured = float((cross.double() * lam.double().T).sum())
                if previous is not None and abs(previous - captured) < 1e-3 * max(abs(previous), 1e-30):
                    break
                previous = captured
        lam, scale = normalize_components(lam)
        for gi, (sub, r) in enumerate(zip(subs, residual)):
            u, v = sub.factors[0]
            u = u * float(scale[0])
            factors[gi].append((u, v))
            dense = u @ v.transpose(-1, -2)
            for m in range(m_count):  # in place, model by model (no [B, M, a, b] temporary)
                r[:, m].sub_(dense, alpha=float(lam[0, m]))
            del dense
        lams.append(lam[0])
    for g, f in zip(groups, factors):
        g.factors = f
    return torch.stack(lams)


def group_cores(cores: Sequence[Tensor], ranks_per_layer: Sequence[Sequence[int]]) -> list[CoreGroup]:
    """Batch the layers by core shape and ranks (in order of first appearance)."""
    keyed: dict[tuple, list[int]] = {}
    for i, (core, ranks) in enumerate(zip(cores, ranks_per_layer)):
        keyed.setdefault((tuple(core.shape), tuple(ranks)), []).append(i)
    groups = []
    for (_, ranks), index in keyed.items():
        stacked = torch.stack([cores[i] for i in index])
        core_sq = torch.linalg.vector_norm(stacked.flatten(2), dim=2, dtype=torch.float64) ** 2
        groups.append(CoreGroup(index, stacked, list(ranks), core_sq.cpu()))
    return groups


def irls_weights(rel_error: Tensor, delta_sq: Tensor, power: float) -> Tensor:
    """D-step weights for min (mean_m e_m^power)^(1/power), e_m = err_m / n_m: w_m = e_m^(power-1) / n_m
    (scaled to mean 1 / n). power = 1: every model's relative error counts the same."""
    e = rel_error.double()
    if float(e.max()) < 1e-4:   # every model is (almost) exact: nobody pays for the others
        e = torch.ones_like(e)
    e = e.clamp_min(float(e.max()) * 0.1)   # weights differ at most 10^(power-1) times
    w = e ** (power - 1) / delta_sq.double().clamp_min(1e-300)
    return w / w.mean()


def component_spectra(cores: Sequence[Tensor], gram: Tensor) -> tuple[Tensor, Tensor]:
    """Squared singular values of every principal component's matrix per layer, summed over layers:
    E[k, l] = sum_m v[k, m] C[m, l] (v: the Gram matrix's eigenvectors, unit length), returns
    (energy [K', R] with energy[k, i] = sum_l sigma_i(E[k, l])^2, eigenvalues [K'])."""
    values, vectors = torch.linalg.eigh(gram.double())
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    scale = float(values.clamp_min(0).max()) if values.numel() else 0.0
    keep = int((values > 1e-9 * max(scale, 1e-300)).sum())
    width = max(min(c.shape[1], c.shape[2]) for c in cores)
    energy = torch.zeros(max(keep, 1), width, dtype=torch.float64)
    v = vectors[:, :keep].T.float()                                          # [K', M]
    for core in cores:
        mats = torch.einsum("km,mij->kij", v.to(core.dtype), core)
        s2 = torch.linalg.svdvals(mats).double() ** 2                        # [K', min(a, b)]
        energy[:keep, :s2.shape[1]] += s2.cpu()
    return energy[:keep] if keep else energy[:0], values[:keep].float()


def allocate_ranks(energy: Tensor, total: float, cost_per_rank: float, budget: float | None = None,
                   target: float | None = None, step: int = 4, max_total: int | None = None,
                   per_lora: float = 0.0) -> tuple[list[int], float]:
    """Ranks per principal component, greedily by energy gained per byte (in steps of `step`), until the
    bytes reach `budget` or the estimated relative error (1 - captured / total) reaches `target`.
    Components that get no rank are dropped; each LoRA kept costs `per_lora` bytes besides its ranks (the
    file's header). Returns (ranks, estimated relative error)."""
    k_count, width = energy.shape
    cum = torch.cat([torch.zeros(k_count, 1, dtype=torch.float64), energy.cumsum(dim=1)], dim=1)
    ranks = [0] * k_count
    captured = 0.0
    limit = max_total if max_total is not None else k_count * width

    def error() -> float:
        return max(0.0, 1.0 - captured / total) if total > 0 else 0.0

    while True:
        if target is not None and error() <= target:
            break
        best, gain = None, 0.0
        for k in range(k_count):
            r = min(ranks[k] + step, width)
            if r == ranks[k] or sum(ranks) - ranks[k] + r > limit:
                continue
            files = sum(1 for j in range(k_count) if ranks[j] > 0 or j == k)
            if budget is not None and (sum(ranks) - ranks[k] + r) * cost_per_rank + files * per_lora > budget:
                continue
            g = float(cum[k, r] - cum[k, ranks[k]]) / (r - ranks[k])
            if g > gain:
                best, gain = k, g
        if best is None or gain <= 0:
            break
        r = min(ranks[best] + step, width)
        captured += float(cum[best, r] - cum[best, ranks[best]])
        ranks[best] = r
    return sorted((r for r in ranks if r > 0), reverse=True), error()

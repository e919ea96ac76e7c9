"""Merge methods as small pure functions on tensors.

Every method here is "a few numbers from the inputs' Gram matrix, then one
weighted sum of the inputs":

* SMA / EMA / WMA / weighted sum / add difference: fixed coefficients.
* SLERP of two whole tensors: coefficients from their angle.
* Karcher mean: the weighted Riemannian mean of the unit directions
  u_i = x_i/||x_i|| lies in span(u_1..u_N), so the whole fixed-point iteration
  runs on N coefficients using only the N x N Gram matrix <u_i, u_j>; the
  result is one weighted sum. Cost: one Gram pass + one linear pass, instead of
  `max_iter` passes over the data (see `karcher_mean_direct` for the loop it
  replaces, kept for tests).
* With a base (task-vector mode) the same runs on d_i = x_i - base and the
  base is added back: base + sum c_i d_i = sum c_i x_i + (1 - sum c_i) base.

Math runs in float32 (or float64) whatever the storage dtype; both passes work
on cache-sized chunks, so no full float32 copy of any input is ever made.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Tensor = torch.Tensor

CPU_CHUNK = 1 << 18   # elements per chunk on CPU: fits in L2/L3 (fastest in bench), keeps temporaries small
GPU_CHUNK = 1 << 26

DEFAULT_DOT_THRESHOLD = 0.9995  # SLERP falls back to lerp above this |cos| (the reference gist rule)
DEFAULT_NORM_EPS = 1e-10


def _chunk_size(tensor: Tensor) -> int:
    return CPU_CHUNK if tensor.device.type == "cpu" else GPU_CHUNK


def _flat(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def _as_math(chunk: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """fp16/bf16 chunks promote inside torch's arithmetic; fp8 does not promote, so it is upcast here."""
    return chunk.to(compute_dtype) if chunk.dtype in FP8_DTYPES else chunk


# ---------------------------------------------------------------- coefficients

def normalize_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not math.isfinite(total) or abs(total) < 1e-12:
        raise ValueError(f"weights {list(weights)} sum to {total}; they must sum to a non-zero number")
    return [float(w) / total for w in weights]


def sma_coefficients(n: int) -> list[float]:
    """Simple moving average: every model weighs 1/n."""
    return [1.0 / n] * n


def ema_coefficients(n: int, alpha: float) -> list[float]:
    """E_1 = M_1, E_k = alpha*M_k + (1-alpha)*E_{k-1}: the last model weighs alpha."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in (0, 1], got {alpha}")
    coeffs = [(1.0 - alpha) ** (n - 1)]
    coeffs += [alpha * (1.0 - alpha) ** (n - k) for k in range(2, n + 1)]
    return coeffs


def wma_coefficients(n: int, weights: Sequence[float] | None = None) -> list[float]:
    """Weighted moving average; default weights n, n-1, ..., 1 (the first model weighs most)."""
    if weights is None:
        weights = [float(n - i) for i in range(n)]
    if len(weights) != n:
        raise ValueError(f"WMA needs {n} weights (one per model), got {len(weights)}")
    if any(w < 0 for w in weights):
        raise ValueError(f"WMA weights must be >= 0, got {list(weights)}")
    return normalize_weights(weights)


# ---------------------------------------------------------------- passes over data

def gram_matrix(tensors: Sequence[Tensor], base: Tensor | None = None,
                compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """G[i, j] = <x_i - base, x_j - base> over the whole flattened tensors, as float64.

    Each chunk is converted once into one reused (rows, chunk) buffer (the base into a row of its own,
    subtracted in place: no allocation per chunk), multiplied in `compute_dtype` (one small BLAS call)
    and accumulated in float64. An input that *is* the base (the geometric median centres on its first
    model) has a zero row and column, so it is left out of the pass.
    """
    n = len(tensors)
    flats = [_flat(t) for t in tensors]
    flat_base = _flat(base) if base is not None else None
    rows = [i for i, t in enumerate(tensors) if base is None or t is not base]
    numel = flats[0].numel()
    device = flats[0].device
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    if not rows:
        return gram.cpu()
    step = min(_chunk_size(flats[0]), max(numel, 1))
    buffer = torch.empty(len(rows) + (flat_base is not None), step, dtype=compute_dtype, device=device)
    acc = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=device)
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        block = buffer[:len(rows), :stop - start]
        for row, i in zip(block, rows):
            row.copy_(flats[i][start:stop])
        if flat_base is not None:
            base_row = buffer[len(rows), :stop - start]
            base_row.copy_(flat_base[start:stop])
            block -= base_row
        acc += torch.mm(block, block.T).to(torch.float64)
    index = torch.tensor(rows, device=device)
    gram[index.unsqueeze(1), index.unsqueeze(0)] = acc
    return gram.cpu()


def saturation_limit(dtype: torch.dtype) -> float | None:
    """The largest finite value of an fp8 dtype (casting beyond it gives NaN/Inf); None for other dtypes."""
    return float(torch.finfo(dtype).max) if dtype in FP8_DTYPES else None


def saturate_(chunk: Tensor, limit: float | None) -> int:
    """Clamp a chunk (in the math dtype) to an fp8 output's range in place; returns how many values were
    beyond it (0 and untouched when `limit` is None)."""
    if limit is None:
        return 0
    beyond = int((chunk.abs() > limit).sum())
    chunk.clamp_(-limit, limit)
    return beyond


def cast_saturating(tensor: Tensor, dtype: torch.dtype, saturated: list | None = None) -> Tensor:
    """`tensor.to(dtype)`, except that values beyond an fp8 dtype's range are clamped to it (and counted)."""
    limit = saturation_limit(dtype)
    if limit is None or tensor.dtype == dtype:
        return tensor.to(dtype)
    wide = tensor.to(torch.float32)
    if saturated is not None:
        saturated.append(int((wide.abs() > limit).sum()))
    return wide.clamp_(-limit, limit).to(dtype)


def linear_combination(tensors: Sequence[Tensor], coeffs: Sequence[float],
                       out_dtype: torch.dtype | None = None,
                       compute_dtype: torch.dtype = torch.float32, out: Tensor | None = None,
                       saturated: list | None = None) -> Tensor:
    """sum_i coeffs[i] * tensors[i], computed in `compute_dtype`, returned in `out_dtype`.

    Works chunk by chunk (one reused accumulator) straight into the output
    tensor (`out` if given, e.g. a view of the output file), so the only
    full-size allocation is the output itself. For an fp8 output, values beyond
    its range are clamped to it (never turned into NaN/Inf) and their count is
    appended to `saturated`.
    """
    if len(tensors) != len(coeffs):
        raise ValueError(f"{len(tensors)} tensors but {len(coeffs)} coefficients")
    first = tensors[0]
    if out is None:
        out = torch.empty(first.shape, dtype=out_dtype or compute_dtype, device=first.device)
    flat_out = _flat(out)
    flats = [_flat(t) for t in tensors]
    numel = flat_out.numel()
    step = min(_chunk_size(first), max(numel, 1))
    accumulator = torch.empty(step, dtype=compute_dtype, device=first.device)
    limit = saturation_limit(flat_out.dtype)
    clamped = 0
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        acc = accumulator[:stop - start]
        acc.copy_(flats[0][start:stop])
        acc *= float(coeffs[0])
        for flat, coeff in zip(flats[1:], coeffs[1:]):
            acc.add_(_as_math(flat[start:stop], compute_dtype), alpha=float(coeff))
        clamped += saturate_(acc, limit)
        flat_out[start:stop] = acc
    if saturated is not None and clamped:
        saturated.append(clamped)
    return out


def weighted_sum(a: Tensor, b: Tensor, m: float, **kw) -> Tensor:
    """A1111's weighted sum: A*(1-M) + B*M."""
    return linear_combination([a, b], [1.0 - m, m], **kw)


def add_difference(a: Tensor, b: Tensor, c: Tensor, m: float, **kw) -> Tensor:
    """A1111's add difference: A + M*(B - C)."""
    return linear_combination([a, b, c], [1.0, m, -m], **kw)


TRAIN_DIFFERENCE_GAIN = 1.8  # supermerger's constant: the scale equals 1/2 where B sits halfway between A and C


def train_difference(a: Tensor, b: Tensor, c: Tensor, m: float, out_dtype: torch.dtype | None = None,
                     compute_dtype: torch.dtype = torch.float32, out: Tensor | None = None,
                     saturated: list | None = None) -> Tensor:
    """supermerger's "train difference": A + M * 1.8 * |B - A| / (|B - A| + |B - C|) * (B - C), element-wise
    (0 where B = A = C). B - C is applied where B moved away from A, scaled down where A already has it.

    Chunk by chunk in `compute_dtype` with reused buffers, straight into `out`; an fp8 output is
    saturated like linear_combination's."""
    if out is None:
        out = torch.empty(a.shape, dtype=out_dtype or compute_dtype, device=a.device)
    flat_out, fa, fb, fc = _flat(out), _flat(a), _flat(b), _flat(c)
    numel = flat_out.numel()
    step = min(_chunk_size(a), max(numel, 1))
    work = torch.empty(4, step, dtype=compute_dtype, device=a.device)
    zero = torch.zeros((), dtype=compute_dtype, device=a.device)
    limit = saturation_limit(flat_out.dtype)
    clamped = 0
    gain = TRAIN_DIFFERENCE_GAIN * float(m)
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        acc, diff, near, total = (row[:stop - start] for row in work)
        acc.copy_(fa[start:stop])
        diff.copy_(fb[start:stop])
        torch.sub(diff, acc, out=near)          # B - A
        near.abs_()
        diff.sub_(_as_math(fc[start:stop], compute_dtype))  # B - C
        torch.abs(diff, out=total)
        total.add_(near)                        # |B - A| + |B - C| (no allocation per chunk)
        torch.div(near, total, out=near)
        torch.where(total > 0, near, zero, out=near)
        acc.addcmul_(near, diff, value=gain)
        clamped += saturate_(acc, limit)
        flat_out[start:stop] = acc
    if saturated is not None and clamped:
        saturated.append(clamped)
    return out


# ---------------------------------------------------------------- SLERP

def slerp_coefficients(gram: Tensor, t: float, dot_threshold: float = DEFAULT_DOT_THRESHOLD,
                       eps: float = DEFAULT_NORM_EPS) -> tuple[float, float]:
    """Coefficients (c0, c1) with slerp(v0, v1, t) = c0*v0 + c1*v1 on the unnormalised tensors."""
    n0, n1 = math.sqrt(max(float(gram[0, 0]), 0.0)), math.sqrt(max(float(gram[1, 1]), 0.0))
    if n0 <= eps or n1 <= eps:
        return 1.0 - t, t
    dot = float(gram[0, 1]) / (n0 * n1)
    if abs(dot) > dot_threshold:
        return 1.0 - t, t  # (anti)parallel: the sin formula is ill-conditioned, lerp is exact enough
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def with_base(coeffs: Sequence[float]) -> list[float]:
    """Coefficients over [x_1..x_N, base] for base + sum c_i (x_i - base)."""
    return list(coeffs) + [1.0 - float(sum(coeffs))]


def slerp(v0: Tensor, v1: Tensor, t: float, base: Tensor | None = None,
          dot_threshold: float = DEFAULT_DOT_THRESHOLD, eps: float = DEFAULT_NORM_EPS,
          out_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32,
          out: Tensor | None = None, saturated: list | None = None) -> Tensor:
    """Whole-tensor spherical interpolation; t = 0 gives v0. With `base`, of v_i - base, plus base."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"SLERP t must be in [0, 1], got {t}")
    gram = gram_matrix([v0, v1], base, compute_dtype)
    coeffs = list(slerp_coefficients(gram, t, dot_threshold, eps))
    tensors = [v0, v1]
    if base is not None:
        tensors, coeffs = tensors + [base], with_base(coeffs)
    return linear_combination(tensors, coeffs, out_dtype, compute_dtype, out, saturated)


# ---------------------------------------------------------------- Karcher mean

def karcher_coefficients(gram: Tensor, weights: Sequence[float], max_iter: int = 10,
                         tol: float = 1e-5) -> tuple[list[float], int]:
    """Weighted Karcher mean of whole-tensor points, in coefficient space.

    Returns (c, iterations) with mean = sum_i c_i x_i. Follows the reference
    algorithm step by step (valid set, start, log map, exp map, magnitude),
    with every inner product read off the Gram matrix.
    """
    g = gram.to(torch.float64)
    n = g.shape[0]
    alpha = torch.tensor(normalize_weights(weights), dtype=torch.float64)
    norms = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
    valid = norms > tol
    if not bool(valid.any()):
        return [0.0] * n, 0
    safe = torch.where(valid, norms, torch.ones_like(norms))
    unit_gram = g / safe[:, None] / safe[None, :]  # <u_i, u_j>
    unit_gram = unit_gram * valid[:, None] * valid[None, :]
    beta = torch.where(valid, alpha, torch.zeros_like(alpha))
    beta = beta / beta.sum()

    def norm_of(c: Tensor) -> float:
        return math.sqrt(max(float(c @ unit_gram @ c), 0.0))

    c = beta.clone()  # u = sum beta_i u_i (coefficients on the unit vectors)
    start_norm = norm_of(c)
    if start_norm < tol:
        c = torch.zeros(n, dtype=torch.float64)
        c[int(torch.nonzero(valid)[0])] = 1.0
    else:
        c = c / start_norm
    iterations = 0
    for _ in range(max_iter):
        cos = torch.clamp(unit_gram @ c, -1.0, 1.0)  # <u, u_i>
        theta = torch.arccos(cos)
        moving = valid & (theta >= tol)
        scale = torch.where(moving, theta / torch.sin(torch.where(moving, theta, torch.ones_like(theta))),
                            torch.zeros_like(theta))
        w = beta * scale
        tangent = w - float(w @ cos) * c  # T = sum w_i (u_i - cos_i u)
        t_norm = norm_of(tangent)
        if t_norm < tol:
            break
        c = math.cos(t_norm) * c + (math.sin(t_norm) / t_norm) * tangent
        c = c / norm_of(c)
        iterations += 1
    magnitude = float((alpha * torch.where(valid, norms, torch.zeros_like(norms))).sum())
    coeffs = torch.where(valid, magnitude * c / safe, torch.zeros_like(c))
    return [float(x) for x in coeffs], iterations


def karcher_mean(tensors: Sequence[Tensor], weights: Sequence[float] | None = None, max_iter: int = 10,
                 tol: float = 1e-5, base: Tensor | None = None, out_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype = torch.float32, out: Tensor | None = None,
                 saturated: list | None = None) -> Tensor:
    """Weighted Karcher (Frechet) mean of whole tensors: direction on the sphere, weighted mean norm."""
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    gram = gram_matrix(tensors, base, compute_dtype)
    coeffs, _ = karcher_coefficients(gram, weights, max_iter, tol)
    tensors = list(tensors)
    if base is not None:
        tensors, coeffs = tensors + [base], with_base(coeffs)
    return linear_combination(tensors, coeffs, out_dtype, compute_dtype, out, saturated)


def karcher_mean_direct(tensors: Sequence[Tensor], weights: Sequence[float] | None = None,
                        max_iter: int = 10, tol: float = 1e-5,
                        compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """The iteration written out on full tensors (one pass per step); the reference for tests."""
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    alpha = normalize_weights(weights)
    xs = [_flat(t).to(compute_dtype) for t in tensors]
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    valid = [i for i, nrm in enumerate(norms) if nrm > tol]
    if not valid:
        return torch.zeros(tensors[0].shape, dtype=compute_dtype)
    units = {i: xs[i] / norms[i] for i in valid}
    total = sum(alpha[i] for i in valid)
    beta = {i: alpha[i] / total for i in valid}
    u = sum(beta[i] * units[i] for i in valid)
    u_norm = float(torch.linalg.vector_norm(u))
    u = units[valid[0]].clone() if u_norm < tol else u / u_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for i in valid:
            cos = max(-1.0, min(1.0, float(torch.dot(u, units[i]))))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += beta[i] * (theta / math.sin(theta)) * (units[i] - cos * u)
        t_norm = float(torch.linalg.vector_norm(tangent))
        if t_norm < tol:
            break
        u = math.cos(t_norm) * u + math.sin(t_norm) * tangent / t_norm
        u = u / torch.linalg.vector_norm(u)
    magnitude = sum(alpha[i] * norms[i] for i in valid)
    return (magnitude * u).reshape(tensors[0].shape)

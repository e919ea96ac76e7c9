"""Task-vector methods that are not one weighted sum (TIES, DARE, DARE-TIES), and two robust means that
still are (model stock, geometric median), as pure tensor functions.

Model stock and the geometric median keep the Karcher recipe: a few numbers from the N x N Gram matrix
(one chunked pass), then one weighted sum (one more pass). Their iterations run on N coefficients.

TIES / DARE / DARE-TIES are element-wise and run chunk by chunk (`methods.CPU_CHUNK` elements of every
input at a time). TIES' trim needs, per model, the k-th smallest |x_i - base| of the whole tensor; it is
found without any full-size copy (`kth_smallest_magnitudes`): a strided sample brackets the threshold,
one chunked pass counts the elements below the bracket and gathers those inside it (about 1% of the
tensor), and `kthvalue` on that small set gives the exact value. Peak memory per key: the inputs (zero-copy
views of the files), the output, and O(N x chunk) temporaries, plus the bracket set; the worst case (the
bracket misses, e.g. for heavily tied values) gathers at most one float copy of one model's magnitudes at a
time, so a key never needs more than (inputs + 2) x its size.

DARE's random masks are a pure function of (seed, key, model index, element index): every block of
`RNG_BLOCK` elements draws from its own torch.Generator seeded from a hash of (seed, key, model, block), on
the CPU. The result does not depend on thread count, task order, chunk size or device.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

from .methods import (CPU_CHUNK, GPU_CHUNK, _as_math, _flat, gram_matrix, linear_combination, saturate_,
                      saturation_limit)

Tensor = torch.Tensor

RNG_BLOCK = 1 << 18          # elements per random block (fixed: the masks must not depend on chunking)
SAMPLE = 1 << 16             # elements sampled to bracket a magnitude threshold
SMALL = 1 << 20              # tensors up to this size take kthvalue on a full float copy directly


# ---------------------------------------------------------------- model stock (Jang et al. 2024)

def model_stock_t(gram: Tensor, cos_eps: float = 1e-6) -> float:
    """t = N cos / (1 + (N - 1) cos), cos = the mean over pairs i < j of cos(d_i, d_j), from the Gram matrix
    of the task vectors d_i. A pair's norm product is clamped at `cos_eps` (as mergekit / sd-mecha). On the
    pole cos = -1/(N-1) the formula has no value and t = 0 (the base) is returned."""
    g = gram.to(torch.float64)
    n = g.shape[0]
    norms = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
    cosines = [float(g[i, j]) / max(float(norms[i] * norms[j]), cos_eps)
               for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    denominator = 1.0 + (n - 1) * cos
    if abs(denominator) < 1e-12:
        return 0.0
    return n * cos / denominator


def model_stock_coefficients(gram: Tensor, cos_eps: float = 1e-6) -> list[float]:
    """Coefficients c on the task vectors: base + sum c_i d_i = t * mean(x_i) + (1 - t) * base."""
    n = gram.shape[0]
    t = model_stock_t(gram, cos_eps)
    return [t / n] * n


def model_stock_direct(tensors: Sequence[Tensor], base: Tensor, cos_eps: float = 1e-6,
                       compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Model stock written out on full tensors (the reference for tests)."""
    deltas = [_flat(t).to(compute_dtype) - _flat(base).to(compute_dtype) for t in tensors]
    n = len(deltas)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = max(float(torch.linalg.vector_norm(deltas[i]) * torch.linalg.vector_norm(deltas[j])), cos_eps)
            cosines.append(float(torch.dot(deltas[i], deltas[j])) / denom)
    cos = sum(cosines) / len(cosines)
    t = 0.0 if abs(1 + (n - 1) * cos) < 1e-12 else n * cos / (1 + (n - 1) * cos)
    mean = sum(_flat(x).to(compute_dtype) for x in tensors) / n
    return (t * mean + (1 - t) * _flat(base).to(compute_dtype)).reshape(base.shape)


# ---------------------------------------------------------------- geometric median (Weiszfeld)

def geometric_median_coefficients(gram: Tensor, weights: Sequence[float] | None = None, max_iter: int = 100,
                                  eps: float = 1e-6, ftol: float = 1e-20) -> tuple[list[float], int]:
    """Weiszfeld's iteration for argmin_m sum_i w_i ||x_i - m|| in coefficient space.

    `gram` is the Gram matrix of x_i - r for any fixed reference r (the median is translation-equivariant;
    the engine takes r = the first model, which keeps the inner products small). Every iterate is a
    weighted average m = sum c_i x_i (sum c = 1), and ||x_i - m||^2 = G_ii - 2 (G c)_i + c'Gc. Start:
    the weighted average; step: c <- (w_i / max(||x_i - m||, eps)) normalised; stop when the objective
    mean_i w_i ||x_i - m|| changes by at most ftol x itself. Returns (c, iterations)."""
    g = gram.to(torch.float64).cpu().numpy()  # N x N: numpy, as small-array arithmetic is 10x cheaper there
    n = g.shape[0]
    w = np.ones(n) if weights is None else np.asarray([float(x) for x in weights], dtype=np.float64)
    diag = np.diagonal(g).copy()

    def distances(c):
        gc = g @ c
        return np.sqrt(np.maximum(diag - 2 * gc + c @ gc, 0.0))

    c = w / w.sum()
    dist = distances(c)  # computed once per iterate: the objective's distances are the next step's
    objective = float((dist * w).mean())
    iterations = 0
    for _ in range(max(0, max_iter)):
        previous = objective
        new = w / np.maximum(dist, eps)
        c = new / new.sum()
        iterations += 1
        dist = distances(c)
        objective = float((dist * w).mean())
        if abs(previous - objective) <= ftol * objective:
            break
    return [float(x) for x in c], iterations


def geometric_median(tensors: Sequence[Tensor], weights: Sequence[float] | None = None, max_iter: int = 100,
                     eps: float = 1e-6, out_dtype: torch.dtype | None = None,
                     compute_dtype: torch.dtype = torch.float32, out: Tensor | None = None,
                     saturated: list | None = None) -> Tensor:
    """Weighted geometric median of whole tensors: one Gram pass (centred on the first tensor), Weiszfeld
    on N coefficients, one weighted sum."""
    gram = gram_matrix(tensors, tensors[0], compute_dtype)
    coeffs, _ = geometric_median_coefficients(gram, weights, max_iter, eps)
    return linear_combination(list(tensors), coeffs, out_dtype, compute_dtype, out, saturated)


def geometric_median_direct(tensors: Sequence[Tensor], weights: Sequence[float] | None = None,
                            max_iter: int = 100, eps: float = 1e-6, ftol: float = 1e-20,
                            compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Weiszfeld written out on full tensors (the reference for tests)."""
    xs = [_flat(t).to(compute_dtype) for t in tensors]
    w = [1.0] * len(xs) if weights is None else [float(x) for x in weights]

    def average(ws):
        return sum(wi * x for wi, x in zip(ws, xs)) / sum(ws)

    def objective(m):
        return sum(wi * float(torch.linalg.vector_norm(x - m)) for wi, x in zip(w, xs)) / len(xs)

    median = average(w)
    value = objective(median)
    for _ in range(max(0, max_iter)):
        previous = value
        new = [wi / max(float(torch.linalg.vector_norm(x - median)), eps) for wi, x in zip(w, xs)]
        median = average(new)
        value = objective(median)
        if abs(previous - value) <= ftol * value:
            break
    return median.reshape(tensors[0].shape)


# ---------------------------------------------------------------- exact k-th smallest magnitude, streamed

def trim_rank(numel: int, density: float) -> int:
    """TIES keeps |d| >= the k-th smallest |d| (1-based), k = max(int((1 - density) * numel), 1): the top
    `density` fraction by magnitude, ties at the threshold kept (sd-mecha's `filter_top_k` rule)."""
    return max(int((1 - density) * numel), 1)


def _chunk(tensor: Tensor) -> int:
    return CPU_CHUNK if tensor.device.type == "cpu" else GPU_CHUNK


def _deltas_into(block: Tensor, flats: Sequence[Tensor], flat_base: Tensor | None, start: int, stop: int,
                 compute_dtype: torch.dtype, base_row: Tensor | None = None) -> Tensor:
    """block[i] = x_i[start:stop] - base[start:stop] in compute_dtype (block: a view of a reused buffer; the
    base chunk goes through `base_row` when given, so nothing is allocated per chunk)."""
    for row, flat in zip(block, flats):
        row.copy_(flat[start:stop])
    if flat_base is not None:
        if base_row is not None:
            base_row = base_row[:stop - start]
            base_row.copy_(flat_base[start:stop])
            block -= base_row
        else:
            block -= _as_math(flat_base[start:stop], compute_dtype)
    return block


def _magnitudes(flat: Tensor, flat_base: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
    d = flat.to(compute_dtype)
    if flat_base is not None:
        d = d - _as_math(flat_base, compute_dtype)
    return d.abs_()


def kth_smallest_magnitudes(tensors: Sequence[Tensor], base: Tensor | None, ks: Sequence[int],
                            compute_dtype: torch.dtype = torch.float32) -> list[float]:
    """For each i, the exact ks[i]-th smallest (1-based) of |x_i - base| over the whole tensor.

    Small tensors: kthvalue of one float copy. Larger ones: a strided sample of SAMPLE elements gives a
    bracket [lo, hi] around the target rank (+-5 standard deviations of the sample quantile); one chunked
    pass counts |d| < lo and gathers lo <= |d| <= hi; the answer is kthvalue of the gathered set. A bracket
    that misses is widened to the whole side it missed and the pass repeated for that model (exact either
    way; the widened pass gathers at most one float copy of that model's magnitudes)."""
    flats = [_flat(t) for t in tensors]
    flat_base = _flat(base) if base is not None else None
    numel = flats[0].numel()
    n = len(flats)
    if numel == 0:
        return [0.0] * n
    if numel <= SMALL:
        return [float(_magnitudes(f, flat_base, compute_dtype).kthvalue(k).values) for f, k in zip(flats, ks)]
    stride = max(1, numel // SAMPLE)
    brackets = []
    for f, k in zip(flats, ks):
        sample = _magnitudes(f[::stride], flat_base[::stride] if flat_base is not None else None, compute_dtype)
        s = sample.numel()
        q = k / numel
        margin = 5.0 * math.sqrt(max(q * (1 - q), 1.0 / s) / s) + 2.0 / s
        lo_i, hi_i = int(math.floor((q - margin) * s)), int(math.ceil((q + margin) * s))
        lo = float(sample.kthvalue(lo_i + 1).values) if lo_i >= 0 else -math.inf
        hi = float(sample.kthvalue(hi_i + 1).values) if hi_i < s else math.inf
        brackets.append((lo, hi))
    results: list[float | None] = [None] * n
    found = _bracket_pass(flats, flat_base, list(ks), brackets, compute_dtype)
    for i, (value, side) in enumerate(found):
        results[i] = value
        # A missed bracket (rare: a sample unlike the tensor): that side widened to everything, one model at a
        # time (so at most one model's float copy is gathered), then, if still missed (NaN), both sides.
        for _ in range(2):
            if results[i] is not None:
                break
            lo, hi = brackets[i]
            brackets[i] = (-math.inf, lo) if side < 0 else (hi, math.inf)
            if side == 0 or brackets[i][0] == brackets[i][1]:
                brackets[i] = (-math.inf, math.inf)
            ((results[i], side),) = _bracket_pass([flats[i]], flat_base, [ks[i]], [brackets[i]], compute_dtype)
    # NaN in an input can leave the rank unreachable: keep nothing there (the output check names the file)
    return [math.inf if r is None else r for r in results]


def _bracket_pass(flats, flat_base, ks, brackets, compute_dtype):
    """One chunked pass: per model, #(|d| < lo) and the values lo <= |d| <= hi. Returns, per model,
    (the k-th value, 0) when it lies in the bracket, else (None, -1 / +1: below / above it)."""
    n = len(flats)
    numel = flats[0].numel()
    device = flats[0].device
    step = min(_chunk(flats[0]), numel)
    buffer = torch.empty(n, step, dtype=compute_dtype, device=device)
    below_buf = torch.empty(n, step, dtype=compute_dtype, device=device)
    ge_buf = torch.empty(n, step, dtype=torch.bool, device=device)
    le_buf = torch.empty(n, step, dtype=torch.bool, device=device)
    lo = torch.tensor([b[0] for b in brackets], dtype=compute_dtype, device=device)[:, None]
    hi = torch.tensor([b[1] for b in brackets], dtype=compute_dtype, device=device)[:, None]
    below_counts = torch.zeros(n, dtype=torch.float64, device=device)
    base_row = torch.empty(step, dtype=compute_dtype, device=device) if flat_base is not None else None
    # The gathered values go into one growing buffer per model and the per-chunk temporaries are reused:
    # allocating per chunk fragments the heap, and the allocator then keeps ~100 MB per worker thread.
    store = [torch.empty(max(4096, numel // 32), dtype=compute_dtype, device=device) for _ in range(n)]
    filled = [0] * n
    index = torch.empty(0, dtype=torch.int64, device=device)
    picked = torch.empty(0, dtype=compute_dtype, device=device)
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        length = stop - start
        block = _deltas_into(buffer[:, :length], flats, flat_base, start, stop, compute_dtype, base_row).abs_()
        # count |d| < lo as a float sum of clamp(sign(lo - |d|), 0): several times cheaper than a bool count
        below = torch.sub(lo, block, out=below_buf[:, :length]).sign_().clamp_(min=0.0)
        below_counts += below.sum(1, dtype=torch.float64)
        ge = torch.ge(block, lo, out=ge_buf[:, :length])
        ge.logical_and_(torch.le(block, hi, out=le_buf[:, :length]))
        for i in range(n):  # nonzero + index_select: faster than masked_select
            torch.nonzero(ge[i], out=index.resize_(0))  # resize_(0) keeps the storage for reuse
            torch.index_select(block[i], 0, index.view(-1), out=picked.resize_(0))
            m = picked.numel()
            if filled[i] + m > store[i].numel():
                grown = torch.empty(max(2 * store[i].numel(), filled[i] + m), dtype=compute_dtype, device=device)
                grown[:filled[i]] = store[i][:filled[i]]
                store[i] = grown
            store[i][filled[i]:filled[i] + m] = picked
            filled[i] += m
    out = []
    for i in range(n):
        k = ks[i]
        below = int(below_counts[i])
        values = store[i][:filled[i]]
        if k <= below:
            out.append((None, -1))
        elif k <= below + values.numel():
            out.append((float(values.kthvalue(k - below).values), 0))
        else:
            out.append((None, 1))
    return out


def trim_thresholds(tensors: Sequence[Tensor], base: Tensor | None, density: float,
                    compute_dtype: torch.dtype = torch.float32) -> list[float]:
    k = trim_rank(tensors[0].numel(), density)
    return kth_smallest_magnitudes(tensors, base, [k] * len(tensors), compute_dtype)


# ---------------------------------------------------------------- DARE masks

def block_seed(seed: int, key: str, model: int, block: int) -> int:
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}\x00{model}\x00{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_keep_mask(seed: int, key: str, model: int, start: int, stop: int, density: float) -> Tensor:
    """Keep-mask (bool) of elements start..stop of model `model`'s task vector for `key`: element e is kept
    iff u < density, u = the (e mod RNG_BLOCK)-th draw of torch.rand from a CPU generator seeded with
    block_seed(seed, key, model, e // RNG_BLOCK)."""
    uniform = torch.empty(stop - start, dtype=torch.float32)
    generator = torch.Generator()
    pos = start
    while pos < stop:
        block = pos // RNG_BLOCK
        block_start = block * RNG_BLOCK
        end = min(stop, block_start + RNG_BLOCK)
        generator.manual_seed(block_seed(seed, key, model, block))
        draws = torch.rand(end - block_start, generator=generator)
        uniform[pos - start:end - start] = draws[pos - block_start:]
        pos = end
    return uniform < density


# ---------------------------------------------------------------- TIES / DARE / DARE-TIES, streamed

def sparse_task_merge(tensors: Sequence[Tensor], base: Tensor, *, lam: float = 1.0, trim_density: float | None = None,
                      dare_density: float | None = None, elect: bool = True, seed: int = 0, key: str = "",
                      out_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32,
                      out: Tensor | None = None, saturated: list | None = None) -> Tensor:
    """base + lam * merge(d_1..d_N), d_i = x_i - base, chunk by chunk.

    trim_density (TIES trim): d_i keeps |d_i| >= its k-th smallest magnitude (see `trim_rank`).
    dare_density (DARE): d_i keeps each element with probability p = dare_density (mask from
    `dare_keep_mask`) and is rescaled by 1/p.
    elect (TIES): per element, sign s = sign(sum_i d_i) of the (trimmed / dropped) values, and the merge is
    the disjoint mean sum_{i: sign d_i = s} d_i / max(#{i: sign d_i = s}, 1); without it, the plain mean
    (1/N) sum_i d_i.
    """
    n = len(tensors)
    flats = [_flat(t) for t in tensors]
    flat_base = _flat(base)
    numel = flat_base.numel()
    device = flat_base.device
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype or compute_dtype, device=device)
    flat_out = _flat(out)
    if numel == 0:
        return out
    thresholds = None
    if trim_density is not None:
        tau = trim_thresholds(tensors, base, trim_density, compute_dtype)
        thresholds = torch.tensor(tau, dtype=compute_dtype, device=device)[:, None]
    scale = 1.0 / dare_density if dare_density is not None else 1.0
    step = min(_chunk(flat_base), numel)
    if dare_density is not None and device.type != "cpu":
        step = max(RNG_BLOCK, step - step % RNG_BLOCK)
    block_buf = torch.empty(n, step, dtype=compute_dtype, device=device)
    work_buf = torch.empty(n, step, dtype=compute_dtype, device=device)
    row_buf = torch.empty(4, step, dtype=compute_dtype, device=device)  # total, sign / count, merged, base
    limit = saturation_limit(flat_out.dtype)
    clamped = 0
    # Masks as 0/1 floats built from sign(): several times faster on the CPU than bool masks and where().
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        length = stop - start
        block = _deltas_into(block_buf[:, :length], flats, flat_base, start, stop, compute_dtype, row_buf[3])
        work = work_buf[:, :length]
        if thresholds is not None:  # keep |d| >= tau: 1 - (sign(|d| - tau) < 0) = clamp(sign(|d| - tau) + 1, max=1)
            torch.abs(block, out=work).sub_(thresholds).sign_().add_(1.0).clamp_(max=1.0)
            block.mul_(work)
        if dare_density is not None:
            for i in range(n):
                work[i].copy_(dare_keep_mask(seed, key, i, start, stop, dare_density))
            block.mul_(work)
        total, count, merged = row_buf[0, :length], row_buf[1, :length], row_buf[2, :length]
        torch.sum(block, 0, out=total)
        if not bool(torch.isfinite(total).all()):
            flat_out.fill_(float("nan"))  # an input holds NaN/Inf: the engine's check finds and names it
            return out
        if elect:  # agree_i = 1 iff sign(d_i) = sign(total) != 0: clamp(sign(d_i) * sign(total), min=0)
            torch.sign(block, out=work).mul_(torch.sign(total, out=count)).clamp_(min=0.0)
            torch.sum(work, 0, out=count)
            torch.sum(work.mul_(block), 0, out=merged)
            merged.div_(count.clamp_(min=1.0))
        else:
            merged = total.div_(n)
        acc = merged.mul_(lam * scale).add_(row_buf[3, :length])  # the base chunk, already in compute dtype
        clamped += saturate_(acc, limit)
        flat_out[start:stop] = acc
    if saturated is not None and clamped:
        saturated.append(clamped)
    return out


def sparse_task_merge_direct(tensors: Sequence[Tensor], base: Tensor, *, lam: float = 1.0,
                             trim_density: float | None = None, dare_density: float | None = None,
                             elect: bool = True, seed: int = 0, key: str = "",
                             compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """The same on full tensors (stack, kthvalue, one mask per model): the reference for tests."""
    b = _flat(base).to(compute_dtype)
    d = torch.stack([_flat(t).to(compute_dtype) - b for t in tensors])
    if trim_density is not None:
        k = trim_rank(b.numel(), trim_density)
        for i in range(d.shape[0]):
            tau = d[i].abs().kthvalue(k).values
            d[i] = d[i] * (d[i].abs() >= tau)
    if dare_density is not None:
        for i in range(d.shape[0]):
            d[i] = d[i] * dare_keep_mask(seed, key, i, 0, b.numel(), dare_density).to(d.device)
    if elect:
        sign = torch.sign(d.sum(0))
        agree = torch.sign(d) == sign
        merged = (d * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        merged = d.mean(0)
    if dare_density is not None:
        merged = merged / dare_density  # rescaled after the merge (the same as before it, up to rounding)
    return (b + lam * merged).reshape(base.shape)

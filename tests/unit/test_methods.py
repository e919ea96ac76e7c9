"""Merge methods against closed forms and constructed cases with known answers."""
import math

import pytest
import torch

from merge_core import methods as M


def _unit(v):
    return v / v.norm()


def _pair_at_angle(theta, n=4000, seed=0, norms=(1.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    e1 = _unit(torch.randn(n, generator=g, dtype=torch.float64))
    e2 = torch.randn(n, generator=g, dtype=torch.float64)
    e2 = _unit(e2 - (e2 @ e1) * e1)
    v0 = norms[0] * e1
    v1 = norms[1] * (math.cos(theta) * e1 + math.sin(theta) * e2)
    return v0, v1, e1, e2


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_closed_form(t):
    theta = 1.1
    v0, v1, e1, e2 = _pair_at_angle(theta, norms=(2.0, 3.0))
    out = M.slerp(v0, v1, t, compute_dtype=torch.float64)
    expected = (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
    assert torch.allclose(out, expected, atol=1e-12)


def test_slerp_of_unit_vectors_stays_on_sphere_at_the_right_angle():
    theta = 0.8
    v0, v1, e1, e2 = _pair_at_angle(theta)
    out = M.slerp(v0, v1, 0.3, compute_dtype=torch.float64)
    assert out.norm().item() == pytest.approx(1.0, abs=1e-12)
    assert math.acos((out @ e1).item()) == pytest.approx(0.3 * theta, abs=1e-9)


def test_slerp_falls_back_to_lerp_when_nearly_parallel_or_zero():
    v0, v1, _, _ = _pair_at_angle(0.01)  # cos > 0.9995
    assert torch.allclose(M.slerp(v0, v1, 0.4, compute_dtype=torch.float64), 0.6 * v0 + 0.4 * v1, atol=1e-15)
    z = torch.zeros_like(v0)
    assert torch.allclose(M.slerp(z, v1, 0.4, compute_dtype=torch.float64), 0.4 * v1)
    anti = -v0
    assert torch.allclose(M.slerp(v0, anti, 0.5, compute_dtype=torch.float64), torch.zeros_like(v0), atol=1e-15)


def test_slerp_with_base_interpolates_task_vectors():
    theta = 0.9
    d0, d1, _, _ = _pair_at_angle(theta, seed=3)
    base = torch.randn(d0.shape, dtype=torch.float64)
    out = M.slerp(base + d0, base + d1, 0.5, base=base, compute_dtype=torch.float64)
    expected = base + (d0 + d1) * math.sin(theta / 2) / math.sin(theta)
    assert torch.allclose(out, expected, atol=1e-12)


def test_karcher_of_two_points_is_slerp_direction_with_mean_norm():
    theta = 1.2
    v0, v1, e1, e2 = _pair_at_angle(theta, norms=(2.0, 5.0))
    a1, a2 = 1.0, 3.0
    out = M.karcher_mean([v0, v1], [a1, a2], max_iter=200, tol=1e-12, compute_dtype=torch.float64)
    t = a2 / (a1 + a2)
    direction = math.cos(t * theta) * e1 + math.sin(t * theta) * e2
    magnitude = (a1 * 2.0 + a2 * 5.0) / (a1 + a2)
    assert torch.allclose(out, magnitude * direction, atol=1e-9)


def test_karcher_of_symmetric_points_is_the_axis():
    g = torch.Generator().manual_seed(1)
    axis = _unit(torch.randn(3000, generator=g, dtype=torch.float64))
    others = []
    for _ in range(3):  # three directions at 0.7 rad from the axis, symmetric around it
        v = torch.randn(3000, generator=g, dtype=torch.float64)
        others.append(_unit(v - (v @ axis) * axis))
    # make the three orthogonal offsets sum to zero so the configuration is symmetric
    b0 = others[0]
    b1 = others[1] - (others[1] @ b0) * b0
    b1 = _unit(b1)
    offs = [b0, -0.5 * b0 + math.sqrt(3) / 2 * b1, -0.5 * b0 - math.sqrt(3) / 2 * b1]
    pts = [4.0 * (math.cos(0.7) * axis + math.sin(0.7) * o) for o in offs]
    out = M.karcher_mean(pts, None, max_iter=100, tol=1e-12, compute_dtype=torch.float64)
    assert torch.allclose(out, 4.0 * axis, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_karcher_gram_path_equals_direct_iteration(dtype, tol):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(257, 129, generator=g)
    xs = [(base + 0.6 * torch.randn(257, 129, generator=g)) * (1 + i) for i in range(5)]
    xs = [x.to(dtype) for x in xs]
    w = [0.1, 0.4, 0.2, 0.2, 0.1]
    fast = M.karcher_mean(xs, w, max_iter=10, tol=1e-5, compute_dtype=dtype)
    slow = M.karcher_mean_direct(xs, w, max_iter=10, tol=1e-5, compute_dtype=dtype)
    assert ((fast - slow).norm() / slow.norm()).item() < tol


def test_karcher_excludes_zero_tensors_from_direction_but_counts_them_in_magnitude():
    v0, v1, _, _ = _pair_at_angle(0.5, norms=(1.0, 1.0))
    z = torch.zeros_like(v0)
    with_zero = M.karcher_mean([v0, v1, z], [1, 1, 2], max_iter=50, tol=1e-10, compute_dtype=torch.float64)
    without = M.karcher_mean([v0, v1], [1, 1], max_iter=50, tol=1e-10, compute_dtype=torch.float64)
    # direction unchanged, magnitude = (1*1 + 1*1 + 2*0)/4 = 0.5 instead of 1
    assert torch.allclose(with_zero, 0.5 * without, atol=1e-12)
    assert torch.equal(M.karcher_mean([z, z], None), torch.zeros_like(z).float())


def test_karcher_handles_zero_dim_tensors():
    out = M.karcher_mean([torch.tensor(2.0), torch.tensor(4.0)], [1, 1])
    assert out.shape == () and out.item() == pytest.approx(3.0)  # same direction, mean norm


def test_moving_average_effective_weights():
    assert M.ema_coefficients(3, 0.5) == [0.25, 0.25, 0.5]
    a = 0.3
    assert M.ema_coefficients(4, a) == pytest.approx([(1 - a) ** 3, a * (1 - a) ** 2, a * (1 - a), a])
    assert sum(M.ema_coefficients(7, 0.2)) == pytest.approx(1.0)
    assert M.wma_coefficients(3) == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    assert M.wma_coefficients(3, [0.5, 0, 0.5]) == pytest.approx([0.5, 0.0, 0.5])  # the reference rejected this
    assert M.sma_coefficients(4) == [0.25] * 4
    with pytest.raises(ValueError):
        M.ema_coefficients(3, 0.0)
    with pytest.raises(ValueError):
        M.wma_coefficients(3, [1, -1, 1])


def test_ema_equals_its_recursive_definition():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, generator=g) for _ in range(4)]
    alpha = 0.35
    e = xs[0]
    for x in xs[1:]:
        e = alpha * x + (1 - alpha) * e
    assert torch.allclose(M.linear_combination(xs, M.ema_coefficients(4, alpha)), e, atol=1e-6)


def test_linear_combination_crosses_chunk_boundaries_and_casts_only_at_the_end():
    n = M.CPU_CHUNK * 2 + 17
    a = torch.full((n,), 1.0, dtype=torch.float16)
    b = torch.full((n,), 2047.0, dtype=torch.float16)
    # (1 + 2047 + 2047) / 3 = 1365 exactly; in fp16 arithmetic 2047/3 would round to 682.5
    out = M.linear_combination([a, b, b], M.sma_coefficients(3), out_dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 1365.0), atol=1e-4, rtol=0)
    assert M.weighted_sum(a[:3], b[:3], 0.25).tolist() == [0.75 + 0.25 * 2047.0] * 3
    assert M.add_difference(a[:2], b[:2], a[:2], 1.0).tolist() == [2047.0, 2047.0]

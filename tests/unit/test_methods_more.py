"""Model stock, geometric median, TIES, DARE and DARE-TIES: closed forms, the Gram / streamed paths against
full-tensor implementations, determinism, block weights, and (when .venv-mecha exists) sd-mecha 1.1.8."""
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from merge_core import methods as M
from merge_core import methods_sparse as S
from merge_core import registry
from merge_core.cli import main
from merge_core.demo import small_sd15_state_dicts
from merge_core.engine import merge
from merge_core.errors import MergeError
from merge_core.io import open_model, save_safetensors

from conftest import TO_K, TOKENS, UNET

ROOT = Path(__file__).resolve().parents[2]
MECHA = ROOT / ".venv-mecha" / "bin" / "python"


def _load(path):
    with open_model(path) as src:
        return {k: src.load(k).clone() for k in src.keys()}, src.metadata


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three fine-tunes of it (fp32, SD1 layout at small width)."""
    folder = tmp_path_factory.mktemp("family")
    base = small_sd15_state_dicts(1, dtype=torch.float32)[0]
    g = torch.Generator().manual_seed(7)
    paths, sds = [], []
    for i in range(4):
        sd = {k: (v + (0.02 * torch.randn(v.shape, generator=g) + 0.01 * i if v.is_floating_point() and i else 0)
                  if v.is_floating_point() else v) for k, v in base.items()}
        sd = {k: (v if not v.is_floating_point() else v.to(torch.float32)) for k, v in sd.items()}
        sds.append(sd)
        paths.append(folder / f"f{i}.safetensors")
        save_safetensors(paths[-1], sd)
    return sds, paths  # [0] is the base


# ---------------------------------------------------------------- registry entries

def test_new_methods_are_registry_entries_with_their_cli_names_and_flags():
    names = registry.method_names()
    for name in ("model-stock", "geometric-median", "ties", "dare", "dare-ties"):
        assert name in names
    flags = {f.flag: f for f in registry.cli_flags()}
    assert {m for m, _ in flags["--density"].targets} == {"ties", "dare", "dare-ties"}
    assert {m for m, _ in flags["--lambda"].targets} == {"ties", "dare", "dare-ties"}
    assert {m for m, _ in flags["--seed"].targets} == {"dare", "dare-ties"}
    assert registry.get("ties").block_param.name == "lambda"
    assert registry.get("geometric-median").block_param.name == "weights"
    with pytest.raises(MergeError, match="--density must be in \\(0, 1\\], got 0"):
        registry.get("ties").bind(2, {"density": 0})
    with pytest.raises(MergeError, match="--seed must be a whole number"):
        registry.get("dare").bind(2, {"seed": 1.5})


def test_task_vector_methods_need_a_base(family, tmp_path):
    _, paths = family
    for method in ("ties", "dare", "dare-ties", "model-stock"):
        with pytest.raises(MergeError, match="needs a base"):
            merge(paths[1:], method, output=tmp_path / "x.safetensors")
        assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(MergeError, match="base model only applies"):
        merge(paths[1:], "geometric-median", base=paths[0], output=tmp_path / "x.safetensors")


# ---------------------------------------------------------------- model stock

def test_model_stock_t_closed_form():
    # two task vectors at 60 degrees: cos = 1/2, N = 2 -> t = 2 * 0.5 / (1 + 0.5) = 2/3
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    gram = torch.stack([d1, d2]) @ torch.stack([d1, d2]).T
    assert S.model_stock_t(gram) == pytest.approx(2 / 3, rel=1e-12)
    # three vectors, pairwise cosines 0.2, 0.4, 0.6 -> mean 0.4, t = 3 * 0.4 / (1 + 2 * 0.4)
    gram = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]], dtype=torch.float64) * 4.0
    assert S.model_stock_t(gram) == pytest.approx(1.2 / 1.8, rel=1e-12)
    base, x1, x2 = torch.zeros(2), d1, d2
    out = S.model_stock_direct([x1, x2], base)
    assert torch.allclose(out, (2 / 3) * (x1 + x2).double() / 2)


def test_model_stock_gram_path_equals_full_tensor_implementation(family, tmp_path):
    sds, paths = family
    merged, _ = _load(merge(paths[1:], "model-stock", base=paths[0], output=tmp_path / "ms.safetensors",
                            dtype="fp32", precision="fp64").path)
    for key in (TO_K, TOKENS, UNET + "out.2.bias"):
        ref = S.model_stock_direct([sd[key] for sd in sds[1:]], sds[0][key])
        assert _rel(merged[key], ref) < 1e-6, key
    merged32, _ = _load(merge(paths[1:], "model-stock", base=paths[0], output=tmp_path / "ms32.safetensors",
                              dtype="fp32").path)
    ref = S.model_stock_direct([sd[TO_K] for sd in sds[1:]], sds[0][TO_K])
    assert _rel(merged32[TO_K], ref) < 1e-6


# ---------------------------------------------------------------- geometric median

def test_geometric_median_closed_forms():
    # Two points: every point of the segment is a median; Weiszfeld from the mean stays at the mean.
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0])
    assert torch.allclose(S.geometric_median([a, b], compute_dtype=torch.float64), torch.tensor([1.0, 0.0]).double())
    # Three collinear points: the median is the middle one.
    pts = [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([5.0, 0.0, 0.0])]
    out = S.geometric_median(pts, max_iter=2000, eps=1e-12, compute_dtype=torch.float64)
    assert torch.allclose(out, pts[1].double(), atol=1e-6)
    # Equilateral triangle: the Fermat point is the centroid.
    tri = [torch.tensor([1.0, 0.0]), torch.tensor([-0.5, math.sqrt(3) / 2]), torch.tensor([-0.5, -math.sqrt(3) / 2])]
    assert torch.allclose(S.geometric_median(tri, compute_dtype=torch.float64), torch.zeros(2).double(), atol=1e-7)
    # One point outweighing the rest (w1 >= w2 + w3) is the weighted median.
    out = S.geometric_median(pts, weights=[1, 3, 1], max_iter=5000, eps=1e-12, compute_dtype=torch.float64)
    assert torch.allclose(out, pts[1].double(), atol=1e-5)


def test_geometric_median_gram_path_equals_full_tensor_weiszfeld(family, tmp_path):
    sds, paths = family
    merged, _ = _load(merge(paths, "geometric-median", output=tmp_path / "gm.safetensors", dtype="fp32",
                            params={"weights": [1, 2, 1, 1]}).path)
    for key in (TO_K, TOKENS, UNET + "out.2.bias"):
        ref = S.geometric_median_direct([sd[key] for sd in sds], weights=[1, 2, 1, 1])
        assert _rel(merged[key], ref) < 1e-6, key
    # float64 math: the coefficient-space iteration is the full-tensor one to rounding
    x = [sd[TO_K].double() for sd in sds]
    assert _rel(S.geometric_median(x, compute_dtype=torch.float64), S.geometric_median_direct(x)) < 1e-12


def test_geometric_median_block_weights_move_per_block_weights(family, tmp_path):
    sds, paths = family
    out = tmp_path / "gmb.safetensors"
    merge(paths[:3], "geometric-median", output=out, dtype="fp32",
          blocks=["BASE:1", "BASE:1, IN*:0", "BASE:1, IN*:0"])
    merged, meta = _load(out)
    # In the IN blocks only model 0 weighs: the median is model 0 there.
    assert torch.allclose(merged[TO_K], sds[0][TO_K], atol=1e-6)
    recipe = json.loads(meta["manifold_merge_recipe"])
    assert recipe["parameters"]["block_parameter"] == "weights"


# ---------------------------------------------------------------- TIES

def test_ties_closed_form_by_hand():
    base = torch.zeros(5)
    d = [torch.tensor([0.5, -0.1, 0.3, -0.8, 0.05]),
         torch.tensor([-0.4, 0.2, 0.6, -0.1, 0.02]),
         torch.tensor([0.1, -0.3, -0.2, 0.7, 0.01])]
    # density 0.6: keep |d| >= the k-th smallest |d|, k = int(0.4 * 5) = 2 -> 0.1 for each model:
    #   [0.5, -0.1, 0.3, -0.8, 0], [-0.4, 0.2, 0.6, -0.1, 0], [0.1, -0.3, -0.2, 0.7, 0]
    # elected signs (sum of the trimmed values): +0.2, -0.2, +0.7, -0.2, 0
    # disjoint means: (0.5+0.1)/2, (-0.1-0.3)/2, (0.3+0.6)/2, (-0.8-0.1)/2, 0
    expected = torch.tensor([0.3, -0.2, 0.45, -0.45, 0.0])
    assert torch.allclose(S.sparse_task_merge(d, base, trim_density=0.6), expected, atol=1e-7)
    assert torch.allclose(S.sparse_task_merge([x + 1 for x in d], base + 1, lam=0.5, trim_density=0.6),
                          1 + 0.5 * expected, atol=1e-6)
    # density 1 keeps all: element 0: +0.5 -0.4 +0.1 -> + -> (0.5 + 0.1) / 2; element 4: all positive -> mean
    full = S.sparse_task_merge(d, base, trim_density=1.0)
    assert full[0].item() == pytest.approx(0.3) and full[4].item() == pytest.approx(0.08 / 3)


@pytest.mark.parametrize("numel,density", [(3000, 0.2), (1_500_000, 0.2), (1_500_000, 0.9), (1_500_000, 1.0),
                                           (1_500_000, 0.003)])
def test_streamed_threshold_is_the_exact_kthvalue(numel, density):
    g = torch.Generator().manual_seed(numel)
    base = torch.randn(numel, generator=g).half()
    xs = [(base.float() + 0.01 * torch.randn(numel, generator=g)).half() for _ in range(3)]
    xs[1][: numel // 3] = base[: numel // 3]  # a third exactly equal to the base: heavy ties at 0
    k = S.trim_rank(numel, density)
    expected = [float((x.float() - base.float()).abs().kthvalue(k).values) for x in xs]
    assert S.trim_thresholds(xs, base, density) == expected


def test_threshold_bracket_that_misses_is_widened(monkeypatch):
    # a sample that sees only the small values (every value past the stride pattern is large) misses
    numel = 2_000_000
    d = torch.full((numel,), 1e-3)
    d[1::2] = torch.linspace(1.0, 2.0, numel // 2)
    monkeypatch.setattr(S, "SAMPLE", 64)
    for k in (10, numel // 2 + 10, numel - 5):
        assert S.kth_smallest_magnitudes([d], torch.zeros(numel), [k]) == [float(d.kthvalue(k).values)]


def test_ties_streamed_equals_full_tensor_and_through_files(family, tmp_path):
    sds, paths = family
    merged, _ = _load(merge(paths[1:], "ties", base=paths[0], output=tmp_path / "t.safetensors", dtype="fp32",
                            params={"density": 0.3, "lambda": 0.8}).path)
    for key in (TO_K, TOKENS, UNET + "out.2.bias"):
        ref = S.sparse_task_merge_direct([sd[key] for sd in sds[1:]], sds[0][key], lam=0.8, trim_density=0.3)
        assert torch.equal(merged[key], ref), key


def test_ties_lambda_block_weights(family, tmp_path):
    sds, paths = family
    out = tmp_path / "tb.safetensors"
    main(["merge", "--models", str(paths[1]), str(paths[2]), "--base", str(paths[0]), "--method", "ties",
          "--density", "0.5", "--blocks", "BASE:1, IN*:0", "--output", str(out), "--dtype", "fp32", "-q"])
    merged, meta = _load(out)
    assert torch.equal(merged[TO_K], sds[0][TO_K])  # lambda 0 in the IN blocks: the base
    ref = S.sparse_task_merge_direct([sds[1][TOKENS], sds[2][TOKENS]], sds[0][TOKENS], trim_density=0.5)
    assert torch.equal(merged[TOKENS], ref)
    assert json.loads(meta["manifold_merge_recipe"])["parameters"]["block_parameter"] == "lambda"


# ---------------------------------------------------------------- DARE / DARE-TIES

def test_dare_masks_are_a_function_of_seed_key_model_and_position():
    a = S.dare_keep_mask(3, "k", 0, 0, 700_000, 0.3)
    pieces = torch.cat([S.dare_keep_mask(3, "k", 0, s, min(s + 99_999, 700_000), 0.3)
                        for s in range(0, 700_000, 99_999)])
    assert torch.equal(a, pieces)
    assert abs(a.float().mean().item() - 0.3) < 0.003
    assert not torch.equal(a, S.dare_keep_mask(4, "k", 0, 0, 700_000, 0.3))
    assert not torch.equal(a, S.dare_keep_mask(3, "k2", 0, 0, 700_000, 0.3))
    assert not torch.equal(a, S.dare_keep_mask(3, "k", 1, 0, 700_000, 0.3))


def test_dare_closed_forms():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g)
    xs = [base + torch.randn(1000, generator=g) for _ in range(3)]
    # density 1 keeps everything: base + lambda * mean(d)
    out = S.sparse_task_merge(xs, base, lam=0.7, dare_density=1.0, elect=False, key="k")
    assert torch.allclose(out, base + 0.7 * sum(x - base for x in xs) / 3, atol=1e-6)
    # density p: d_i * mask_i / p, averaged
    p = 0.25
    masks = [S.dare_keep_mask(5, "k", i, 0, 1000, p) for i in range(3)]
    expected = base + sum((x - base) * m for x, m in zip(xs, masks)) / 3 / p
    out = S.sparse_task_merge(xs, base, dare_density=p, elect=False, seed=5, key="k")
    assert torch.allclose(out, expected, atol=1e-5)
    # DARE-TIES at density 1 is TIES without the trim; with drops, TIES' election on the dropped vectors
    assert torch.allclose(S.sparse_task_merge(xs, base, dare_density=1.0, elect=True, key="k"),
                          S.sparse_task_merge(xs, base, trim_density=1.0, elect=True), atol=1e-7)
    dropped = [(x - base) * m for x, m in zip(xs, masks)]
    ties_of_dropped = S.sparse_task_merge([base + d for d in dropped], base, trim_density=1.0)
    out = S.sparse_task_merge(xs, base, dare_density=p, elect=True, seed=5, key="k")
    assert torch.allclose(out, base + (ties_of_dropped - base) / p, atol=1e-5)


def test_dare_same_seed_same_file_with_1_and_4_threads(family, tmp_path):
    _, paths = family
    outs = []
    for threads in (1, 4):
        for method in ("dare", "dare-ties"):
            out = tmp_path / f"{method}{threads}.safetensors"
            merge(paths[1:], method, base=paths[0], output=out, threads=threads,
                  params={"density": 0.3, "seed": 11})
            outs.append(out.read_bytes())
    assert outs[0] == outs[2] and outs[1] == outs[3]
    other = tmp_path / "other.safetensors"
    merge(paths[1:], "dare", base=paths[0], output=other, params={"density": 0.3, "seed": 12})
    assert _load(other)[0][TO_K].ne(_load(tmp_path / "dare1.safetensors")[0][TO_K]).any()


def test_dare_through_files_equals_full_tensor(family, tmp_path):
    sds, paths = family
    for method, elect in (("dare", False), ("dare-ties", True)):
        merged, _ = _load(merge(paths[1:], method, base=paths[0], output=tmp_path / f"{method}.safetensors",
                                dtype="fp32", params={"density": 0.4, "seed": 9, "lambda": 1.5}).path)
        for key in (TO_K, TOKENS):
            ref = S.sparse_task_merge_direct([sd[key] for sd in sds[1:]], sds[0][key], lam=1.5, dare_density=0.4,
                                             elect=elect, seed=9, key=key)
            assert torch.allclose(merged[key], ref, rtol=1e-6, atol=1e-7), (method, key)


def test_nan_in_an_input_is_named_for_the_sparse_methods(family, tmp_path):
    sds, paths = family
    bad = dict(sds[2])
    bad[TO_K] = bad[TO_K].clone()
    bad[TO_K][0, 0] = float("nan")
    bad_path = tmp_path / "bad.safetensors"
    save_safetensors(bad_path, bad)
    for method in ("ties", "dare"):
        with pytest.raises(MergeError, match="bad.safetensors.*NaN"):
            merge([paths[1], bad_path], method, base=paths[0], output=tmp_path / "o.safetensors")


# ---------------------------------------------------------------- against sd-mecha 1.1.8 (when installed)

MECHA_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from sd_mecha.extensions.builtin.merge_methods import linear, ties
inp = load_file(sys.argv[1])
base = inp["base"]; xs = [inp[f"x{i}"] for i in range(int(inp["n"].item()))]
deltas = [x - base for x in xs]
out = {
    "ties": base + ties.ties_sum.__wrapped__(*deltas, k=0.3, vote_sgn=True),
    "dare_ties_d1": base + ties.ties_sum_with_dropout.__wrapped__(*deltas, probability=0.0, k=1.0, vote_sgn=True,
                                                                   apply_stock=True, seed=1),
    "model_stock": base + ties.model_stock.__wrapped__(*deltas[:2], cos_eps=1e-6),
    "gm": ties.geometric_median.__wrapped__(*xs, eps=1e-6, maxiter=100, ftol=1e-20),
    # sd-mecha's train difference: add_difference(a, b - c, alpha=train_difference_mask(a, b, c, alpha))
    "train_difference": xs[0] + (xs[1] - xs[2]) * linear.train_difference_mask.__wrapped__(xs[0], xs[1], xs[2],
                                                                                            alpha=0.7),
}
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
"""


@pytest.mark.skipif(not MECHA.exists(), reason="needs .venv-mecha with sd-mecha 1.1.8 (see docs/benchmarks.md)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_sd_mecha(tmp_path, dtype):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4096, generator=g).to(dtype)  # 1-D: sd-mecha's row-wise model stock is whole-tensor
    xs = [base + (0.05 * torch.randn(4096, generator=g) + 0.02 * i).to(dtype) for i in range(3)]
    save_file({"base": base, "n": torch.tensor(3), **{f"x{i}": x for i, x in enumerate(xs)}}, tmp_path / "in.st")
    (tmp_path / "ref.py").write_text(MECHA_SCRIPT)
    subprocess.run([str(MECHA), str(tmp_path / "ref.py"), str(tmp_path / "in.st"), str(tmp_path / "ref.st")],
                   check=True, capture_output=True)
    ref = load_file(tmp_path / "ref.st")
    assert torch.equal(S.sparse_task_merge(xs, base, trim_density=0.3, compute_dtype=dtype), ref["ties"])
    assert torch.equal(S.sparse_task_merge(xs, base, dare_density=1.0, compute_dtype=dtype), ref["dare_ties_d1"])
    gram = M.gram_matrix(xs[:2], base, dtype)
    ms = M.linear_combination(xs[:2] + [base], M.with_base(S.model_stock_coefficients(gram)), compute_dtype=dtype)
    assert _rel(ms, ref["model_stock"]) < 1e-6
    gm = S.geometric_median(xs, compute_dtype=dtype)
    # sd-mecha iterates on full fp32 tensors; its own rounding is ~1e-5 there (ours: 4e-8 of the exact)
    assert _rel(gm, ref["gm"]) < (1e-5 if dtype == torch.float32 else 1e-9)
    td = M.train_difference(xs[0], xs[1], xs[2], 0.7, compute_dtype=dtype)
    assert _rel(td, ref["train_difference"]) < (1e-6 if dtype == torch.float32 else 1e-12)


# ---------------------------------------------------------------- train difference (supermerger's trainDifference)

def test_train_difference_through_files_equals_the_closed_form(family, tmp_path):
    sds, paths = family
    out = tmp_path / "td.safetensors"
    merge(paths[:3], "train-difference", params={"multiplier": 0.6}, output=out, dtype="fp32")
    merged, meta = _load(out)
    assert json.loads(meta["manifold_merge_recipe"])["parameters"]["multiplier"] == 0.6
    checked = 0
    for key, value in merged.items():
        a, b, c = (sd[key] for sd in sds[:3])
        if not a.is_floating_point():
            assert torch.equal(value, a)  # integer tensors are copied
            continue
        a, b, c = a.double(), b.double(), c.double()
        near, diff = (b - a).abs(), b - c
        expected = a + 0.6 * 1.8 * torch.where(near + diff.abs() > 0, near / (near + diff.abs()), 0.0) * diff
        assert torch.allclose(value.double(), expected, rtol=1e-5, atol=1e-6), key
        checked += 1
    assert checked > 1000


def test_train_difference_cases_with_known_answers():
    a = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0])
    b = torch.tensor([1.0, 3.0, 1.0, 2.0, 4.0])   # b = a: nothing moved, nothing added
    c = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])   # c = a: the full difference (scale 1/2 * 1.8 = 0.9)
    out = M.train_difference(a, b, c, 1.0)
    # [0] all equal: 0/0 -> a; [1] |b-a| = 2, |b-c| = 2: a + 1.8 * 0.5 * 2; [2] b = a: a; [3] b = a: a;
    # [4] c = a: |b-a| = |b-c| = 4: a + 1.8 * 0.5 * 4
    assert torch.allclose(out, torch.tensor([1.0, 2.8, 1.0, 2.0, 3.6]))
    assert torch.equal(M.train_difference(a, b, c, 0.0), a)


def test_train_difference_takes_exactly_three_models(family, tmp_path):
    _, paths = family
    with pytest.raises(MergeError, match="train-difference takes 3 models, got 2"):
        merge(paths[:2], "train-difference", output=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()

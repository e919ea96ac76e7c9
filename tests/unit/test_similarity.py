import math

import pytest
import torch

from merge_core.errors import MergeError
from merge_core.similarity import cosine_from_gram, pairwise_cosine


def test_cosine_from_gram_closed_forms():
    # x = (2, 0), y = (1, 0): parallel; z = (0, 3): orthogonal to both; w = 0
    vectors = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    cos = cosine_from_gram(vectors @ vectors.T)
    assert cos[0, 1] == 1.0 and cos[0, 2] == 0.0 and cos[1, 2] == 0.0
    assert cos[3, 0] == 0.0 and cos[3, 3] == 1.0  # a zero model has no direction


def test_pairwise_cosine_is_the_cosine_of_the_concatenated_float_tensors(write):
    g = torch.Generator().manual_seed(0)
    models = [{"a": torch.randn(7, 5, generator=g), "b": torch.randn(11, generator=g).half(),
               "ids": torch.arange(4)} for _ in range(3)]
    models[0]["extra"] = torch.ones(3)  # not in every model: skipped
    paths = [write(f"m{i}.safetensors", sd) for i, sd in enumerate(models)]
    result = pairwise_cosine(paths)
    flat = [torch.cat([sd["a"].flatten().double(), sd["b"].double()]) for sd in models]
    for i in range(3):
        for j in range(3):
            expected = float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
            assert result["cosine"][i][j] == pytest.approx(expected, abs=1e-12)
    assert result["keys_compared"] == 2 and sorted(result["keys_skipped"]) == ["extra", "ids"]
    assert result["names"] == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


def test_with_a_base_it_compares_task_vectors(write):
    base = {"w": torch.tensor([1.0, 1.0, 1.0])}
    a = {"w": torch.tensor([2.0, 1.0, 1.0])}   # task vector (1, 0, 0)
    b = {"w": torch.tensor([1.0, 3.0, 1.0])}   # task vector (0, 2, 0)
    c = {"w": torch.tensor([2.0, 2.0, 1.0])}   # task vector (1, 1, 0)
    paths = [write(f"{n}.safetensors", sd) for n, sd in (("a", a), ("b", b), ("c", c))]
    result = pairwise_cosine(paths, base=write("base.safetensors", base))
    assert result["cosine"][0][1] == pytest.approx(0.0, abs=1e-15)
    assert result["cosine"][0][2] == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert result["norms"] == pytest.approx([1.0, 2.0, math.sqrt(2)])


def test_needs_two_models_and_something_in_common(write):
    with pytest.raises(MergeError, match="at least two"):
        pairwise_cosine([write("one.safetensors", {"w": torch.ones(2)})])
    p1 = write("x.safetensors", {"w": torch.ones(2)})
    p2 = write("y.safetensors", {"v": torch.ones(2)})
    with pytest.raises(MergeError, match="no floating-point tensors in common"):
        pairwise_cosine([p1, p2])


def test_per_block_cosines_are_those_of_each_blocks_keys(tmp_path):
    """Each block's matrix is the cosine of the concatenation of that block's keys only; the models here
    differ only in OUT03, so that block alone is below 1."""
    import math

    import torch
    from merge_core.blocks import architecture
    from merge_core.demo import small_sd15_state_dicts
    from merge_core.io import save_safetensors
    from merge_core.similarity import pairwise_cosine
    (a,) = small_sd15_state_dicts(1, dtype=torch.float32)
    arch = architecture("sd1")
    b = {k: (v.clone() if arch.block(k) != "OUT03" or not v.is_floating_point() else -v + 0.01) for k, v in a.items()}
    save_safetensors(tmp_path / "a.safetensors", a)
    save_safetensors(tmp_path / "b.safetensors", b)
    sim = pairwise_cosine([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert sim["architecture"] == "sd1" and list(sim["blocks"])[:2] == ["BASE", "IN00"]
    keys = [k for k in a if arch.block(k) == "OUT03" and a[k].is_floating_point()]
    xa = torch.cat([a[k].double().reshape(-1) for k in keys])
    xb = torch.cat([b[k].double().reshape(-1) for k in keys])
    expected = float(xa @ xb / (xa.norm() * xb.norm()))
    assert math.isclose(sim["blocks"]["OUT03"][0][1], expected, rel_tol=1e-9)
    assert expected < -0.9
    assert all(math.isclose(m[0][1], 1.0, rel_tol=1e-12) for blk, m in sim["blocks"].items() if blk != "OUT03")

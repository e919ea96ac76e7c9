"""The engine end to end through real files: numbers, mismatches, errors, atomicity."""
import json
import os

import pytest
import torch

from merge_core import methods as M
from merge_core.engine import merge
from merge_core.errors import (ArchitectureMismatch, BadCheckpoint, DeviceUnavailable, MergeCancelled,
                               MissingKeys, OutputExists, ShapeMismatch)
from merge_core.io import open_model

from conftest import CONV_IN, POS_IDS, TO_K, TOKENS, UNET, tiny_sd1


def _load(path):
    with open_model(path) as src:
        return {k: src.load(k).clone() for k in src.keys()}, src.metadata


@pytest.fixture
def three(write):
    sds = [tiny_sd1(i) for i in range(3)]
    return sds, [write(f"m{i}.safetensors", sd) for i, sd in enumerate(sds)]


@pytest.mark.parametrize("method,kw,coeffs", [
    ("sma", {}, [1 / 3] * 3),
    ("ema", {"alpha": 0.5}, [0.25, 0.25, 0.5]),
    ("wma", {}, [3 / 6, 2 / 6, 1 / 6]),
    ("wma", {"weights": [1, 0, 3]}, [0.25, 0, 0.75]),
])
def test_linear_methods_through_files_are_fp32_math_cast_once(three, tmp_path, method, kw, coeffs):
    sds, paths = three
    out = tmp_path / "out.safetensors"
    result = merge(paths, method, output=out, **kw)
    merged, meta = _load(out)
    for key in (TO_K, CONV_IN, TOKENS, "logit_scale"):
        exact = sum(c * sd[key].double() for c, sd in zip(coeffs, sds))
        assert merged[key].dtype == torch.float16
        # fp32 math, one rounding to fp16 at the end: within half an fp16 ulp of the exact value
        assert ((merged[key].double() - exact).abs() <= exact.abs() * 2 ** -11 + 2 ** -24).all(), key
    assert torch.equal(merged[POS_IDS], sds[0][POS_IDS])  # int tensor copied, not averaged
    assert json.loads(meta["normalized_weights"]) == pytest.approx(coeffs, abs=1e-6)
    assert meta["merged_models_count"] == "3" and json.loads(meta["source_files"]) == [p.name for p in paths]
    recipe = json.loads(meta["manifold_merge_recipe"])
    assert recipe["method"] == method and [i["sha256"] for i in recipe["inputs"]] == [
        __import__("hashlib").sha256(p.read_bytes()).hexdigest()[:10] for p in paths]
    assert "sd_merge_recipe" in meta and "sd_merge_models" in meta
    assert result.architecture == "sd1"


def test_karcher_and_slerp_through_files_match_the_pure_functions(three, tmp_path):
    sds, paths = three
    merged, _ = _load(merge(paths, "karcher", output=tmp_path / "k.safetensors", weights=[1, 2, 3],
                            dtype="fp32").path)
    ref = M.karcher_mean_direct([sd[TO_K].float() for sd in sds], [1, 2, 3])
    assert torch.allclose(merged[TO_K], ref, rtol=1e-5, atol=1e-6)
    merged, _ = _load(merge(paths[:2], "slerp", output=tmp_path / "s.safetensors", t=0.3, dtype="fp32").path)
    assert torch.allclose(merged[TO_K], M.slerp(sds[0][TO_K].float(), sds[1][TO_K].float(), 0.3), atol=1e-6)
    merged, _ = _load(merge(paths[1:], "slerp", base=paths[0], output=tmp_path / "b.safetensors", t=0.5,
                            dtype="fp32").path)
    ref = M.slerp(sds[1][TO_K].float(), sds[2][TO_K].float(), 0.5, base=sds[0][TO_K].float())
    assert torch.allclose(merged[TO_K], ref, atol=1e-5)


def test_in_memory_state_dicts_give_a_state_dict(three):
    sds, _ = three
    result = merge(sds[:2], "weighted", multiplier=0.25, dtype="fp32")
    assert result.path is None
    assert torch.allclose(result.state_dict[TO_K], 0.75 * sds[0][TO_K].float() + 0.25 * sds[1][TO_K].float())
    result = merge(sds, "add-difference", multiplier=1.0, dtype="fp32")
    assert torch.allclose(result.state_dict[TO_K],
                          sds[0][TO_K].float() + sds[1][TO_K].float() - sds[2][TO_K].float(), atol=1e-3)


def test_missing_keys_are_copied_and_listed_or_refused_with_strict(write, tmp_path):
    a = tiny_sd1(0, extra={"only.in.a": torch.ones(3).half()})
    b = tiny_sd1(1)
    pa, pb = write("a.safetensors", a), write("b.safetensors", b)
    result = merge([pa, pb], "sma", output=tmp_path / "o.safetensors")
    merged, _ = _load(result.path)
    assert torch.equal(merged["only.in.a"], a["only.in.a"])
    assert result.summary["missing_keys"] == {"only.in.a": ["b.safetensors"]}
    with pytest.raises(MissingKeys, match="only.in.a"):
        merge([pa, pb], "sma", output=tmp_path / "o2.safetensors", strict=True)
    assert not (tmp_path / "o2.safetensors").exists()


def test_inpainting_conv_in_and_enlarged_vocab_merge_on_the_common_part(write, tmp_path):
    plain = tiny_sd1(0)
    inpaint = tiny_sd1(1, conv_in_channels=9, vocab=53)
    result = merge([write("p.safetensors", plain), write("i.safetensors", inpaint)], "sma",
                   output=tmp_path / "o.safetensors", dtype="fp32")
    merged, _ = _load(result.path)
    conv = merged[CONV_IN]
    assert conv.shape == (8, 9, 3, 3)
    assert torch.allclose(conv[:, :4], (plain[CONV_IN].float() + inpaint[CONV_IN][:, :4].float()) / 2)
    assert torch.equal(conv[:, 4:], inpaint[CONV_IN][:, 4:].float())  # kept, never zero-padded
    tok = merged[TOKENS]
    assert tok.shape == (53, 16) and torch.equal(tok[50:], inpaint[TOKENS][50:].float())
    assert set(result.summary["partial_shape_keys"]) == {CONV_IN, TOKENS}


def test_other_shape_mismatch_names_the_key_and_shapes(write, tmp_path):
    a = tiny_sd1(0)
    b = tiny_sd1(1, extra={UNET + "out.2.bias": torch.zeros(5).half()})
    with pytest.raises(ShapeMismatch, match=r"out\.2\.bias.*a\.safetensors \[4\].*b\.safetensors \[5\]"):
        merge([write("a.safetensors", a), write("b.safetensors", b)], "sma", output=tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_different_architectures_stop_before_writing(write, tmp_path):
    sd1 = tiny_sd1(0)
    sdxl = {UNET + "label_emb.0.0.weight": torch.zeros(4, 2816).half(), **tiny_sd1(1)}
    pa, pb = write("sd15.safetensors", sd1), write("xl.safetensors", sdxl)
    with pytest.raises(ArchitectureMismatch, match=r"sd15\.safetensors: SD1\.x; xl\.safetensors: SDXL"):
        merge([pa, pb], "karcher", output=tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    result = merge([pa, pb], "sma", output=tmp_path / "o.safetensors", force=True)
    merged, _ = _load(result.path)
    assert UNET + "label_emb.0.0.weight" not in merged  # first model's keys, common ones merged


def test_nan_in_an_input_names_file_and_key_and_writes_nothing(write, tmp_path):
    bad = tiny_sd1(1)
    bad[TO_K][3, 3] = float("nan")
    paths = [write("good.safetensors", tiny_sd1(0)), write("bad.safetensors", bad)]
    with pytest.raises(BadCheckpoint, match=r"bad\.safetensors: tensor '.*attn2\.to_k\.weight' contains NaN"):
        merge(paths, "sma", output=tmp_path / "o.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors", "good.safetensors"]


def test_cancel_from_the_progress_callback_leaves_nothing(three, tmp_path):
    _, paths = three
    seen = []

    def progress(done, total, key):
        seen.append((done, total))
        return done < 2

    with pytest.raises(MergeCancelled):
        merge(paths, "karcher", output=tmp_path / "o.safetensors", progress=progress, threads=1)
    assert seen[:2] == [(1, 6), (2, 6)]
    assert not (tmp_path / "o.safetensors").exists()
    assert not [f for f in os.listdir(tmp_path) if "tmp-merge" in f]


def test_progress_reports_every_key(three, tmp_path):
    _, paths = three
    calls = []
    merge(paths, "sma", output=tmp_path / "o.safetensors", progress=lambda d, t, k: calls.append((d, t, k)))
    assert [c[0] for c in calls] == list(range(1, 7)) and {c[1] for c in calls} == {6}


def test_never_overwrite_an_input_or_an_existing_output(three, tmp_path):
    _, paths = three
    before = paths[0].read_bytes()
    with pytest.raises(OutputExists, match="refusing to overwrite an input"):
        merge(paths, "sma", output=paths[0], overwrite=True)
    with pytest.raises(OutputExists, match="already exists"):
        merge(paths, "sma", output=paths[1])
    assert paths[0].read_bytes() == before
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    merge(paths, "sma", output=out, overwrite=True)
    assert out.stat().st_size > 1


def test_cuda_requested_without_cuda_is_a_clear_error(three, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, paths = three
    with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
        merge(paths, "sma", output=tmp_path / "o.safetensors", device="cuda")
    merge(paths, "sma", output=tmp_path / "o.safetensors", device="auto")  # the explicit fallback


def test_fp64_precision_and_bf16_output(three, tmp_path):
    sds, paths = three
    merged, _ = _load(merge(paths, "sma", output=tmp_path / "o.safetensors", precision="fp64", dtype="bf16").path)
    exact = sum(sd[TO_K].double() for sd in sds) / 3
    assert merged[TO_K].dtype == torch.bfloat16
    assert ((merged[TO_K].double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-12).all()


def test_sharded_folder_output_with_index_and_extra_files(tmp_path, write):
    src = tmp_path / "hf_in"
    src.mkdir()
    paths = []
    for i in range(2):
        d = tmp_path / f"hf{i}"
        d.mkdir()
        sd = tiny_sd1(i)
        from merge_core.io import save_safetensors
        save_safetensors(d / "model.safetensors", sd)
        (d / "config.json").write_text('{"x": 1}')
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in sd}}))
        paths.append(d)
    out = tmp_path / "merged_hf"
    merge(paths, "sma", output=out, copy_extra_files=True, max_shard_bytes=40_000)
    files = sorted(os.listdir(out))
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) >= 2
    with open_model(out) as merged:
        assert len(merged.keys()) == len(tiny_sd1(0))


def test_parameters_that_require_grad_merge_without_autograd(three):
    """Hosts (ComfyUI) hand in nn.Parameters; the merge must not trip over autograd."""
    sds, _ = three
    params = [{k: torch.nn.Parameter(v.float(), requires_grad=True) if v.is_floating_point() else v
               for k, v in sd.items()} for sd in sds]
    result = merge(params, "karcher", dtype="fp32")
    assert not result.state_dict[TO_K].requires_grad
    assert torch.allclose(result.state_dict[TO_K], M.karcher_mean_direct([sd[TO_K].float() for sd in sds]), atol=1e-5)

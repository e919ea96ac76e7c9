"""The method registry, parameter validation in every front end, and block weights for every method."""
import json

import pytest
import torch

from merge_core import methods as M
from merge_core import registry
from merge_core.blocks import architecture
from merge_core.cli import main
from merge_core.demo import small_sd15_state_dicts
from merge_core.engine import merge
from merge_core.errors import MergeError
from merge_core.io import open_model, save_safetensors
from merge_core.registry import Method, Param

from conftest import TO_K, tiny_sd1


def _load(path):
    with open_model(path) as src:
        return {k: src.load(k).clone() for k in src.keys()}, src.metadata


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    sds = small_sd15_state_dicts(3, dtype=torch.float32)
    paths = []
    for i, sd in enumerate(sds):
        paths.append(folder / f"m{i}.safetensors")
        save_safetensors(paths[-1], sd)
    return "sd1", sds, paths


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    sds = small_sd15_state_dicts(3, dtype=torch.float32, arch="sdxl")
    for sd in sds:
        sd.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")
    paths = []
    for i, sd in enumerate(sds):
        paths.append(folder / f"x{i}.safetensors")
        save_safetensors(paths[-1], sd)
    return "sdxl", sds, paths


# ---------------------------------------------------------------- parameters: one check for every front end

BAD_PARAMS = [
    ("karcher", {"karcher_tol": float("nan")}, "--karcher-tol must be in (0, 1], got nan"),
    ("karcher", {"karcher_tol": float("inf")}, "--karcher-tol must be in (0, 1], got inf"),
    ("karcher", {"karcher_iter": -1}, "--karcher-iter must be in [0, 10000]"),
    ("weighted", {"multiplier": float("nan")}, "--multiplier must be in [-10, 10], got nan"),
    ("slerp", {"t": 1.5}, "--t must be in [0, 1], got 1.5"),
    ("ema", {"alpha": 0.0}, "--alpha must be in (0, 1], got 0"),
    ("wma", {"weights": [1, -1, 1]}, "--weights must be >= 0, got -1"),
    ("karcher", {"weights": [1, 2]}, "--weights: 2 values given for 3 models"),
]


@pytest.mark.parametrize("method,params,message", BAD_PARAMS)
def test_bad_parameters_are_refused_up_front_by_the_core(sd15, tmp_path, method, params, message):
    _, _, paths = sd15
    n = {"slerp": 2, "weighted": 2}.get(method, 3)
    with pytest.raises(MergeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        merge(paths[:n], method, params=params, output=tmp_path / "o.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["--method", "karcher", "--karcher-tol", "nan"], "--karcher-tol must be in (0, 1], got nan"),
    (["--method", "karcher", "--karcher-tol", "inf"], "--karcher-tol must be in (0, 1], got inf"),
    (["--method", "weighted", "--multiplier", "nan"], "--multiplier must be in [-10, 10], got nan"),
    (["--method", "sma", "--threads", "-1"], "threads must be a whole number from 1 to 256"),
    (["--method", "sma", "--device", "nonsense"], "unknown device 'nonsense'"),
    (["--method", "sma", "--device", "meta"], "unknown device 'meta'"),
    (["--method", "karcher", "--t", "0.3"], "--t does not apply to karcher"),
    (["--method", "sma", "--weights", "1", "2", "3"], "--weights does not apply to sma"),
    (["--method", "slerpp"], "did you mean slerp"),
])
def test_cli_parameter_errors_are_one_line_and_write_nothing(sd15, tmp_path, capsys, argv, message):
    _, _, paths = sd15
    n = 2 if "weighted" in argv else 3
    rc = main(["merge", "--models", *map(str, paths[:n]), "--output", str(tmp_path / "o.safetensors"), "-q", *argv])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_the_tab_service_uses_the_same_checks():
    from manifold_webui.service import MergeRequest
    req = MergeRequest(method="karcher", models=["a", "b", "c"], karcher_tol=float("nan"))
    with pytest.raises(MergeError, match=r"--karcher-tol must be in \(0, 1\], got nan"):
        req.config()
    req = MergeRequest(method="weighted", models=["a", "b"], multiplier=float("inf"))
    with pytest.raises(MergeError, match="got inf"):
        req.config()
    # only the picked method's parameters reach the engine
    assert MergeRequest(method="slerp", models=["a", "b"], t=0.3).params() == {"t": 0.3}


def test_list_flags_take_spaces_or_commas_and_karcher_honours_weights(sd15, tmp_path):
    _, sds, paths = sd15
    for i, spelling in enumerate((["--alphas", "1", "2", "3"], ["--alphas", "1,2,3"], ["--weights", "1, 2", "3"])):
        out = tmp_path / f"k{i}.safetensors"
        assert main(["merge", "--models", *map(str, paths), "--method", "KARCHER", "--output", str(out), "-q",
                     *spelling]) == 0
        _, meta = _load(out)
        assert json.loads(meta["normalized_weights"]) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-6)


def test_fp8_inputs_and_outputs(tmp_path):
    sds = [tiny_sd1(i, dtype=torch.float32) for i in range(2)]
    sds[1][TO_K][0, 0] = 1000.0  # beyond float8_e4m3fn's 448 after the merge
    paths = []
    for i, sd in enumerate(sds):
        sd8 = {k: (v.to(torch.float8_e5m2) if v.is_floating_point() else v) for k, v in sd.items()}
        paths.append(tmp_path / f"f{i}.safetensors")
        save_safetensors(paths[-1], sd8)
    result = merge(paths, "sma", output=tmp_path / "o.safetensors", dtype="fp8_e4m3fn")
    merged, _ = _load(tmp_path / "o.safetensors")
    assert merged[TO_K].dtype == torch.float8_e4m3fn
    assert torch.isfinite(merged[TO_K].float()).all() and float(merged[TO_K][0, 0].float()) == 448.0
    assert result.summary["saturated"][TO_K] >= 1
    exact = (sds[0][TO_K].to(torch.float8_e5m2).float() + sds[1][TO_K].to(torch.float8_e5m2).float()) / 2
    exact = exact.clamp(-448, 448)
    assert torch.allclose(merged[TO_K].float(), exact.to(torch.float8_e4m3fn).float())


# ---------------------------------------------------------------- adding a method: one registry entry

def test_a_method_defined_only_here_gets_flags_validation_recipe_and_tab_entry(sd15, tmp_path, capsys):
    method = Method(name="test-lerp3", label="Test lerp", help="first + s*(second - first)",
                    params=(Param("s", 0.25, minimum=0.0, maximum=1.0, per_block=True, flags=("--s",),
                                  label="s", help="how far towards the second model"),),
                    min_models=2, max_models=2,
                    coefficients=lambda gram, values, n: [1.0 - values["s"], values["s"]])
    registry.register(method)
    try:
        _, sds, paths = sd15
        out = tmp_path / "t.safetensors"
        assert main(["merge", "--models", *map(str, paths[:2]), "--method", "test-lerp3", "--s", "0.75",
                     "--output", str(out), "-q"]) == 0
        merged, meta = _load(out)
        assert torch.allclose(merged[TO_K], 0.25 * sds[0][TO_K] + 0.75 * sds[1][TO_K], atol=1e-6)
        assert json.loads(meta["manifold_merge_recipe"])["parameters"]["s"] == 0.75
        assert main(["merge", "--models", *map(str, paths[:2]), "--method", "test-lerp3", "--s", "2",
                     "--output", str(tmp_path / "u.safetensors"), "-q"]) == 1
        assert "--s must be in [0, 1], got 2" in capsys.readouterr().err
        from manifold_webui import service
        assert "test-lerp3" in {m.name: m.label for m in registry.all_methods()}
        assert service.MergeRequest(method="test-lerp3", models=["a", "b"]).config().values == {"s": 0.25}
    finally:
        registry.unregister("test-lerp3")


# ---------------------------------------------------------------- block weights for every method

def _expected_per_key(arch_name, method, sds, key, per_block, spec_values, other):
    """The closed-form method with the parameter the block table gives this key."""
    arch = architecture(arch_name)
    xs = [sd[key].double() for sd in sds]
    if method in ("karcher", "wma"):
        weights = [row.get(arch.block(key), d) for row, d in zip(spec_values, other)]
        if method == "wma":
            c = M.wma_coefficients(len(xs), weights)
            return sum(ci * x for ci, x in zip(c, xs))
        return M.karcher_mean_direct(xs, weights, compute_dtype=torch.float64)
    block_value = spec_values.get(arch.block(key))
    value = other if block_value is None else block_value
    if method == "slerp":
        c = M.slerp_coefficients(M.gram_matrix(xs[:2], compute_dtype=torch.float64), value)
        return c[0] * xs[0] + c[1] * xs[1]
    if method == "ema":
        c = M.ema_coefficients(len(xs), value)
        return sum(ci * x for ci, x in zip(c, xs))
    if method == "weighted":
        return (1 - value) * xs[0] + value * xs[1]
    if method == "add-difference":
        return xs[0] + value * (xs[1] - xs[2])
    if method == "train-difference":
        near, diff = (xs[1] - xs[0]).abs(), xs[1] - xs[2]
        return xs[0] + value * 1.8 * torch.nan_to_num(near / (near + diff.abs()), nan=0.0) * diff
    raise AssertionError(method)


@pytest.mark.parametrize("fixture", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", ["karcher", "slerp", "ema", "wma", "weighted", "add-difference",
                                    "train-difference"])
def test_block_weighted_merge_equals_the_per_block_reference(request, tmp_path, fixture, method):
    arch_name, sds, paths = request.getfixturevalue(fixture)
    arch = architecture(arch_name)
    n = {"slerp": 2, "weighted": 2}.get(method, 3)
    sds, paths = sds[:n], paths[:n]
    blocks_list = arch.blocks
    if method in ("karcher", "wma"):
        rows = [{b: 0.2 + 0.6 * ((i + j) % 3) / 2 for j, b in enumerate(blocks_list)} for i in range(n)]
        spec = [", ".join(f"{b}:{v:g}" for b, v in row.items()) for row in rows]
        default = [1.0] * n if method == "karcher" else [float(n - i) for i in range(n)]
        expected_spec, other = rows, default
    else:
        low = 0.1 if method == "ema" else 0.0  # ema's alpha is in (0, 1]
        values = {b: round(low + (1 - low) * j / (len(blocks_list) - 1), 4) for j, b in enumerate(blocks_list)}
        spec = ",".join(f"{values[b]:g}" for b in blocks_list)  # the list form, in the usual order
        other = {"slerp": 0.5, "ema": 0.5}.get(method, 0.5)
        expected_spec = values
    out = tmp_path / "b.safetensors"
    result = merge(paths, method, output=out, blocks=spec, dtype="fp32")
    merged, meta = _load(out)
    recipe = json.loads(meta["manifold_merge_recipe"])
    assert recipe["parameters"]["blocks"] and recipe["parameters"]["block_parameter"]
    assert result.summary["per_key_values"] > 0
    checked = set()
    for key in merged:
        if not sds[0][key].is_floating_point():
            continue
        block = arch.block(key)
        if block in checked and not key.endswith("weight"):
            continue
        checked.add(block)
        exp = _expected_per_key(arch_name, method, sds, key, None, expected_spec, other)
        assert torch.allclose(merged[key].double(), exp.reshape(merged[key].shape), rtol=1e-4, atol=1e-6), key
    assert checked >= set(blocks_list) - {"BASE"} or len(checked) >= len(blocks_list) - 1


def test_named_ranges_and_overrides_reach_the_right_keys(sd15, tmp_path):
    _, sds, paths = sd15
    out = tmp_path / "n.safetensors"
    result = merge(paths[:2], "weighted", output=out, dtype="fp32", multiplier=0.0,
                   blocks="BASE:0, IN00-IN05:0.2, M00:1, OUT*:0.8", overrides=[("attn2", 0.3)])
    merged, meta = _load(out)
    arch = architecture("sd1")
    for key, tensor in merged.items():
        if not sds[0][key].is_floating_point():
            continue
        m = {"BASE": 0.0, "M00": 1.0}.get(arch.block(key))
        if m is None:
            m = 0.2 if arch.block(key) in [f"IN{i:02d}" for i in range(6)] else (
                0.8 if arch.block(key).startswith("OUT") else 0.0)
        if ".attn2." in key:
            m = 0.3
        exp = (1 - m) * sds[0][key].double() + m * sds[1][key].double()
        assert torch.allclose(tensor.double(), exp, atol=1e-6), key
    recipe = json.loads(meta["manifold_merge_recipe"])["parameters"]
    assert recipe["overrides"][0]["pattern"] == "attn2" and recipe["overrides"][0]["keys"] > 0
    assert result.summary["override_matches"]["attn2"] == recipe["overrides"][0]["keys"]


@pytest.mark.parametrize("kw,message", [
    ({"blocks": "BASE:0, IN12:1"}, "IN12"),
    ({"blocks": ",".join(["0.5"] * 25)}, "25"),
    ({"blocks": ",".join(["0.5"] * 20)}, "SDXL"),
    ({"blocks": "BASE:0.5", "overrides": [("no_such_layer", 0.5)]}, "no_such_layer"),
    ({"overrides": [("no_such_layer", 0.5)]}, "no_such_layer"),
    ({"blocks": "BASE:nan"}, "nan"),
])
def test_block_errors_are_clear_and_nothing_is_written(sd15, tmp_path, kw, message):
    _, _, paths = sd15
    calls = []
    with pytest.raises(MergeError, match=message):
        merge(paths[:2], "slerp", output=tmp_path / "e.safetensors", progress=lambda *a: calls.append(a), **kw)
    assert calls == [] and not list(tmp_path.iterdir())


def test_per_model_block_rows_must_match_the_model_count(sd15, tmp_path, capsys):
    _, _, paths = sd15
    rc = main(["merge", "--models", *map(str, paths), "--method", "karcher", "--blocks", "BASE:1", "--blocks",
               "BASE:2", "--output", str(tmp_path / "k.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "2 block rows given for 3 models" in err and not list(tmp_path.iterdir())


def test_blocks_command_lists_blocks_and_presets(capsys):
    assert main(["blocks", "sdxl"]) == 0
    text = capsys.readouterr().out
    assert "IN08" in text and "OUT08" in text and "IN09" not in text

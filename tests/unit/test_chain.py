"""Recipes and chains: one pass through several steps, validation first, embedded recipes that re-run
bit-identically, input hashes checked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge_core import methods as M
from merge_core.chain import load_recipe, run_recipe
from merge_core.cli import main
from merge_core.demo import small_sd15_state_dicts
from merge_core.engine import merge
from merge_core.errors import MergeError
from merge_core.io import open_model, save_safetensors

from conftest import TO_K, TOKENS

ROOT = Path(__file__).resolve().parents[2]


def _load(path):
    with open_model(path) as src:
        return {k: src.load(k).clone() for k in src.keys()}, src.metadata


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain")
    sds = small_sd15_state_dicts(4, dtype=torch.float16)
    paths = {}
    for name, sd in zip(("base", "a", "b", "c"), sds):
        paths[name] = folder / f"{name}.safetensors"
        save_safetensors(paths[name], sd)
    return folder, paths


def _recipe(paths, out, **extra):
    data = {
        "inputs": {k: str(v) for k, v in paths.items()},
        "steps": {
            "k": {"method": "ties", "models": ["a", "b"], "base": "base", "density": 0.3},
            "out": {"method": "slerp", "models": ["k", "c"], "t": 0.3},
        },
        "output": str(out),
        "output_dtype": "fp16",
    }
    data.update(extra)
    return data


def test_two_step_recipe_equals_two_merges_through_a_file(models, tmp_path):
    _, paths = models
    step1 = tmp_path / "k.safetensors"
    merge([paths["a"], paths["b"]], "ties", base=paths["base"], params={"density": 0.3}, output=step1, dtype="fp32")
    separate = tmp_path / "separate.safetensors"
    merge([step1, paths["c"]], "slerp", t=0.3, output=separate, dtype="fp16")
    chained = tmp_path / "chain.safetensors"
    result = run_recipe(_recipe(paths, chained))
    assert result.summary["steps"] == ["k", "out"]
    a, _ = _load(separate)
    b, meta = _load(chained)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    recipe = json.loads(meta["manifold_merge_recipe"])
    assert [s["name"] for s in recipe["steps"]] == ["k", "out"] and recipe["result"] == "out"
    assert recipe["steps"][0]["parameters"]["density"] == 0.3
    assert all(len(i["sha256"]) == 10 and Path(i["path"]).is_absolute() for i in recipe["inputs"])


def test_recipe_file_yaml_relative_paths_and_cli(models, tmp_path):
    folder, paths = models
    recipe_file = folder / "r.yaml"
    recipe_file.write_text(
        "inputs: {a: a.safetensors, b: b.safetensors, c: c.safetensors, base: base.safetensors}\n"
        "steps:\n"
        "  k: {method: karcher, models: [a, b, c], base: base, blocks: ['BASE:1, OUT*:2', 'BASE:1', 'BASE:1'], karcher_iter: 5}\n"
        "  out: {method: weighted, models: [k, a], multiplier: 0.25, overrides: ['attn2=0.5']}\n"
        "output: out_cli.safetensors\n")
    assert main(["merge", "--recipe", str(recipe_file), "-q"]) == 0
    merged, meta = _load(folder / "out_cli.safetensors")
    sds = {k: _load(p)[0] for k, p in paths.items()}
    # by hand: step k (karcher with a base; OUT blocks weigh 2 ... TO_K is an IN key: weights 1, 1, 1)
    d = [sds[m][TO_K].float() - sds["base"][TO_K].float() for m in "abc"]
    k = sds["base"][TO_K].float() + M.karcher_mean(d, max_iter=5)
    expected = 0.5 * k + 0.5 * sds["a"][TO_K].float()  # attn2 override: M = 0.5 for TO_K
    assert torch.allclose(merged[TO_K].float(), expected, atol=2e-3)
    steps = json.loads(meta["manifold_merge_recipe"])["steps"]
    assert steps[0]["parameters"]["blocks"][0]["OUT00"] == 2.0
    assert steps[1]["parameters"]["overrides"][0]["pattern"] == "attn2"


def test_recipe_printed_and_rerun_is_bit_identical(models, tmp_path, capsys):
    _, paths = models
    out = tmp_path / "chain.safetensors"
    run_recipe(_recipe(paths, out))
    capsys.readouterr()
    assert main(["recipe", str(out)]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["output"] == str(out.resolve()) and "steps" in data
    (tmp_path / "again.yaml").write_text(printed)
    again = tmp_path / "again.safetensors"
    assert main(["merge", "--recipe", str(tmp_path / "again.yaml"), "--output", str(again), "-q"]) == 0
    assert out.read_bytes() == again.read_bytes()
    # a merge output is itself a recipe
    third = tmp_path / "third.safetensors"
    run_recipe(out, output=third)
    assert third.read_bytes() == out.read_bytes()


def test_plain_merge_prints_as_a_one_step_recipe_and_reruns_bit_identical(models, tmp_path, capsys):
    _, paths = models
    out = tmp_path / "plain.safetensors"
    assert main(["merge", "--models", str(paths["a"]), str(paths["b"]), "--base", str(paths["base"]),
                 "--method", "dare", "--density", "0.4", "--seed", "7", "--blocks", "BASE:1, IN*:0.5",
                 "--output", str(out), "-q"]) == 0
    capsys.readouterr()
    main(["recipe", str(out), "--output", str(tmp_path / "plain2.safetensors")])
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert "steps" not in data and data["method"] == "dare" and data["parameters"]["seed"] == 7
    assert data["base"]["path"] == str(paths["base"].resolve())
    (tmp_path / "plain.yaml").write_text(printed)
    assert main(["merge", "--recipe", str(tmp_path / "plain.yaml"), "-q"]) == 0
    assert (tmp_path / "plain2.safetensors").read_bytes() == out.read_bytes()


def test_changed_input_hash_is_an_error_naming_the_file(models, tmp_path, capsys):
    folder, paths = models
    own = tmp_path / "own"
    own.mkdir()
    copies = {}
    for k, p in paths.items():
        copies[k] = own / p.name
        copies[k].write_bytes(p.read_bytes())
    out = tmp_path / "h.safetensors"
    run_recipe(_recipe(copies, out))
    sd, _ = _load(copies["c"])
    sd[TO_K] = sd[TO_K] * 2
    copies["c"].unlink()
    save_safetensors(copies["c"], sd)
    with pytest.raises(MergeError, match=r"c\.safetensors: its sha256 .* input 'c'.*--ignore-hashes"):
        run_recipe(out, output=tmp_path / "h2.safetensors")
    assert not (tmp_path / "h2.safetensors").exists()
    assert main(["merge", "--recipe", str(out), "--output", str(tmp_path / "h2.safetensors")]) == 1
    assert "c.safetensors" in capsys.readouterr().err
    assert main(["merge", "--recipe", str(out), "--output", str(tmp_path / "h2.safetensors"),
                 "--ignore-hashes", "-q"]) == 0
    assert "changed since the recipe" in capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    (lambda r: r["steps"]["out"].update(method="slerpp"), "step 'out': unknown method 'slerpp'.*did you mean slerp"),
    (lambda r: r["steps"]["out"].update(t=2), "step 'out': --t must be in \\[0, 1\\], got 2"),
    (lambda r: r["steps"]["out"].update(models=["k", "zz"]), "uses 'zz', which is neither an input nor a step"),
    (lambda r: r["steps"]["k"].update(models=["a", "out"]), "uses 'out', which is a later step"),
    (lambda r: r["steps"]["k"].pop("base"), "ties merges task vectors and needs a base"),
    (lambda r: r["steps"].update(out={"method": "sma", "models": ["k", "c"], "base": "base"}),
     "base model only applies"),
    (lambda r: r["inputs"].update(extra="x.safetensors"), "'extra' is not used by the result"),
    (lambda r: r["steps"]["out"].update(blocks="BASE:0, XX:1"), "step 'out'.*XX"),
    (lambda r: r["steps"]["out"].update(overrides=["nomatch=0.1"]), "step 'out'.*matches no key"),
    (lambda r: r.update(bogus=1), "unknown field 'bogus'"),
])
def test_every_step_is_validated_before_anything_is_written(models, tmp_path, change, message):
    _, paths = models
    out = tmp_path / "bad.safetensors"
    recipe = _recipe(paths, out)
    change(recipe)
    with pytest.raises(MergeError, match=message):
        run_recipe(recipe)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_step_errors_come_before_any_file_is_opened(tmp_path):
    recipe = {"inputs": {"a": str(tmp_path / "missing.safetensors"), "b": str(tmp_path / "missing2.safetensors")},
              "steps": {"s": {"method": "weighted", "models": ["a", "b"], "multiplier": 99}},
              "output": str(tmp_path / "o.safetensors")}
    with pytest.raises(MergeError, match="--multiplier must be in"):
        run_recipe(recipe)


def test_diamond_recipe_in_memory_with_progress(models):
    _, paths = models
    recipe = {
        "inputs": {k: str(v) for k, v in paths.items()},
        "steps": {
            "m": {"method": "sma", "models": ["a", "b"]},
            "x": {"method": "weighted", "models": ["m", "c"], "multiplier": 0.25},
            "y": {"method": "add-difference", "models": ["m", "x", "base"], "multiplier": 0.5},
        },
        "output_dtype": "fp32",
    }
    calls = []
    result = run_recipe(recipe, progress=lambda done, total, key: calls.append((done, total)), in_memory=True)
    sds = {k: _load(p)[0] for k, p in paths.items()}
    for key in (TO_K, TOKENS):
        m = (sds["a"][key].float() + sds["b"][key].float()) / 2
        x = 0.75 * m + 0.25 * sds["c"][key].float()
        y = m + 0.5 * (x - sds["base"][key].float())
        assert torch.allclose(result.state_dict[key], y, atol=1e-6), key
    assert calls[-1][0] == calls[-1][1] == len(result.state_dict)


def test_load_recipe_forms(models, tmp_path):
    _, paths = models
    one = load_recipe({"inputs": [str(paths["a"]), str(paths["b"])], "method": "slerp", "parameters": {"t": 0.2},
                       "base": str(paths["base"])})
    assert one.one_step and [s.name for s in one.steps] == ["merge"]
    assert one.steps[0].models == ["a.safetensors", "b.safetensors"] and one.steps[0].base == "base.safetensors"
    with pytest.raises(MergeError, match="either steps, or method"):
        load_recipe({"inputs": {"a": "a"}, "steps": {"s": {"method": "sma", "models": ["a"]}}, "method": "sma"})


RSS_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from merge_core.engine import merge
from merge_core.chain import run_recipe
mode, d = sys.argv[2], sys.argv[3]
if mode == "step1":
    merge([d + "/a.safetensors", d + "/b.safetensors"], "ties", base=d + "/base.safetensors", params={"density": 0.3},
          output=d + "/k.safetensors", dtype="fp32", threads=1, hash_inputs=False, overwrite=True)
elif mode == "step2":
    merge([d + "/k.safetensors", d + "/c.safetensors"], "slerp", t=0.3, output=d + "/s.safetensors", dtype="fp16",
          threads=1, hash_inputs=False, overwrite=True)
else:
    run_recipe({"inputs": {n: d + f"/{n}.safetensors" for n in ("a", "b", "c", "base")},
                "steps": {"k": {"method": "ties", "models": ["a", "b"], "base": "base", "density": 0.3},
                          "out": {"method": "slerp", "models": ["k", "c"], "t": 0.3}},
                "output_dtype": "fp16"}, output=d + "/chain.safetensors", threads=1, hash_inputs=False, overwrite=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_chain_peak_rss_is_within_one_tensor_set_of_the_larger_step(tmp_path):
    numel = 4 << 20  # 16 MB per fp32 tensor
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(2048, 2048, generator=g).half() for i in range(6)}
    for name in ("base", "a", "b", "c"):
        sd = base if name == "base" else {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).half()
                                          for k, v in base.items()}
        save_safetensors(tmp_path / f"{name}.safetensors", sd)

    def rss(mode):
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(ROOT), mode, str(tmp_path)], check=True,
                             capture_output=True, text=True).stdout.split()[-1]
        return int(out)
    step1, step2, chain = rss("step1"), rss("step2"), rss("chain")
    tensor_set = 5 * numel * 4  # one fp32 tensor per input (4) and the output
    assert chain <= max(step1, step2) + tensor_set, (step1, step2, chain)
    a, _ = _load(tmp_path / "s.safetensors")
    b, _ = _load(tmp_path / "chain.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

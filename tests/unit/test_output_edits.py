"""Bake in a VAE, discard weights, drop EMA weights, refuse LoRAs, create missing output folders, and the
CLI's one-line answers to typos."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_core.cli import main
from merge_core.demo import small_sd15_state_dicts
from merge_core.engine import merge
from merge_core.errors import BadCheckpoint, MergeError
from merge_core.io import open_model, save_safetensors

ROOT = Path(__file__).resolve().parents[2]
VAE = "first_stage_model."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edits")
    sds = small_sd15_state_dicts(2, dtype=torch.float32)
    sds[0]["model_ema.decay"] = torch.tensor(0.9999)
    sds[0]["model_ema.diffusion_modelinput_blocks00weight"] = torch.ones(3)
    paths = []
    for i, sd in enumerate(sds):
        paths.append(folder / f"m{i}.safetensors")
        save_safetensors(paths[-1], sd)
    vae = {k[len(VAE):]: torch.full_like(v, 0.25) for k, v in sds[0].items() if k.startswith(VAE)}
    save_safetensors(folder / "vae.safetensors", vae)
    return folder, sds, paths


def _load(path):
    with open_model(path) as src:
        return {k: src.load(k).clone() for k in src.keys()}


def test_bake_vae_discard_and_drop_ema_through_the_cli(models, tmp_path, capsys):
    folder, sds, paths = models
    out = tmp_path / "o.safetensors"
    assert main(["merge", "--models", *map(str, paths), "--method", "weighted", "-m", "0.25", "--vae",
                 str(folder / "vae.safetensors"), "--discard", r"attn1\.to_q", "--drop-ema", "--dtype", "fp32",
                 "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "baked in the VAE vae.safetensors (248 tensors)" in text and "dropped 2 EMA weights" in text
    merged = _load(out)
    assert not any(k.startswith("model_ema.") for k in merged)
    assert not any("attn1.to_q" in k for k in merged)
    assert sum("attn1.to_q" in k for k in sds[0]) == 16
    for key, value in merged.items():
        if key.startswith(VAE):
            assert torch.equal(value, torch.full_like(value, 0.25)), key
        elif value.is_floating_point():
            assert torch.allclose(value, 0.75 * sds[0][key] + 0.25 * sds[1][key], atol=1e-6), key


@pytest.mark.parametrize("kw,message", [
    ({"discard": "(unclosed"}, "not a valid regular expression"),
    ({"discard": "no_such_key"}, "matches no key"),
    ({"discard": "."}, "every key was discarded"),
])
def test_bad_edits_are_refused_before_anything_is_written(models, tmp_path, kw, message):
    _, _, paths = models
    with pytest.raises(MergeError, match=message):
        merge(paths, "sma", output=tmp_path / "new" / "o.safetensors", **kw)
    assert list(tmp_path.iterdir()) == []


def test_a_vae_of_another_architecture_is_refused(models, tmp_path):
    folder, _, paths = models
    save_safetensors(tmp_path / "not_vae.safetensors", {"decoder.conv_in.weight": torch.zeros(2, 2)})
    with pytest.raises(BadCheckpoint, match="not a VAE"):
        merge(paths, "sma", output=tmp_path / "o.safetensors", vae=tmp_path / "not_vae.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("kind,keys", [
    ("LoRA", {"lora_unet_a.lora_down.weight": (4, 8), "lora_unet_a.lora_up.weight": (8, 4), "lora_unet_a.alpha": ()}),
    ("LoCon", {"lora_unet_b.lora_down.weight": (4, 8, 3, 3), "lora_unet_b.lora_up.weight": (8, 4, 1, 1)}),
    ("LoRA", {"unet.x.lora_A.weight": (4, 8), "unet.x.lora_B.weight": (8, 4)}),
])
def test_a_lora_is_never_merged_as_a_checkpoint_even_with_force(models, tmp_path, capsys, kind, keys):
    _, _, paths = models
    lora = tmp_path / "style.safetensors"
    save_safetensors(lora, {k: torch.zeros(s) for k, s in keys.items()})
    rc = main(["merge", "--models", str(paths[0]), str(lora), "--method", "sma", "--force",
               "--output", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and f"style.safetensors: is a {kind}" in err and "not a checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


def test_missing_output_folders_are_created_and_taken_back_on_failure(models, tmp_path):
    _, sds, paths = models
    out = tmp_path / "new" / "deeper" / "o.safetensors"
    merge(paths, "sma", output=out)
    assert out.is_file()

    def cancel(done, total, key):
        return False
    failed = tmp_path / "other" / "deep" / "o.safetensors"
    with pytest.raises(MergeError):
        merge(paths, "sma", output=failed, progress=cancel)
    assert not (tmp_path / "other").exists()  # the folders this run made are gone again
    folder_out = tmp_path / "x" / "sharded"
    merge(paths, "sma", output=folder_out)
    assert (folder_out / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,expected", [
    (["merge", "--models", "a", "b", "--output", "o", "--aplha", "0.3"], "did you mean --alpha?"),
    (["mrege"], "did you mean merge?"),
    (["merge", "--models", "a", "b", "--output", "o", "--dtype", "fp61"], "did you mean fp16?"),
])
def test_typos_get_one_short_line_with_a_suggestion(argv, expected):
    proc = subprocess.run([sys.executable, "-m", "merge_core", *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and expected in proc.stderr
    assert proc.stderr.count("\n") == 1 and "usage:" not in proc.stderr


def test_help_shows_no_none_defaults():
    for argv in (["--help"], ["merge", "--help"], ["hyper", "--help"], ["blocks", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "merge_core", *argv], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0 and "default: None" not in proc.stdout, argv


def test_inspect_says_what_a_lora_is_and_shows_a_merges_blocks(models, tmp_path, capsys):
    from merge_core.hyper.pipeline import HyperConfig, run_hyper
    _, _, paths = models
    plain = []
    for i, sd in enumerate(small_sd15_state_dicts(2, dtype=torch.float32)):
        plain.append(tmp_path / f"m{i}.safetensors")
        save_safetensors(plain[-1], sd)
    hyper = run_hyper(HyperConfig(models=plain, name="ins", out_dir=tmp_path, ranks=[2], iterations=1))
    assert main(["inspect", str(hyper.lora_paths[0]), "--no-hash"]) == 0
    text = capsys.readouterr().out
    assert "LoRA (not a checkpoint)" in text and "rank 2, for sd_v1" in text and "unknown architecture" not in text
    assert "strength for m0:" in text and "strength for m1:" in text
    out = tmp_path / "b.safetensors"
    merge(paths, "weighted", output=out, blocks="BASE:0, M00:1", overrides=[("attn2", 0.3)])
    assert main(["inspect", str(out), "--no-hash"]) == 0
    text = capsys.readouterr().out
    assert "blocks: multiplier = BASE:0, M00:1" in text and "override     : attn2 = 0.3 (" in text

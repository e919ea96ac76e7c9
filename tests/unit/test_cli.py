"""The command line as a user runs it: exit codes, one-line errors, nothing written on failure."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from merge_core.io import open_model, save_safetensors

from conftest import TO_K, tiny_sd1

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MANIFOLD_MERGE_CACHE=str(Path(cwd or ROOT) / ".cache-test"))
    return subprocess.run([sys.executable, "-m", "merge_core", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_merge_from_a_folder_in_natural_order(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    sds = {}
    for name, seed in [("m10", 0), ("m2", 1), ("m1", 2)]:
        sds[name] = tiny_sd1(seed)
        save_safetensors(folder / f"{name}.safetensors", sds[name])
    out = tmp_path / "out.safetensors"
    proc = run_cli("merge", "--models", folder, "--method", "ema", "--alpha", "0.5", "--output", out,
                   "--dtype", "fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1. m1.safetensors" in proc.stdout and "3. m10.safetensors" in proc.stdout
    with open_model(out) as src:
        got = src.load(TO_K)
    # EMA over m1, m2, m10: weights 0.25, 0.25, 0.5
    expected = 0.25 * sds["m1"][TO_K].float() + 0.25 * sds["m2"][TO_K].float() + 0.5 * sds["m10"][TO_K].float()
    assert torch.allclose(got, expected, atol=1e-6)


def test_bad_input_gives_one_line_error_and_writes_nothing(tmp_path):
    good = tmp_path / "good.safetensors"
    save_safetensors(good, tiny_sd1(0))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[:-100])
    out = tmp_path / "out.safetensors"
    proc = run_cli("merge", "--models", good, broken, "--method", "sma", "--output", out, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.safetensors: truncated" in lines[0]
    assert not out.exists()
    proc = run_cli("merge", "--models", good, tmp_path / "missing.safetensors", "--output", out, cwd=tmp_path)
    assert proc.returncode == 1 and "missing.safetensors: file not found" in proc.stderr
    proc = run_cli("merge", "--models", good, good, "--method", "slerp", "--t", "2", "--output", out, cwd=tmp_path)
    assert proc.returncode == 1 and "t must be in [0, 1]" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["broken.safetensors",
                                                                                         "good.safetensors"]


def test_inspect_and_demo(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tiny_sd1(0), {"note": "hello"})
    proc = run_cli("inspect", path, cwd=tmp_path)
    assert proc.returncode == 0 and "SD1.x" in proc.stdout and "meta note: hello" in proc.stdout
    proc = run_cli("demo", "--dir", tmp_path / "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "every method ran" in proc.stdout
    assert len(list((tmp_path / "demo").glob("merged_*.safetensors"))) == 9
    assert (tmp_path / "demo" / "demo_multipliers.txt").read_text().count("<lora:demo_") == 6

"""Real-host check of SD3/Flux hyper sets against ComfyUI's own key map and LoRA code.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout; COMFYUI_PYTHON is the python of an environment
that runs it (default: this one). The small SD3/Flux checkpoints (every key of the real layouts, widths
shrunk: tests/unit/test_lora_sd3_flux.py) have DiTs that agree with a small ComfyUI config; the helper
(comfyui_lora_sd3_flux_check.py) builds ComfyUI's own model and text-encoder objects for that config,
checks our keys and shapes against them, maps our LoRA modules with ComfyUI's key map and applies them
with ComfyUI's LoRA code at one model's strengths.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
ROOT = Path(__file__).resolve().parents[1]


def _fixtures():
    spec = importlib.util.spec_from_file_location("lora_sd3_flux_fixtures", ROOT / "unit" / "test_lora_sd3_flux.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch,count", [("flux", 4), ("sd3", 3)])
def test_comfyui_maps_every_module_and_reproduces_hyper_plus_lora(tmp_path, arch, count):
    from merge_core.hyper.pipeline import HyperConfig, run_hyper
    from merge_core.io import open_model
    from merge_core.lora.format import read_lora
    from merge_core.lora.keys import lora_modules

    fx = _fixtures()
    paths, _, modules = fx.write_models(tmp_path / "models", arch, count, directions=2, rank=2, noise=1e-3)
    result = run_hyper(HyperConfig(models=paths, name=arch, out_dir=tmp_path, ranks=[4, 2], iterations=2,
                                   dtype="float16", floor=False, threads=1))
    target = paths[1].name.rsplit(".", 1)[0]
    strengths = result.lambdas[target]
    patched_path = tmp_path / "patched.safetensors"
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable),
                           str(Path(__file__).with_name("comfyui_lora_sd3_flux_check.py")), COMFYUI_DIR, arch,
                           json.dumps(fx.SMALL_CONFIGS[arch]), json.dumps(fx.SMALL_TE_CONFIGS), str(result.hyper_path),
                           json.dumps(strengths), str(patched_path), *map(str, result.lora_paths)],
                          capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    out = json.loads(lines[0][7:])
    assert out["model_class"] == {"flux": "Flux", "sd3": "SD3"}[arch]
    # our small DiT is ComfyUI's model for that config, key for key and shape for shape; the text encoders'
    # keys (renamed by ComfyUI's own code) are those of ComfyUI's CLIP/T5 classes, with their shapes, except:
    # ComfyUI's CLIP class always has 49408 tokens (ours are shrunk) and a text_projection (Flux checkpoints
    # carry none for CLIP-L); neither is a LoRA module
    assert out["dit_missing"] == out["dit_extra"] == out["dit_shape_mismatch"] == [], out
    clips = {"flux": ["clip_l"], "sd3": ["clip_g", "clip_l"]}[arch]
    assert out["te_missing"] == (["clip_l.transformer.text_projection.weight"] if arch == "flux" else []), out
    assert out["te_shape_mismatch"] == [f"{c}.transformer.text_model.embeddings.token_embedding.weight"
                                        for c in clips], out
    # every module of every LoRA file is in ComfyUI's LoRA key map and patches one weight of the model
    assert out["modules"] == len(modules) == {"flux": 554, "sd3": 676}[arch]
    assert out["n_unknown"] == 0, out["unknown"]
    assert out["not_plain"] == []
    assert len(out["patched"]) == out["patched_in_model"] == len(modules)

    # ComfyUI's patched weights == hyper + sum_k lambda_k * (up @ down * alpha / rank), computed here
    loras = [read_lora(p)[0] for p in result.lora_paths]
    worst, least_moved = 0.0, float("inf")
    with open_model(result.hyper_path) as hyper, open_model(patched_path) as patched:
        by_key = {m.key: m for m in lora_modules(hyper.specs(), arch)}
        assert set(out["patched"].values()) == set(by_key)
        for comfy_key, key in out["patched"].items():
            module = by_key[key]
            base = hyper.load(key).float().reshape(module.out_features, -1)
            expected = base
            for lora, s in zip(loras, strengths):
                up, down, scale = lora[module.name]
                expected = expected + (up @ down) * scale * s
            got = patched.load(comfy_key).float().reshape(module.out_features, -1)
            worst = max(worst, float((got - expected).norm() / expected.norm()))
            least_moved = min(least_moved, float((got - base).norm() / base.norm()))
    assert worst < 1e-3, worst
    assert least_moved > 1e-2, least_moved    # every weight really is patched (the LoRAs are not ~0)
    print(f"{arch}: {len(modules)} modules, worst relative difference {worst:.2e}, "
          f"smallest patch {least_moved:.3f} of the weight")

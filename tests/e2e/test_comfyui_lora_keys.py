"""Real-host check of the LoRA files against ComfyUI's own key map and LoRA code.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout; COMFYUI_PYTHON is the python of an environment
that runs it (default: this one). Uses two full-size SD1.5-layout checkpoints (built once into
_bench_data/, ~2 GB each), because the LoRA names follow the real SD1.5 block structure.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
ROOT = Path(__file__).resolve().parents[2]


def test_comfyui_recognises_every_module_and_reproduces_hyper_plus_lora(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.fixtures import ensure_models
    from merge_core.hyper.pipeline import HyperConfig, run_hyper
    from merge_core.io import open_model
    from merge_core.lora.format import read_lora

    models = ensure_models("sd15", 3)
    result = run_hyper(HyperConfig(models=models, name="e2e", out_dir=tmp_path, ranks=[4, 2], iterations=1,
                                   dtype="float16", floor=False))
    target = models[1].name.rsplit(".", 1)[0]
    strengths = result.lambdas[target]
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(Path(__file__).with_name(
        "comfyui_lora_check.py")), COMFYUI_DIR, str(result.hyper_path), json.dumps(strengths),
        *map(str, result.lora_paths)], capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    out = json.loads(lines[0][7:])
    assert out["model_class"] == "BaseModel"           # ComfyUI detected SD1.5
    assert out["modules"] == 350 and out["n_unknown"] == 0, out["unknown"]
    # ComfyUI's patched weights == hyper + sum_k lambda_k * (up @ down * alpha / rank), our own way
    loras = [read_lora(p)[0] for p in result.lora_paths]
    from merge_core.lora.keys import lora_modules
    with open_model(result.hyper_path) as hyper:
        by_key = {m.key: m for m in lora_modules(hyper.specs())}
        for key, values in out["weights"].items():
            module = by_key[key]
            expected = hyper.load(key).float().reshape(module.out_features, -1)
            for lora, s in zip(loras, strengths):
                up, down, scale = lora[module.name]
                expected = expected + (up @ down) * scale * s
            got = torch.tensor(values)
            assert torch.allclose(got, expected.flatten()[:got.numel()], atol=2e-3, rtol=1e-2), key

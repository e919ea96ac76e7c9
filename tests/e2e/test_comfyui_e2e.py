"""The node pack in a real ComfyUI: server started headless on 127.0.0.1, graphs queued over HTTP.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout; COMFYUI_PYTHON is the python of an environment
that runs it (torch + torchvision + ComfyUI's requirements). See docs/comfyui.md.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_server import get_json, post_json, serve  # tests/e2e is on sys.path under pytest
import torch

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
ROOT = Path(__file__).resolve().parents[2]
NODES = ["ManifoldMergeKarcherModel", "ManifoldMergeKarcherClip", "ManifoldMergeSlerpModel", "ManifoldMergeSlerpClip",
         "ManifoldMergeMovingAverageModel", "ManifoldMergeMovingAverageClip", "ManifoldMergeCheckpoints",
         "ManifoldMergeHyperMerge", "ManifoldMergeHyperLoraLoader", "ManifoldMergeExtractLora",
         "ManifoldMergeBlockWeights", "ManifoldMergeWeightedSumModel", "ManifoldMergeAddDifferenceClip",
         "ManifoldMergeEMAModel", "ManifoldMergeWMAClip"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("checkpoints", "loras", "custom_nodes", "output"):
        (base / sub).mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "manifold_merge")
    proc = subprocess.run([python, str(Path(__file__).with_name("comfyui_fixtures.py")), COMFYUI_DIR,
                           str(ROOT / "merge_core" / "data" / "layouts" / "sd15.json"), str(base / "checkpoints"), "3"],
                          capture_output=True, text=True, timeout=600)
    assert "RESULT ok" in proc.stdout, proc.stderr[-3000:]
    (base / "paths.yaml").write_text(f"e2e:\n  base_path: {base}\n  checkpoints: checkpoints\n  loras: loras\n"
                                     f"  custom_nodes: custom_nodes\n")
    with serve(base, ()) as url:
        yield url, base


def _run(url, base, graph, timeout=600, expect="success"):
    res = post_json(url + "/prompt", {"prompt": graph, "client_id": "e2e"})
    assert not res.get("node_errors"), res
    pid = res["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = get_json(f"{url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            status = hist[pid]["status"]
            assert status.get("status_str") == expect, json.dumps(status)[-3000:] + \
                (base / "comfyui.log").read_text()[-3000:]
            return hist[pid]
        time.sleep(0.5)
    raise TimeoutError(pid)


def _loaders(n):
    return {f"L{i}": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"tiny_sd15_{i}.safetensors"}}
            for i in range(n)}


def _saved(base, prefix):
    from safetensors.torch import load_file
    files = sorted((base / "output").glob(f"{prefix}_*.safetensors"))
    assert files, f"nothing saved for {prefix}"
    return load_file(files[-1])


def _ours(base, method, n, **kw):
    from merge_core.engine import merge
    paths = [base / "checkpoints" / f"tiny_sd15_{i}.safetensors" for i in range(n)]
    return merge(paths, method, dtype="fp32", **kw).state_dict


def _compare_unet(saved, ours, stored_as=torch.float32):
    """`stored_as`: the dtype the merged weights passed through (the file merger keeps the inputs' fp16)."""
    keys = [k for k in saved if k.startswith("model.diffusion_model.")]
    assert len(keys) > 100
    for k in keys:
        assert torch.allclose(saved[k].float(), ours[k].to(stored_as).float(), atol=1e-5, rtol=1e-4), k


def test_every_node_is_registered(comfy):
    url, _ = comfy
    info = get_json(url + "/object_info")
    missing = [n for n in NODES if n not in info]
    assert not missing, missing
    assert info["ManifoldMergeKarcherModel"]["category"] == "Manifold Merge"
    for name, node in info.items():  # every merge node takes block weights
        if name.startswith("ManifoldMerge") and name.endswith(("Model", "Clip", "Checkpoints")):
            assert node["input"]["optional"]["block_weights"][0] == "BLOCK_WEIGHTS", name
    assert info["ManifoldMergeBlockWeights"]["output"] == ["BLOCK_WEIGHTS"]


def _cli(base, method, n, name, *args):
    """The same merge through the command line (python -m merge_core merge), in float32."""
    from safetensors.torch import load_file
    out = base / f"cli_{name}.safetensors"
    paths = [str(base / "checkpoints" / f"tiny_sd15_{i}.safetensors") for i in range(n)]
    proc = subprocess.run([sys.executable, "-m", "merge_core", "merge", "--models", *paths, "--method", method,
                           "--output", str(out), "--dtype", "fp32", "--no-hash", "--quiet", "--overwrite", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


BLOCKS = "BASE:0.2, IN00-IN01:0.9, M00:0.1, OUT*:0.6, TE:0.8"


def test_block_weights_node_feeds_slerp_and_karcher_like_the_cli(comfy):
    """Block weights -> SLERP (MODEL and CLIP) and Karcher (one row per model): the same tensors as the CLI
    given the same blocks; ComfyUI's MODEL (diffusion_model.) and CLIP (clip_l.) keys land in their blocks."""
    url, base = comfy
    bw = "ManifoldMergeBlockWeights"
    graph = {**_loaders(3),
             "B": {"class_type": bw, "inputs": {"architecture": "sd1", "preset": "none", "text": BLOCKS,
                                                "overrides": "attn2=0.05"}},
             "BC": {"class_type": bw, "inputs": {"architecture": "sd1", "preset": "none", "text": BLOCKS,
                                                 "overrides": ""}},
             "BK": {"class_type": bw, "inputs": {"architecture": "sd1", "preset": "grad_in_out",
                                                 "text": "model1: IN*:3, BASE:1\nmodel2: OUT*:2\nM00:0.5"}},
             "T": {"class_type": "ManifoldMergeSlerpModel",
                   "inputs": {"model_a": ["L0", 0], "model_b": ["L1", 0], "t": 0.3, "block_weights": ["B", 0]}},
             "TC": {"class_type": "ManifoldMergeSlerpClip",
                    "inputs": {"clip_a": ["L0", 1], "clip_b": ["L1", 1], "t": 0.3, "block_weights": ["BC", 0]}},
             "K": {"class_type": "ManifoldMergeKarcherModel",
                   "inputs": {"model1": ["L0", 0], "weight1": 1.0, "model2": ["L1", 0], "weight2": 2.0,
                              "model3": ["L2", 0], "weight3": 1.0, "iterations": 10, "tolerance": 1e-5,
                              "block_weights": ["BK", 0]}},
             "S1": {"class_type": "ModelSave", "inputs": {"model": ["T", 0], "filename_prefix": "e2e/bslerp"}},
             "S2": {"class_type": "CLIPSave", "inputs": {"clip": ["TC", 0], "filename_prefix": "e2e/bclip"}},
             "S3": {"class_type": "ModelSave", "inputs": {"model": ["K", 0], "filename_prefix": "e2e/bkarcher"}}}
    _run(url, base, graph)
    slerp_cli = _cli(base, "slerp", 2, "slerp", "--t", "0.3", "--blocks", BLOCKS, "--override", "attn2=0.05")
    plain = _ours(base, "slerp", 2, t=0.3)
    _compare_unet(_saved(base, "e2e/bslerp"), slerp_cli)
    differs = [k for k in slerp_cli if k.startswith("model.diffusion_model.")
               and not torch.allclose(slerp_cli[k], plain[k], atol=1e-6)]
    assert len(differs) > 100  # the blocks changed (nearly) every key
    rows = ["grad_in_out, M00:0.5, IN*:3, BASE:1", "grad_in_out, M00:0.5, OUT*:2", "grad_in_out, M00:0.5"]
    karcher_cli = _cli(base, "karcher", 3, "karcher", "--weights", "1", "2", "1",
                       *[a for row in rows for a in ("--blocks", row)])
    _compare_unet(_saved(base, "e2e/bkarcher"), karcher_cli)
    clip = _saved(base, "e2e/bclip")  # CLIPSave strips "clip_l." and "transformer."
    te_only = _ours(base, "slerp", 2, t=0.8)  # every CLIP key is in TE (0.8)
    for k in ("text_model.encoder.layers.11.mlp.fc2.weight", "text_model.final_layer_norm.weight"):
        ckpt_key = "cond_stage_model.transformer." + k
        assert torch.allclose(clip[k].float(), slerp_cli[ckpt_key].to(clip[k].dtype).float(), atol=1e-3), k
        assert torch.allclose(slerp_cli[ckpt_key], te_only[ckpt_key].float(), atol=1e-5), k
        assert not torch.allclose(slerp_cli[ckpt_key], plain[ckpt_key].float(), atol=1e-4), k


def test_block_weights_on_the_checkpoint_merger_and_errors_in_node_words(comfy):
    url, base = comfy
    graph = {"B": {"class_type": "ManifoldMergeBlockWeights",
                   "inputs": {"architecture": "sd1", "preset": "none", "text": "OUT*:0.9, TE:0.1, M00:0"}},
             "M": {"class_type": "ManifoldMergeCheckpoints",
                   "inputs": {"ckpt_1": "tiny_sd15_0.safetensors", "ckpt_2": "tiny_sd15_1.safetensors",
                              "method": "weighted", "weights": "", "t": 0.5, "alpha": 0.5, "multiplier": 0.4,
                              "save_as": "", "block_weights": ["B", 0]}},
             "S": {"class_type": "ModelSave", "inputs": {"model": ["M", 0], "filename_prefix": "e2e/bweighted"}}}
    _run(url, base, graph)
    ours = _cli(base, "weighted", 2, "weighted", "--multiplier", "0.4", "--blocks", "OUT*:0.9, TE:0.1, M00:0")
    _compare_unet(_saved(base, "e2e/bweighted"), ours, stored_as=torch.float16)
    bad = {**_loaders(2),
           "B": {"class_type": "ManifoldMergeBlockWeights",
                 "inputs": {"architecture": "sdxl", "preset": "flat", "text": ""}},
           "T": {"class_type": "ManifoldMergeSlerpModel",
                 "inputs": {"model_a": ["L0", 0], "model_b": ["L1", 0], "t": 0.3, "block_weights": ["B", 0]}},
           "S": {"class_type": "ModelSave", "inputs": {"model": ["T", 0], "filename_prefix": "e2e/never"}}}
    hist = _run(url, base, bad, expect="error")
    messages = json.dumps(hist["status"].get("messages", []))
    assert "block weights are for SDXL, but the connected models are SD1.x" in messages and "--" not in messages
    assert not list((base / "output").glob("e2e/never*"))


def test_karcher_node_matches_merge_core(comfy):
    url, base = comfy
    graph = {**_loaders(3),
             "K": {"class_type": "ManifoldMergeKarcherModel",
                   "inputs": {"model1": ["L0", 0], "weight1": 1.0, "model2": ["L1", 0], "weight2": 2.0,
                              "model3": ["L2", 0], "weight3": 1.0, "iterations": 10, "tolerance": 1e-5}},
             "S": {"class_type": "ModelSave", "inputs": {"model": ["K", 0], "filename_prefix": "e2e/karcher"}}}
    _run(url, base, graph)
    _compare_unet(_saved(base, "e2e/karcher"), _ours(base, "karcher", 3, weights=[1, 2, 1]))


def test_slerp_and_moving_average_nodes_match_merge_core(comfy):
    url, base = comfy
    graph = {**_loaders(3),
             "T": {"class_type": "ManifoldMergeSlerpModel", "inputs": {"model_a": ["L0", 0], "model_b": ["L1", 0], "t": 0.3}},
             "S1": {"class_type": "ModelSave", "inputs": {"model": ["T", 0], "filename_prefix": "e2e/slerp"}},
             "E": {"class_type": "ManifoldMergeMovingAverageModel",
                   "inputs": {"method": "ema", "model1": ["L0", 0], "model2": ["L1", 0], "model3": ["L2", 0],
                              "alpha": 0.4, "weights": ""}},
             "S2": {"class_type": "ModelSave", "inputs": {"model": ["E", 0], "filename_prefix": "e2e/ema"}}}
    _run(url, base, graph)
    paths_ab = 2
    _compare_unet(_saved(base, "e2e/slerp"), _ours(base, "slerp", paths_ab, t=0.3))
    _compare_unet(_saved(base, "e2e/ema"), _ours(base, "ema", 3, alpha=0.4))


def test_clip_karcher_and_checkpoint_merger(comfy):
    url, base = comfy
    graph = {**_loaders(2),
             "C": {"class_type": "ManifoldMergeKarcherClip",
                   "inputs": {"clip1": ["L0", 1], "weight1": 1.0, "clip2": ["L1", 1], "weight2": 1.0,
                              "iterations": 10, "tolerance": 1e-5}},
             "CS": {"class_type": "CLIPSave", "inputs": {"clip": ["C", 0], "filename_prefix": "e2e/clip"}},
             "M": {"class_type": "ManifoldMergeCheckpoints",
                   "inputs": {"ckpt_1": "tiny_sd15_0.safetensors", "ckpt_2": "tiny_sd15_1.safetensors",
                              "method": "sma", "weights": "", "t": 0.5, "alpha": 0.5, "multiplier": 0.5,
                              "save_as": "e2e_sma"}},
             "S": {"class_type": "ModelSave", "inputs": {"model": ["M", 0], "filename_prefix": "e2e/ckpt_sma"}}}
    _run(url, base, graph)
    ours = _ours(base, "sma", 2)
    _compare_unet(_saved(base, "e2e/ckpt_sma"), ours, stored_as=torch.float16)
    from safetensors.torch import load_file
    written = load_file(base / "checkpoints" / "e2e_sma.safetensors")
    for k, v in written.items():
        if v.is_floating_point():
            assert torch.allclose(v.float(), ours[k].to(v.dtype).float()), k
    assert len(_saved(base, "e2e/clip")) > 100


def test_bad_input_is_a_clear_node_error_and_writes_nothing(comfy):
    url, base = comfy
    before = sorted(p.name for p in (base / "checkpoints").iterdir())
    graph = {"M": {"class_type": "ManifoldMergeCheckpoints",
                   "inputs": {"ckpt_1": "tiny_sd15_0.safetensors", "ckpt_2": "tiny_sd15_1.safetensors",
                              "method": "sma", "weights": "", "t": 0.5, "alpha": 0.5, "multiplier": 0.5,
                              "save_as": "../escape"}},
             "S": {"class_type": "ModelSave", "inputs": {"model": ["M", 0], "filename_prefix": "e2e/never"}}}
    hist = _run(url, base, graph, expect="error")
    messages = json.dumps(hist["status"].get("messages", []))
    assert "path separators" in messages
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == before
    assert not (base / "escape.safetensors").exists()


def test_hyper_merge_node_then_loader_node_rebuild_a_model(comfy):
    """Hyper-merge node writes the set; the loader node applies one model's strengths with ComfyUI's LoRA
    code; the result equals hyper + sum_k lambda_k * LoRA_k computed our own way, with no unknown key."""
    url, base = comfy
    from merge_core.lora.format import read_lora
    from merge_core.lora.keys import lora_modules
    from merge_core.io import open_model
    graph = {"H": {"class_type": "ManifoldMergeHyperMerge",
                   "inputs": {"ckpt_1": "tiny_sd15_0.safetensors", "ckpt_2": "tiny_sd15_1.safetensors",
                              "ckpt_3": "tiny_sd15_2.safetensors", "ranks": "4,2", "iterations": 4,
                              "name": "e2ehyper", "dtype": "float32"}}}
    hist = _run(url, base, graph)
    assert "tiny_sd15_1: <lora:e2ehyper_0-4:" in json.dumps(hist["outputs"])
    lora_dir = Path(COMFYUI_DIR) / "models" / "loras"
    lora_files = [lora_dir / "e2ehyper_0-4.safetensors", lora_dir / "e2ehyper_1-2.safetensors"]
    try:
        graph = {"L": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "e2ehyper_hyper.safetensors"}},
                 "R": {"class_type": "ManifoldMergeHyperLoraLoader",
                       "inputs": {"model": ["L", 0], "clip": ["L", 1], "hyper_set": "e2ehyper",
                                  "source_model": "tiny_sd15_1", "manual_strengths": ""}},
                 "S": {"class_type": "ModelSave", "inputs": {"model": ["R", 0], "filename_prefix": "e2e/rebuilt"}}}
        _run(url, base, graph)
        saved = _saved(base, "e2e/rebuilt")
        loras = [read_lora(p) for p in lora_files]
        with open_model(base / "checkpoints" / "e2ehyper_hyper.safetensors") as hyper:
            modules = [m for m in lora_modules(hyper.specs()) if m.key.startswith("model.diffusion_model.")]
            assert len(modules) > 20
            for m in modules:
                expected = hyper.load(m.key).float().reshape(m.out_features, -1)
                for factors, meta in loras:
                    up, down, scale = factors[m.name]
                    lam = json.loads(meta["manifold_hyper_lambdas"])["tiny_sd15_1"]
                    expected = expected + (up @ down) * scale * lam
                got = saved[m.key].float().reshape(m.out_features, -1)
                assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), m.name
        assert "lora key not loaded" not in (base / "comfyui.log").read_text()
    finally:
        ckpts = base / "checkpoints"
        for path in lora_files + [ckpts / "e2ehyper_multipliers.txt", ckpts / "e2ehyper_report.json"]:
            path.unlink(missing_ok=True)


def test_extract_lora_node_matches_the_file_based_extraction(comfy):
    url, base = comfy
    from safetensors.torch import load_file

    from merge_core.lora.extract import extract_lora
    graph = {**_loaders(2),
             "X": {"class_type": "ManifoldMergeExtractLora",
                   "inputs": {"model": ["L1", 0], "base_model": ["L0", 0], "clip": ["L1", 1], "base_clip": ["L0", 1],
                              "rank": 4, "conv_rank": 2, "filename": "e2e_extract"}}}
    target = Path(COMFYUI_DIR) / "models" / "loras" / "e2e_extract.safetensors"
    try:
        hist = _run(url, base, graph)
        assert "wrote e2e_extract.safetensors" in json.dumps(hist["outputs"])
        ours = base / "ours_extract.safetensors"
        extract_lora(base / "checkpoints" / "tiny_sd15_0.safetensors", base / "checkpoints" / "tiny_sd15_1.safetensors",
                     ours, rank=4, conv_rank=2, overwrite=True)
        node_sd, our_sd = load_file(target), load_file(ours)
        assert set(node_sd) == set(our_sd) and len(our_sd) > 60
        for k in our_sd:
            if k.endswith(".lora_up.weight"):
                name = k[:-len(".lora_up.weight")]
                a = node_sd[k].float().flatten(1) @ node_sd[name + ".lora_down.weight"].float().flatten(1)
                b = our_sd[k].float().flatten(1) @ our_sd[name + ".lora_down.weight"].float().flatten(1)
                assert torch.allclose(a, b, atol=1e-4, rtol=1e-2), name
    finally:
        target.unlink(missing_ok=True)

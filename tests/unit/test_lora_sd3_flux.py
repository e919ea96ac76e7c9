"""SD3 and Flux: LoRA module names and counts, hyper-merge, projection and extraction on small checkpoints.

The small models have every key of the real SD3 / Flux checkpoint layouts (merge_core/data/layouts) with
the widths shrunk so that the DiT agrees with a small ComfyUI model config (SMALL_CONFIGS): the real-ComfyUI
tier (tests/e2e/test_comfyui_lora_sd3_flux.py) builds ComfyUI's own model from that config and checks our
checkpoints' DiT keys and shapes against it.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_core.blocks import architecture
from merge_core.errors import MergeError
from merge_core.hyper.pipeline import HyperConfig, run_hyper
from merge_core.hyper.project import project_model
from merge_core.io import open_model
from merge_core.lora.extract import extract_lora
from merge_core.lora.format import read_lora
from merge_core.lora.keys import lora_modules

LAYOUTS = Path(__file__).resolve().parents[2] / "merge_core" / "data" / "layouts"

# Full-size widths -> small ones. Text encoders: every width >= 64 scaled by small/full (77 positions kept).
TE_WIDTHS = {"clip_l": (768, 32), "clip_g": (1280, 48), "t5xxl": (4096, 32)}
# The DiT: multiples of the hidden size scale with it; the context (T5) and pooled (CLIP) inputs follow the
# small text encoders; Flux's head dim 128 -> 16 (2 heads of 16); SD3's 192x192 positions -> 8x8.
DIT = {
    "flux": {"hidden": (3072, 32), "special": {4096: 32, 768: 32, 128: 16}},
    "sd3": {"hidden": (1536, 64), "special": {4096: 32, 2048: 32 + 48, 36864: 64}},
}
# ComfyUI configs with exactly these shapes (ComfyUI's MMDiT fixes hidden = 64 * depth and heads = depth:
# depth 1 with 24 joint blocks; its Flux takes hidden_size / num_heads / axes_dim as given).
SMALL_CONFIGS = {
    "flux": {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
             "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 19, "depth_single_blocks": 38,
             "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True},
    "sd3": {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 1, "num_blocks": 24,
            "adm_in_channels": 80, "input_size": None, "pos_embed_max_size": 8, "num_patches": 64,
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 32, "out_features": 64}}},
}
# the text encoders' small configs, for ComfyUI's own CLIPTextModel / T5 classes
SMALL_TE_CONFIGS = {
    "clip_l": {"num_hidden_layers": 12, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 128,
               "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 2058,
               "eos_token_id": 2, "projection_dim": 32},
    "clip_g": {"num_hidden_layers": 32, "hidden_size": 48, "num_attention_heads": 2, "intermediate_size": 192,
               "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 1852,
               "eos_token_id": 2, "projection_dim": 48},
    "t5xxl": {"num_layers": 24, "d_model": 32, "d_kv": 16, "num_heads": 2, "d_ff": 80,
              "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5", "vocab_size": 251},
}


def layout(arch: str) -> list[dict]:
    return json.loads((LAYOUTS / f"{arch}.json").read_text())["tensors"]


def small_shape(arch: str, tensor: dict) -> tuple[int, ...]:
    shape, component = tensor["shape"], tensor["component"]
    if component == "diffuser":
        full, small = DIT[arch]["hidden"]
        special = DIT[arch]["special"]
        return tuple(special[d] if d in special else d // full * small if d >= full and d % full == 0 else d
                     for d in shape)
    if component in TE_WIDTHS:
        full, small = TE_WIDTHS[component]
        return tuple(d if d < 64 or d == 77 else max(2, d * small // full) for d in shape)
    return tuple(d if d < 64 else max(2, d // 64) for d in shape)   # the VAE: not covered, kept tiny


def small_base(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {t["key"]: torch.randn(small_shape(arch, t), generator=gen) * 0.05 for t in layout(arch)}


def write_models(folder: Path, arch: str, count: int, directions: int = 2, rank: int = 2, noise: float = 0.0,
                 seed: int = 0, dtype=torch.float16, lambdas=None) -> tuple[list[Path], dict, list]:
    """`count` models = one base + sum_k lambda[m, k] * D_k, D_k of rank `rank` in every covered module
    (+ optional noise everywhere); the keys LoRAs do not cover differ by a little noise only."""
    base = small_base(arch, seed)
    modules = lora_modules({k: tuple(v.shape) for k, v in base.items()}, arch)
    gen = torch.Generator().manual_seed(seed + 1)
    dirs = []
    for _ in range(directions):
        d = {}
        for mod in modules:
            r = min(rank, *mod.shape)
            u = torch.randn(mod.out_features, r, generator=gen)
            v = torch.randn(r, mod.in_features, generator=gen)
            d[mod.key] = (u @ v) * (0.02 / math.sqrt(r))
        dirs.append(d)
    if lambdas is None:
        lambdas = torch.randn(count, directions, generator=gen).tolist()
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for m in range(count):
        sd = {}
        for key, value in base.items():
            w = value.clone()
            if key in dirs[0]:
                for k, d in enumerate(dirs):
                    w += lambdas[m][k] * d[key].reshape(w.shape)
            if noise:
                w += noise * torch.randn(w.shape, generator=gen)
            sd[key] = w.to(dtype)
        path = folder / f"{arch}_{m}.safetensors"
        save_file(sd, str(path))
        paths.append(path)
    return paths, base, modules


# ---------------------------------------------------------------------------------------------
# names and counts (the full-size layouts)

def _specs(arch):
    return {t["key"]: tuple(t["shape"]) for t in layout(arch)}


def _count_by_block(mods):
    counts = {}
    for m in mods:
        counts[m.block] = counts.get(m.block, 0) + 1
    return counts


def test_flux_modules_names_and_counts_per_block():
    mods = lora_modules(_specs("flux"))
    by_name = {m.name: m for m in mods}
    assert len(by_name) == len(mods) == 554
    counts = _count_by_block(mods)
    # per double block: img/txt attn qkv + proj, mlp.0 + mlp.2, mod.lin; per single block: linear1, linear2,
    # modulation.lin; IN: img_in, txt_in and the three embedders' two linears; OUT: linear + adaLN
    assert {b: counts[b] for b in ("D00", "D18", "S00", "S37", "IN", "OUT", "text_encoder", "t5")} == \
        {"D00": 10, "D18": 10, "S00": 3, "S37": 3, "IN": 8, "OUT": 2, "text_encoder": 72, "t5": 168}
    assert len(counts) == 19 + 38 + 2 + 2
    expected = {
        "lora_unet_double_blocks_0_img_attn_qkv": ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                                   (9216, 3072)),
        "lora_unet_double_blocks_18_txt_mod_lin": ("model.diffusion_model.double_blocks.18.txt_mod.lin.weight",
                                                   (18432, 3072)),
        "lora_unet_single_blocks_37_linear1": ("model.diffusion_model.single_blocks.37.linear1.weight",
                                               (21504, 3072)),
        "lora_unet_final_layer_adaLN_modulation_1":
            ("model.diffusion_model.final_layer.adaLN_modulation.1.weight", (6144, 3072)),
        "lora_unet_guidance_in_in_layer": ("model.diffusion_model.guidance_in.in_layer.weight", (3072, 256)),
        "lora_te1_text_model_encoder_layers_11_mlp_fc2":
            ("text_encoders.clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight", (768, 3072)),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q":
            ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", (4096, 4096)),
        "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1":
            ("text_encoders.t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wi_1.weight", (10240, 4096)),
    }
    for name, (key, shape) in expected.items():
        assert (by_name[name].key, by_name[name].shape, by_name[name].row_start) == (key, shape, None), name
    # no norms, biases, embeddings, relative attention bias, VAE
    assert not any(s in m.key for m in mods for s in ("norm", ".bias", "shared", "relative_attention", "vae.",
                                                        "embeddings"))


def test_sd3_modules_names_and_counts_per_block():
    mods = lora_modules(_specs("sd3"))
    by_name = {m.name: m for m in mods}
    assert len(by_name) == len(mods) == 676
    counts = _count_by_block(mods)
    # the last joint block's context stream is pre-only: adaLN + qkv only (7 modules instead of 10)
    assert {b: counts[b] for b in ("J00", "J22", "J23", "IN", "OUT", "text_encoder_1", "text_encoder_2", "t5")} \
        == {"J00": 10, "J22": 10, "J23": 7, "IN": 5, "OUT": 2, "text_encoder_1": 72, "text_encoder_2": 192,
            "t5": 168}
    assert by_name["lora_unet_joint_blocks_0_x_block_attn_qkv"].key == \
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    assert by_name["lora_unet_joint_blocks_23_context_block_attn_qkv"].shape == (4608, 1536)
    assert "lora_unet_joint_blocks_23_context_block_mlp_fc1" not in by_name
    assert by_name["lora_te2_text_model_encoder_layers_31_self_attn_q_proj"].key == \
        "text_encoders.clip_g.transformer.text_model.encoder.layers.31.self_attn.q_proj.weight"
    assert by_name["lora_te1_text_model_encoder_layers_0_self_attn_out_proj"].key.startswith("text_encoders.clip_l.")
    assert by_name["lora_te3_encoder_block_5_layer_1_DenseReluDense_wo"].shape == (4096, 10240)
    # the 4-D patchify conv, pos_embed and the text projections are not covered
    assert not any("x_embedder" in m.key or "pos_embed" in m.key or "text_projection" in m.key for m in mods)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_lora_names_fall_in_the_blocks_of_the_keys_they_cover(arch):
    """The block-weight data maps each LoRA name to the block of the checkpoint key it covers."""
    blocks = architecture(arch)
    for m in lora_modules(_specs(arch)):
        assert blocks.chain(m.name, "lora") == blocks.chain(m.key, "checkpoint"), m.name


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_transformer_only_files_get_the_same_names(arch):
    specs = _specs(arch)
    full = [(m.name, m.shape) for m in lora_modules(specs) if m.name.startswith("lora_unet_")]
    for prefix in ("diffusion_model.", ""):
        dit = {prefix + k[len("model.diffusion_model."):]: v for k, v in specs.items()
               if k.startswith("model.diffusion_model.")}
        assert [(m.name, m.shape) for m in lora_modules(dit)] == full


def test_other_architectures_are_a_clear_error():
    with pytest.raises(MergeError, match="supports SD1.x, SD2.x, SDXL, SD3 and Flux checkpoints, not unknown"):
        lora_modules({"some.weight": (4, 4)})


# ---------------------------------------------------------------------------------------------
# hyper-merge, projection, extraction on small checkpoints

def _reconstruction_errors(result, model_paths, arch):
    """Per model, recomputed from the files: |W - (hyper + sum_k lambda_k up_k @ down_k * scale_k)|^2 over
    |W - hyper|^2, over the covered modules."""
    loras = [read_lora(p) for p in result.lora_paths]
    errors = {}
    with open_model(result.hyper_path) as hyper:
        modules = lora_modules(hyper.specs(), arch)
        assert all({m.name for m in modules} == set(lora) for lora, _ in loras)
        hyper_w = {m.key: hyper.load(m.key).float().reshape(m.out_features, -1).clone() for m in modules}
    for path in model_paths:
        stem = path.name.rsplit(".", 1)[0]
        lam = result.lambdas[stem]
        err = tot = 0.0
        with open_model(path) as src:
            for m in modules:
                w = src.load(m.key).float().reshape(m.out_features, -1)
                approx = hyper_w[m.key].clone()
                for (lora, _), s in zip(loras, lam):
                    up, down, scale = lora[m.name]
                    approx += (up @ down) * scale * s
                err += float(((w - approx).double() ** 2).sum())
                tot += float(((w - hyper_w[m.key]).double() ** 2).sum())
        errors[stem] = err / tot
    return errors, loras


@pytest.mark.parametrize("arch,count,dtype", [("flux", 4, "float16"), ("sd3", 3, "float32")])
def test_hyper_merge_projection_and_extraction(tmp_path, arch, count, dtype):
    paths, base, modules = write_models(tmp_path / "models", arch, count, directions=2, rank=2, noise=1e-3)
    result = run_hyper(HyperConfig(models=paths, name=arch, out_dir=tmp_path / "out", ranks=[4, 4],
                                   iterations=3, dtype=dtype, floor=False, threads=1))
    report = result.report
    assert report["architecture"] == arch and report["covered_modules"] == len(modules) == \
        {"flux": 554, "sd3": 676}[arch]
    errors, loras = _reconstruction_errors(result, paths, arch)
    for lora, meta in loras:
        assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "sd3"}[arch]
        assert len(lora) == len(modules)
    for row in report["per_model"]:
        recomputed = errors[row["model"]]
        # two directions of rank 2 per layer under noise 1e-3 (std 0.02-ish signal): the LoRAs take nearly all
        assert row["relative_error_covered"] < 0.05
        tol = 1e-4 if dtype == "float32" else 2e-3     # fp16 LoRA factors round
        assert abs(recomputed - row["relative_error_covered"]) < tol, (row["model"], recomputed, row)
        assert set(row["per_block"]) == {m.block for m in modules}

    # projection of a model outside the set: its strengths and error, recomputed from the files
    new_paths, _, _ = write_models(tmp_path / "new", arch, 1, directions=2, rank=2, noise=1e-3,
                                   lambdas=[[0.7, -1.2]])
    projected = project_model(tmp_path / "out" / arch, new_paths[0], threads=1)
    result.lambdas[new_paths[0].name.rsplit(".", 1)[0]] = projected["lambdas"]
    err, _ = _reconstruction_errors(result, new_paths, arch)
    assert projected["relative_error"] < 0.05
    assert abs(err[new_paths[0].name.rsplit(".", 1)[0]] - projected["relative_error"]) < 2e-3


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_extraction_of_an_exactly_low_rank_difference(tmp_path, arch):
    paths, base, modules = write_models(tmp_path, arch, 2, directions=1, rank=3, dtype=torch.float32,
                                        lambdas=[[0.0], [1.0]])
    out = extract_lora(paths[0], paths[1], tmp_path / "x.safetensors", rank=3, dtype="float32")
    assert out["relative_error"] < 1e-6 and out["modules"] == len(modules)   # float32 rounding
    lora, meta = read_lora(tmp_path / "x.safetensors")
    assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "sd3"}[arch]
    assert set(lora) == {m.name for m in modules}
    worst = 0.0
    with open_model(paths[0]) as a, open_model(paths[1]) as b:
        for m in modules:
            delta = b.load(m.key).float() - a.load(m.key).float()
            up, down, scale = lora[m.name]
            worst = max(worst, float((up @ down * scale - delta).norm() / delta.norm()))
    assert worst < 1e-4


def test_mixed_architectures_are_one_line_errors(tmp_path):
    flux, _, _ = write_models(tmp_path / "f", "flux", 2, directions=1)
    sd3, _, _ = write_models(tmp_path / "s", "sd3", 1, directions=1)
    with pytest.raises(MergeError, match="cannot merge different architectures") as err:
        run_hyper(HyperConfig(models=[flux[0], sd3[0]], name="x", out_dir=tmp_path / "o", ranks=[2]))
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()
    with pytest.raises(MergeError, match="cannot merge different architectures"):
        extract_lora(flux[0], sd3[0], tmp_path / "x.safetensors", rank=2)
    # a transformer-only Flux file lacks the text encoders of a full one: named, in one line
    dit_only = tmp_path / "dit.safetensors"
    with open_model(flux[1]) as src:
        save_file({k: src.load(k).clone() for k in src.keys() if k.startswith("model.diffusion_model.")},
                  str(dit_only))
    with pytest.raises(MergeError, match=r"dit.safetensors: has no 'text_encoders\.") as err:
        run_hyper(HyperConfig(models=[flux[0], dit_only], name="y", out_dir=tmp_path / "o2", ranks=[2]))
    assert "\n" not in str(err.value)

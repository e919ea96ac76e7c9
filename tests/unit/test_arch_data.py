"""Architectures as data: detection, partial-merge rules and host renames read data/architectures/*.json."""
import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from merge_core.arch import DATA_DIR, UNET_PREFIXES, detect_architecture, detect_from_names, partial_rules
from merge_core.blocks import architecture, architecture_for_keys
from merge_core.engine import merge
from merge_core.errors import MergeError
from merge_core.naming import plan_renames, rename, rename_specs, rename_state_dict
from merge_core.plan import PARTIAL_MERGE_RULES, partial_rule

SHARED = Path("/work/shared/layouts")
LAYOUTS = SHARED if SHARED.is_dir() else Path(__file__).resolve().parents[2] / "merge_core" / "data" / "layouts"
ARCH_OF = {"sd15": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _layout(name):
    data = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {t["key"]: tuple(t["shape"]) for t in data["tensors"]}


def _components(name):
    data = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {t["key"]: t["component"] for t in data["tensors"]}


def _sd2_layout():
    """SD2 checkpoint names: the SD1 UNet with 1024-wide cross-attention, an OpenCLIP text encoder under
    cond_stage_model.model. (the names of SDXL's OpenCLIP, re-prefixed), the VAE."""
    specs = {}
    for key, shape in _layout("sdxl").items():
        if key.startswith("conditioner.embedders.1."):
            specs["cond_stage_model." + key[len("conditioner.embedders.1."):]] = shape
    for key, shape in _layout("sd15").items():
        if not key.startswith("cond_stage_model."):
            specs[key] = (shape[0], 1024) if key.endswith("attn2.to_k.weight") else shape
    return specs


def _kohya(specs, arch):
    """kohya-style LoRA module names for every matrix / conv of the UNet and the text encoders."""
    arch = architecture(arch)
    names = []
    for key, shape in specs.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        for comp in arch.components.values():
            prefix = comp.get("checkpoint_prefix")
            head = "lora_unet_" if comp["layout"] == "diffuser" else comp.get("lora_prefix")
            if head and key.startswith(prefix):
                names.append(head + key[len(prefix):-len(".weight")].replace(".", "_") + ".lora_down.weight")
                break
    return names


# --- detection in every naming ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(ARCH_OF))
def test_full_layouts_are_detected_in_every_naming(layout):
    expected = ARCH_OF[layout]
    specs = _layout(layout)
    assert detect_architecture(specs) == expected  # checkpoint
    comfy = rename_specs(specs, expected, "checkpoint", "comfy", unknown="drop")
    model = {k: v for k, v in comfy.items() if k.startswith("diffusion_model.")}
    clip = {k: v for k, v in comfy.items() if not k.startswith("diffusion_model.")}
    assert len(model) == sum(k.startswith("model.diffusion_model.") for k in specs) > 100
    assert detect_architecture(model) == expected  # a ComfyUI MODEL
    bare = {k[len("diffusion_model."):]: v for k, v in model.items()}
    assert detect_architecture(bare) == expected  # a bare UNet/DiT (BFL's flux1-dev.safetensors)
    assert architecture_for_keys(list(model)) == expected  # names only: markers (SD1: input_blocks)
    assert architecture_for_keys(clip) == expected  # a ComfyUI CLIP, with shapes
    assert architecture_for_keys(list(clip)) == expected  # and names only
    assert architecture_for_keys(_kohya(specs, expected)) == expected  # a kohya LoRA


def test_sd2_in_every_naming():
    specs = _sd2_layout()
    assert detect_architecture(specs) == "sd2"
    comfy = rename_specs(specs, "sd2", "checkpoint", "comfy", unknown="drop")
    clip = {k: v for k, v in comfy.items() if k.startswith("clip_h.")}
    assert clip["clip_h.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"] == (1280, 1280)
    assert architecture_for_keys(clip) == "sd2" and architecture_for_keys(list(clip)) == "sd2"
    model = {k: v for k, v in comfy.items() if k.startswith("diffusion_model.")}
    assert detect_architecture(model) == "sd2"
    te_only = {k: v for k, v in specs.items() if k.startswith("cond_stage_model.")}
    assert detect_architecture(te_only) == "sd2"
    assert detect_architecture({k: v for k, v in _layout("sd15").items() if k.startswith("cond_stage_model.")}) == "sd1"


def test_text_encoder_and_lora_heads_pick_the_architecture_with_the_fewest_encoders():
    assert detect_from_names(["t5xxl.transformer.encoder.final_layer_norm.weight"]) == "flux"
    assert detect_from_names(["clip_g.transformer.text_model.final_layer_norm.weight"]) == "sdxl"
    assert detect_from_names(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
                              "lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha"]) == "flux"
    assert detect_from_names(["lora_te2_x.alpha", "lora_te3_y.alpha"]) == "sd3"
    assert detect_from_names(["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]) == "sd1"
    assert detect_from_names(["lora_unet_joint_blocks_3_x_block_attn_qkv.alpha"]) == "sd3"
    assert detect_from_names(["lora_unet_add_embedding_linear_1.alpha", "lora_unet_down_blocks_1_x.alpha"]) == "sdxl"
    assert detect_from_names(["foo.weight", "lora_unet_x.alpha"]) == "unknown"


def test_a_signature_key_of_an_unknown_shape_is_an_unknown_model():
    specs = _layout("sd15")
    specs["model.diffusion_model." + TO_K] = (320, 2048)
    assert detect_architecture(specs) == "unknown"
    specs["model.diffusion_model." + TO_K] = (320,)  # another rank: not this signature, the TE decides
    assert detect_architecture(specs) == "sd1"


def test_unet_prefixes_come_from_the_hosts():
    assert UNET_PREFIXES == ("model.diffusion_model.", "diffusion_model.", "")


# --- a new architecture is data only ----------------------------------------------------------------------

NEW_ARCH = {
    "name": "sd9", "display": "SD9",
    "detect": {"order": 5, "signatures": [{"unet_key": "foo_blocks.0.attn.weight", "shape": [None, 42]}],
               "text_encoder_prefixes": ["text_encoders.clip_x."], "markers": ["foo_blocks"]},
    "partial": [{"key": "foo_in.weight", "dim": 1, "what": "foo input channels"}],
    "components": {"unet": {"layout": "diffuser", "checkpoint_prefix": "model.diffusion_model.",
                            "comfy_prefix": "diffusion_model."},
                   "text_encoder": {"layout": "clip_x", "name": "TE", "checkpoint_prefix": "text_encoders.clip_x.",
                                    "comfy_prefix": "clip_x.", "lora_prefix": "lora_te9_"}},
    "hosts": {"checkpoint": [["model.diffusion_model.", "unet"], ["text_encoders.clip_x.", "TE"]],
              "comfy_model": [["diffusion_model.", "unet"]], "comfy_clip": [["clip_x.", "TE"]],
              "unet": [["", "unet"]]},
}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "architectures"
    shutil.copytree(DATA_DIR, folder)
    (folder / "sd9.json").write_text(json.dumps(NEW_ARCH))
    return folder


def test_a_new_architecture_file_is_detected_without_code_changes(data_dir):
    sig = "foo_blocks.0.attn.weight"
    for prefix in ("model.diffusion_model.", "diffusion_model.", ""):
        specs = {prefix + sig: (8, 42), prefix + "foo_in.weight": (8, 4)}
        assert detect_architecture(specs, data_dir) == "sd9"
        assert detect_architecture(specs) == "unknown"  # merge_core's own data knows no SD9
    assert detect_architecture({sig: (8, 41)}, data_dir) == "unknown"
    assert detect_architecture({"text_encoders.clip_x.w": (3,)}, data_dir) == "sd9"
    assert architecture_for_keys(["lora_unet_foo_blocks_0_attn.alpha"], data_dir) == "sd9"
    assert architecture_for_keys(["clip_x.transformer.w"], data_dir) == "sd9"
    assert architecture_for_keys(["lora_te9_w.alpha"], data_dir) == "sd9"
    assert architecture_for_keys(["clip_x.transformer.w"]) == "unknown"
    for layout, expected in ARCH_OF.items():  # the others are unchanged by the new file
        assert detect_architecture(_layout(layout), data_dir) == expected
    assert ("foo_in.weight", 1, None, "foo input channels") in partial_rules(data_dir)
    assert all(rule[0] != "foo_in.weight" for rule in partial_rules())


@pytest.mark.parametrize("content,message", [
    ("{not json", r"sd9\.json: not readable JSON"),
    (json.dumps({**NEW_ARCH, "name": "other"}), r"sd9\.json: expected an object whose \"name\" is 'sd9'"),
    (json.dumps({**NEW_ARCH, "detect": {"signatures": [{"shape": [1]}]}}), r"sd9\.json: a detect signature needs"),
    (json.dumps({**NEW_ARCH, "detect": {"signatures": [{"prefix": "x.", "unet_key": "y"}]}}), r"needs one of"),
    (json.dumps({**NEW_ARCH, "detect": {"signatures": [{"unet_key": "y", "shape": "768"}]}}), r"not a list of sizes"),
    (json.dumps({**NEW_ARCH, "detect": {"order": "first"}}), r"sd9\.json: detect \"order\" must be a number"),
    (json.dumps({**NEW_ARCH, "detect": {"markers": "foo_blocks"}}), r"sd9\.json: 'markers' must be a list"),
    (json.dumps({**NEW_ARCH, "hosts": {"unet": [""]}}), r"sd9\.json: \"hosts\" must map each naming"),
    (json.dumps({**NEW_ARCH, "components": {"unet": "x"}}), r"sd9\.json: \"components\" must map"),
])
def test_a_bad_architecture_file_is_a_one_line_error_naming_it(data_dir, content, message):
    (data_dir / "sd9.json").write_text(content)
    with pytest.raises(MergeError, match=message) as err:
        detect_architecture({"x": (1,)}, data_dir)
    assert "\n" not in str(err.value)


def test_a_bad_partial_entry_is_a_one_line_error(data_dir):
    (data_dir / "sd9.json").write_text(json.dumps({**NEW_ARCH, "partial": [{"key": "w", "dim": "1"}]}))
    with pytest.raises(MergeError, match=r"sd9\.json: a \"partial\" entry needs a \"key\" and a \"dim\""):
        partial_rules(data_dir)


# --- partial-merge rules from the data --------------------------------------------------------------------

def test_partial_rules_are_the_datas_and_name_real_layout_keys():
    sd_rules = [r for r in PARTIAL_MERGE_RULES if r.group != "vocab"]
    assert [(r.pattern.pattern, r.dim, r.what) for r in sd_rules] == [
        (r"(^|\.)input_blocks\.0\.0\.weight$", 1, "inpainting conv_in"),
        (r"(^|\.)token_embedding\.weight$", 0, "text-encoder token embedding")]
    for layout, arch in ARCH_OF.items():
        keys = list(_layout(layout))
        entries = json.loads((DATA_DIR / f"{arch}.json").read_text())["partial"]
        for entry in entries:
            hits = [k for k in keys if k == entry["key"] or k.endswith("." + entry["key"])]
            assert hits, (arch, entry)
            assert all(partial_rule(k).dim == entry["dim"] for k in hits)
    sdxl_tokens = [k for k in _layout("sdxl") if partial_rule(k) is not None and partial_rule(k).dim == 0]
    assert sorted(sdxl_tokens) == ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                                   "conditioner.embedders.1.model.token_embedding.weight"]  # HF and OpenCLIP
    assert partial_rule("model.diffusion_model.input_blocks.0.0.bias") is None
    t5 = partial_rule("text_encoders.t5xxl.transformer.shared.weight")  # T5: the language models' rule
    assert t5.dim == 0 and t5.group == "vocab"


def test_an_sdxl_inpainting_conv_in_and_a_longer_openclip_vocabulary_merge_on_the_common_part():
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    tokens = "conditioner.embedders.1.model.token_embedding.weight"
    g = torch.Generator().manual_seed(3)

    def model(channels, vocab):
        return {conv: torch.randn(8, channels, 3, 3, generator=g), tokens: torch.randn(vocab, 6, generator=g),
                "model.diffusion_model.label_emb.0.0.weight": torch.randn(8, 12, generator=g)}

    plain, inpaint = model(4, 10), model(9, 13)
    out = merge([plain, inpaint], "sma").state_dict
    assert out[conv].shape == (8, 9, 3, 3) and out[tokens].shape == (13, 6)
    assert torch.allclose(out[conv][:, :4], (plain[conv] + inpaint[conv][:, :4]) / 2)
    assert torch.equal(out[conv][:, 4:], inpaint[conv][:, 4:])
    assert torch.allclose(out[tokens][:10], (plain[tokens] + inpaint[tokens][:10]) / 2)
    assert torch.equal(out[tokens][10:], inpaint[tokens][10:])


# --- renames between hosts --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(ARCH_OF) + ["sd2"])
def test_checkpoint_and_comfyui_names_round_trip_for_the_unet_and_text_encoders(layout):
    arch = ARCH_OF.get(layout, layout)
    specs = _sd2_layout() if layout == "sd2" else _layout(layout)
    comfy = rename_specs(specs, arch, "checkpoint", "comfy", unknown="drop")
    back = rename_specs(comfy, arch, "comfy", "checkpoint")
    lost = set(specs) - set(back)
    assert all(k.startswith(("first_stage_model.", "vae.", "model.model_sampling")) for k in lost)
    assert {k: specs[k] for k in back} == back
    assert not lost & {k for k in specs if k.startswith(("model.diffusion_model.", "cond_stage_model.",
                                                          "conditioner.", "text_encoders."))}
    heads = {k.split(".", 1)[0] + "." for k in comfy}
    expected = {"diffusion_model."} | {c["comfy_prefix"] for c in architecture(arch).components.values()
                                       if c.get("comfy_prefix") and c["layout"] != "diffuser"}
    assert heads == expected


@pytest.mark.parametrize("arch,comfy,checkpoint", [
    ("sd1", "diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
    ("sd1", "clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
     "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias"),
    ("sdxl", "clip_l.transformer.text_model.final_layer_norm.weight",
     "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"),
    ("sdxl", "clip_g.transformer.text_model.encoder.layers.31.mlp.fc1.weight",
     "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"),
    ("sdxl", "clip_g.transformer.text_model.embeddings.position_embedding.weight",
     "conditioner.embedders.1.model.positional_embedding"),
    ("sd2", "clip_h.transformer.text_model.encoder.layers.3.layer_norm2.bias",
     "cond_stage_model.model.transformer.resblocks.3.ln_2.bias"),
    ("sd3", "clip_g.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight",
     "text_encoders.clip_g.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"),
    ("sd3", "t5xxl.transformer.shared.weight", "text_encoders.t5xxl.transformer.shared.weight"),
    ("flux", "diffusion_model.double_blocks.0.img_attn.qkv.weight",
     "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"),
])
def test_rename_one_key(arch, comfy, checkpoint):
    assert rename(comfy, arch, "comfy") == checkpoint
    assert rename(checkpoint, arch, "checkpoint", "comfy_clip") == comfy


def test_openclip_qkv_are_fused_in_q_k_v_order_and_the_projection_transposed():
    layer = "clip_g.transformer.text_model.encoder.layers.0.self_attn."
    sd = {layer + f"{x}_proj.{p}": torch.full((4, 3) if p == "weight" else (4,), float(i))
          for i, x in enumerate("qkv") for p in ("weight", "bias")}
    sd["clip_g.transformer.text_projection.weight"] = torch.arange(6.).reshape(2, 3)
    sd["clip_g.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out = rename_state_dict(sd, "sdxl", "comfy_clip", "checkpoint")
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_"
    assert set(out) == {fused + "weight", fused + "bias", "conditioner.embedders.1.model.text_projection"}
    assert torch.equal(out[fused + "weight"][:, 0], torch.tensor([0.] * 4 + [1.] * 4 + [2.] * 4))
    assert torch.equal(out[fused + "bias"], torch.tensor([0.] * 4 + [1.] * 4 + [2.] * 4))
    assert torch.equal(out["conditioner.embedders.1.model.text_projection"], torch.arange(6.).reshape(2, 3).t())
    back = rename_state_dict(out, "sdxl", "checkpoint", "comfy")
    assert set(back) == set(sd) - {"clip_g.transformer.text_model.embeddings.position_ids"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    assert rename(layer + "k_proj.weight", "sdxl", "comfy") == fused + "weight"
    with pytest.raises(MergeError, match=r"in_proj_weight: becomes three keys"):
        rename(fused + "weight", "sdxl", "checkpoint", "comfy")


@pytest.mark.parametrize("keys,kw,message", [
    (["first_stage_model.decoder.conv_in.weight"], {"from_kind": "checkpoint", "to_kind": "comfy"},
     r"^first_stage_model\.decoder\.conv_in\.weight: no SDXL component has this key under both checkpoint"),
    (["clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"], {"from_kind": "comfy"},
     r"self_attn\.q_proj\.weight: its attention has no k/v projection"),
    (["clip_g.transformer.text_model.encoder.layers.0.self_attn.foo.weight"], {"from_kind": "comfy"},
     r"self_attn\.foo\.weight: SDXL text_encoder_2 has no openclip name"),
    (["x"], {"from_kind": "onnx"}, r"unknown key naming 'onnx'"),
])
def test_rename_errors_are_one_line_and_name_the_key(keys, kw, message):
    with pytest.raises(MergeError, match=message) as err:
        plan_renames(keys, "sdxl", **kw)
    assert "\n" not in str(err.value)


def test_unknown_keys_can_be_kept_or_dropped():
    keys = ["first_stage_model.decoder.conv_in.weight", "model.diffusion_model.out.2.bias"]
    assert [r.target for r in plan_renames(keys, "sd1", "checkpoint", "comfy", unknown="drop")] == \
        ["diffusion_model.out.2.bias"]
    assert [r.target for r in plan_renames(keys, "sd1", "checkpoint", "comfy", unknown="keep")] == \
        ["first_stage_model.decoder.conv_in.weight", "diffusion_model.out.2.bias"]


def _code_strings(path):
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_module_keeps_a_second_copy_of_the_prefix_tables():
    root = Path(__file__).resolve().parents[2]
    literal = re.compile(r"^(?:conditioner\.embedders\.|cond_stage_model\.|clip_[lgh]\.|t5xxl\.|lora_te\d?_|"
                         r"joint_blocks|double_blocks|single_blocks|label_emb|input_blocks)")
    for rel in ("merge_core/arch.py", "merge_core/blocks.py", "merge_core/plan.py", "merge_core/naming.py",
                "nodes/block_nodes.py", "nodes/lora_nodes.py", "nodes/merge_nodes.py"):
        hits = [s for s in _code_strings(root / rel) if literal.search(s)]
        assert not hits, (rel, hits)

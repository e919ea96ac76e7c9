import json
import math
from collections import Counter
from pathlib import Path

import pytest

from merge_core.arch import display_name
from merge_core.blocks import (PRESETS, SUPPORTED, Architecture, BlockSpecError, BlockValues, architecture,
                               architecture_for_keys, describe, load_block_file, match_overrides, parse_block_values,
                               parse_override, preset)
from merge_core.data import build_layout_blocks
from merge_core.errors import MergeError
from merge_core.lora.keys import lora_modules

LAYOUTS = Path(__file__).resolve().parents[2] / "merge_core" / "data" / "layouts"
ARCH_OF = {"sd15": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
U = "model.diffusion_model."


def _tensors(layout):
    return json.loads((LAYOUTS / f"{layout}.json").read_text())["tensors"]


def _keys(layout):
    return [t["key"] for t in _tensors(layout)]


# --------------------------------------------------------------------------- the map over real layouts

@pytest.mark.parametrize("layout", list(ARCH_OF))
def test_every_layout_key_maps_to_exactly_one_chain(layout):
    arch = architecture(ARCH_OF[layout])
    for t in _tensors(layout):
        key = t["key"]
        chain = arch.chain(key, "checkpoint")
        assert chain == arch.chain(key)  # auto-detected naming agrees
        assert chain[-1] in arch.blocks and all(n in arch.names for n in chain)
        assert len(chain) == len(set(chain))
        hits = arch.rule_hits(key, "checkpoint")
        assert len(hits) <= 1, (key, hits)  # no two rules of one region match a key
        if key.startswith(U):
            assert len(hits) == 1, key      # every diffusion-model key is matched by a rule
        assert arch.component(key, "checkpoint") == t["component"], key


@pytest.mark.parametrize("layout", list(ARCH_OF))
def test_stored_layout_block_field_equals_the_rules(layout):
    arch = architecture(ARCH_OF[layout])
    for t in _tensors(layout):
        assert t["block"] == arch.block(t["key"], "checkpoint"), t["key"]
    assert build_layout_blocks.main(["--check"]) == 0


EXPECTED_COUNTS = {  # keys per finest block name, checkpoint naming
    "sd15": {"BASE": 4, "IN00": 2, "IN01": 36, "IN02": 36, "IN03": 2, "IN04": 38, "IN05": 36, "IN06": 2, "IN07": 38,
             "IN08": 36, "IN09": 2, "IN10": 10, "IN11": 10, "M00": 46, "OUT00": 12, "OUT01": 12, "OUT02": 14,
             "OUT03": 38, "OUT04": 38, "OUT05": 40, "OUT06": 38, "OUT07": 38, "OUT08": 40, "OUT09": 38, "OUT10": 38,
             "OUT11": 42, "TE": 196, "VAE": 248},
    "sdxl": {"BASE": 8, "IN00": 2, "IN01": 10, "IN02": 10, "IN03": 2, "IN04": 58, "IN05": 56, "IN06": 2, "IN07": 218,
             "IN08": 216, "M00": 226, "OUT00": 218, "OUT01": 218, "OUT02": 220, "OUT03": 58, "OUT04": 58, "OUT05": 60,
             "OUT06": 12, "OUT07": 12, "OUT08": 16, "TE1": 178, "TE2": 374, "VAE": 248},
    "sd3": {"BASE": 1, "IN": 13, **{f"J{i:02d}": 20 for i in range(23)}, "J23": 14, "OUT": 4, "TE1": 198,
            "TE2": 518, "T5": 220, "VAE": 244},
    "flux": {"IN": 16, **{f"D{i:02d}": 24 for i in range(19)}, **{f"S{i:02d}": 8 for i in range(38)}, "OUT": 4,
             "TE": 196, "T5": 219, "VAE": 244},
}


@pytest.mark.parametrize("layout", list(ARCH_OF))
def test_keys_per_block_are_stable(layout):
    arch = architecture(ARCH_OF[layout])
    counts = Counter(arch.chain(k)[0] for k in _keys(layout))
    assert dict(counts) == EXPECTED_COUNTS[layout]


def test_every_list_block_is_populated():
    for layout in ("sd15", "sdxl", "flux"):
        arch = architecture(ARCH_OF[layout])
        assert {arch.block(k) for k in _keys(layout)} == set(arch.blocks)
    assert len(architecture("sdxl").blocks) == 20 and len(architecture("sd1").blocks) == 26
    assert len(architecture("flux").blocks) == 60
    sd3 = architecture("sd3").sized(_keys("sd3"))
    assert sd3.blocks == ("BASE", "IN", *(f"J{i:02d}" for i in range(24)), "OUT")
    assert {sd3.block(k) for k in _keys("sd3")} == set(sd3.blocks)
    assert len(architecture("sd3").blocks) == 41  # unsized: up to SD3.5 large's 38 joint blocks
    large = [f"{U}joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(38)]
    assert sd3.sized(large) is architecture("sd3") and sd3.sized(large[:30]).blocks[-2] == "J29"
    assert architecture("sdxl").sized(_keys("sdxl")) is architecture("sdxl")


def test_spot_checks():
    sd1, sdxl, flux, sd3 = (architecture(n) for n in ("sd1", "sdxl", "flux", "sd3"))
    assert sd1.chain(U + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight") == ("OUT11",)
    assert sd1.chain(U + "out.2.weight") == ("OUT11",)
    assert sd1.chain(U + "time_embed.0.weight") == ("BASE",)
    assert sd1.chain(U + "input_blocks.0.0.weight") == ("IN00",)
    assert sd1.chain(U + "input_blocks.3.0.op.weight") == ("IN03",)
    assert sd1.chain(U + "middle_block.1.proj_in.weight") == ("M00",)
    assert sd1.chain("cond_stage_model.transformer.text_model.final_layer_norm.weight") == ("TE", "BASE")
    assert sd1.chain("first_stage_model.decoder.conv_in.weight") == ("VAE", "BASE")
    assert sd1.chain("model_ema.decay") == ("BASE",) and sd1.chain("alphas_cumprod") == ("BASE",)
    assert sdxl.chain("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") == ("TE2", "BASE")
    assert sdxl.chain("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight") == \
        ("TE1", "BASE")
    assert sdxl.chain(U + "label_emb.0.0.weight") == ("BASE",)
    assert sdxl.chain(U + "out.0.weight") == ("OUT08",)
    assert flux.chain(U + "double_blocks.18.img_attn.qkv.weight") == ("D18",)
    assert flux.chain(U + "single_blocks.37.linear2.weight") == ("S37",)
    assert flux.chain(U + "guidance_in.in_layer.weight") == ("IN",)
    assert flux.chain(U + "final_layer.linear.weight") == ("OUT",)
    assert flux.chain("vae.decoder.conv_in.weight") == ("VAE", "BASE")
    assert flux.chain("text_encoders.t5xxl.transformer.shared.weight") == ("T5", "BASE")
    assert sd3.chain(U + "joint_blocks.23.x_block.attn.qkv.weight") == ("J23",)
    assert sd3.chain(U + "joint_blocks.37.x_block.attn.qkv.weight") == ("J37",)
    assert sd3.chain(U + "pos_embed") == ("IN",)
    assert sd3.chain("text_encoders.clip_g.transformer.text_projection.weight") == ("TE2", "BASE")
    assert sd3.chain("model.model_sampling.sigmas") == ("BASE",)


# --------------------------------------------------------------------------- host namings

@pytest.mark.parametrize("layout", list(ARCH_OF))
def test_comfyui_model_and_bare_unet_keys_map_like_checkpoint_keys(layout):
    arch = architecture(ARCH_OF[layout])
    for key in _keys(layout):
        if key.startswith(U):
            rest = key[len(U):]
            chain = arch.chain(key, "checkpoint")
            assert arch.chain("diffusion_model." + rest, "comfy_model") == chain
            assert arch.chain("diffusion_model." + rest) == chain
            assert arch.chain(rest, "unet") == chain
            assert arch.chain(rest) == chain  # bare UNet/DiT keys (a UNet-only file), auto-detected
            assert arch.chain(rest, "checkpoint") == chain


def _comfy_clip_key(arch, key):
    """The name ComfyUI's CLIP patcher gives a checkpoint text-encoder key (HF names)."""
    for prefix, comfy in (("cond_stage_model.", "clip_l."), ("conditioner.embedders.0.", "clip_l."),
                          ("text_encoders.", "")):
        if key.startswith(prefix):
            return comfy + key[len(prefix):]
    if key.startswith("conditioner.embedders.1.model."):  # OpenCLIP -> ComfyUI's HF naming
        return "clip_g.transformer.text_model." + key[len("conditioner.embedders.1.model."):]
    return None


@pytest.mark.parametrize("layout", list(ARCH_OF))
def test_comfyui_clip_keys_map_like_checkpoint_keys(layout):
    arch = architecture(ARCH_OF[layout])
    seen = set()
    for t in _tensors(layout):
        if t["component"] not in ("clip_l", "clip_g", "t5xxl"):
            continue
        comfy = _comfy_clip_key(arch, t["key"])
        chain = arch.chain(t["key"], "checkpoint")
        assert arch.chain(comfy, "comfy_clip") == chain, comfy
        assert arch.chain(comfy) == chain, comfy
        assert arch.component(comfy, "comfy_clip") == t["component"]
        seen.add(chain[0])
    assert seen == {"sd15": {"TE"}, "sdxl": {"TE1", "TE2"}, "sd3": {"TE1", "TE2", "T5"}, "flux": {"TE", "T5"}}[layout]
    assert architecture("sd2").chain("clip_h.transformer.text_model.encoder.layers.3.mlp.fc1.weight") == \
        ("TE", "BASE")
    # a CLIP key has no place in a MODEL's naming: it falls to BASE there
    assert architecture("sdxl").chain("clip_g.transformer.text_model.final_layer_norm.weight", "comfy_model") == \
        ("BASE",)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_kohya_lora_names_map_like_the_checkpoint_keys_they_cover(layout):
    arch = architecture(ARCH_OF[layout])
    specs = {t["key"]: tuple(t["shape"]) for t in _tensors(layout)}
    modules = lora_modules(specs)
    assert len(modules) == {"sd15": 350, "sdxl": 1040}[layout]
    blocks = set()
    for m in modules:
        chain = arch.chain(m.key, "checkpoint")
        for name in (m.name, m.name + ".lora_down.weight", m.name + ".alpha"):
            assert arch.chain(name, "lora") == chain, name
            assert arch.chain(name) == chain, name
        blocks.add(chain[-1])
    # kohya covers no conv_in: IN00 is the only list block without a LoRA module
    assert blocks == set(arch.blocks) - {"IN00"}


def test_kohya_lora_spot_checks():
    sd1, sdxl, flux, sd3 = (architecture(n) for n in ("sd1", "sdxl", "flux", "sd3"))
    assert sd1.block("lora_unet_down_blocks_1_attentions_0_proj_in") == "IN04"
    assert sd1.block("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k") == "IN05"
    assert sd1.block("lora_unet_down_blocks_2_downsamplers_0_conv") == "IN09"
    assert sd1.block("lora_unet_up_blocks_3_attentions_2_proj_out") == "OUT11"
    assert sd1.block("lora_unet_up_blocks_0_upsamplers_0_conv") == "OUT02"
    assert sd1.block("lora_unet_mid_block_attentions_0_proj_in") == "M00"
    assert sd1.block("lora_unet_conv_in") == "IN00" and sd1.block("lora_unet_conv_out") == "OUT11"
    assert sd1.chain("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight") == ("TE", "BASE")
    assert sdxl.chain("lora_te1_text_model_encoder_layers_0_mlp_fc1") == ("TE1", "BASE")
    assert sdxl.chain("lora_te2_text_model_encoder_layers_31_self_attn_q_proj") == ("TE2", "BASE")
    # kohya's SDXL trainer names modules after the SGM UNet
    assert sdxl.block("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight") == "IN04"
    assert sdxl.block("lora_unet_output_blocks_8_0_out_layers_3") == "OUT08"
    assert sdxl.block("lora_unet_middle_block_1_proj_in") == "M00"
    assert sdxl.block("lora_unet_time_embed_0") == "BASE" and sdxl.block("lora_unet_label_emb_0_0") == "BASE"
    assert flux.block("lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight") == "D03"
    assert flux.block("lora_unet_single_blocks_37_linear1") == "S37"
    assert flux.block("lora_unet_final_layer_linear") == "OUT" and flux.block("lora_unet_txt_in") == "IN"
    assert flux.chain("lora_te1_text_model_encoder_layers_0_mlp_fc1") == ("TE", "BASE")
    assert flux.chain("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == ("T5", "BASE")
    assert sd3.block("lora_unet_joint_blocks_5_x_block_attn_qkv") == "J05"
    assert sd3.block("lora_unet_context_embedder") == "IN"


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_diffusers_unet_names_map_like_the_checkpoint_keys(layout):
    from merge_core.lora.keys import _unet_diffusers_path

    arch = architecture(ARCH_OF[layout])
    n = 0
    for key in _keys(layout):
        if key.startswith(U) and key.endswith(".weight"):
            path = _unet_diffusers_path(key[len(U):-len(".weight")])
            if path:
                for name in ("unet." + path + ".weight", "unet." + path + ".lora_A.weight"):
                    assert arch.chain(name, "diffusers") == arch.chain(key) == arch.chain(name), name
                n += 1
    assert n > 100


def test_diffusers_spot_checks():
    sd1, sdxl, flux, sd3 = (architecture(n) for n in ("sd1", "sdxl", "flux", "sd3"))
    assert sd1.chain("text_encoder.text_model.encoder.layers.0.mlp.fc1.weight", "diffusers") == ("TE", "BASE")
    assert sd1.chain("vae.decoder.conv_in.weight") == ("VAE", "BASE")
    assert sd1.block("unet.conv_in.weight") == "IN00" and sd1.block("unet.conv_out.weight") == "OUT11"
    assert sd1.block("unet.time_embedding.linear_1.weight") == "BASE"
    assert sdxl.chain("text_encoder_2.text_model.final_layer_norm.weight") == ("TE2", "BASE")
    assert sdxl.block("unet.add_embedding.linear_1.weight") == "BASE"
    assert flux.block("transformer.transformer_blocks.18.attn.to_q.lora_A.weight") == "D18"
    assert flux.block("transformer.single_transformer_blocks.37.proj_out.weight") == "S37"
    assert flux.block("transformer.x_embedder.weight") == "IN" and flux.block("transformer.proj_out.weight") == "OUT"
    assert flux.block("lora_transformer_single_transformer_blocks_5_attn_to_k.lora_down.weight") == "S05"
    assert flux.chain("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.weight") == ("T5", "BASE")
    assert sd3.block("transformer.transformer_blocks.23.attn.to_q.weight") == "J23"
    assert sd3.chain("text_encoder_3.encoder.final_layer_norm.weight") == ("T5", "BASE")


def test_unknown_naming_kind_is_an_error():
    with pytest.raises(BlockSpecError, match="'onnx'"):
        architecture("sd1").chain("x", kind="onnx")


def test_architecture_for_keys():
    for layout, name in ARCH_OF.items():
        specs = {t["key"]: tuple(t["shape"]) for t in _tensors(layout)}
        assert architecture_for_keys(specs) == name
    assert architecture_for_keys(["clip_l.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert architecture_for_keys(["clip_l.x", "clip_g.x"]) == "sdxl"
    assert architecture_for_keys(["clip_l.x", "clip_g.x", "t5xxl.x"]) == "sd3"
    assert architecture_for_keys(["clip_l.x", "t5xxl.x"]) == "flux"
    assert architecture_for_keys(["clip_h.x"]) == "sd2"
    assert architecture_for_keys(["lora_unet_single_blocks_0_linear1.alpha"]) == "flux"
    assert architecture_for_keys(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"]) == "sdxl"
    assert architecture_for_keys(["lora_unet_down_blocks_3_resnets_0_conv1.alpha"]) == "sd1"
    assert architecture_for_keys(["foo.weight"]) == "unknown"


def test_architecture_data_exposed():
    for name in SUPPORTED:
        arch = architecture(name)
        assert isinstance(arch, Architecture) and arch.name == name and arch.display == display_name(name)
        assert arch.ss_base_model_version and arch.blocks[0] == "BASE"
        assert "unet" in arch.components and "vae" in arch.components
        for comp in arch.components.values():
            assert comp["layout"] in ("diffuser", "clip_l", "clip_h", "clip_g", "t5xxl", "vae")
    assert architecture("sdxl").ss_base_model_version[0] == "sdxl_base_v1-0"
    assert architecture("sd1").ss_base_model_version == ("sd_v1",)
    assert architecture("flux").ss_base_model_version == ("flux1",)
    assert architecture("sdxl").fine_names == ("TE1", "TE2", "VAE")
    assert architecture("sd3").fine_names == ("TE1", "TE2", "T5", "VAE")
    assert architecture("flux").fine_names == ("TE", "T5", "VAE")
    assert architecture("SD15") is architecture("sd1")
    with pytest.raises(BlockSpecError, match=r"pixart \(supported: sd1, sd2, sdxl, sd3, flux\)"):
        architecture("pixart")
    assert issubclass(BlockSpecError, MergeError)


# --------------------------------------------------------------------------- parsing

def test_26_values_round_trip():
    sd1 = architecture("sd1")
    nums = [round(i / 25, 4) for i in range(26)]
    bv = parse_block_values(sd1, ",".join(str(x) for x in nums))
    assert list(bv.table()) == list(sd1.blocks) and list(bv.table().values()) == nums
    assert parse_block_values(sd1, ", ".join(str(v) for v in bv.table().values())) == bv
    assert parse_block_values(sd1, nums) == bv
    assert parse_block_values(sd1, bv.table()) == bv
    assert parse_block_values("sd1", " " + ",".join(map(str, nums)) + ",\n") == bv  # trailing comma, spaces
    # list form: the text encoder and VAE follow BASE
    assert bv.value("cond_stage_model.transformer.text_model.final_layer_norm.weight") == 0.0
    assert bv.value(U + "output_blocks.11.1.proj_in.weight") == 1.0
    assert bv.value(U + "input_blocks.3.0.op.weight") == nums[4]


def test_named_ranges_and_wildcards():
    bv = parse_block_values("sdxl", "BASE:0, IN00-IN05:0.2, M00:1, OUT*:0.8")
    assert bv.table() == {"BASE": 0.0, **{f"IN{i:02d}": 0.2 for i in range(6)}, "M00": 1.0,
                          **{f"OUT{i:02d}": 0.8 for i in range(9)}}
    assert bv.value(U + "input_blocks.7.1.proj_in.weight") is None  # IN07 unset
    assert bv.value(U + "out.2.weight") == 0.8
    assert bv.value("conditioner.embedders.1.model.ln_final.weight") == 0.0  # TE2 follows BASE
    # reversed range, '=' separator, lower case, later entries win, fine names
    bv = parse_block_values("sd1", "in05-in03=0.5; IN*:0.25, IN04:1, TE:0.3, VAE:0")
    assert bv.table() == {**{f"IN{i:02d}": 0.25 for i in range(12)}, "IN04": 1.0, "TE": 0.3, "VAE": 0.0}
    assert bv.value("cond_stage_model.transformer.text_model.final_layer_norm.weight") == 0.3
    assert bv.value("first_stage_model.decoder.conv_in.weight") == 0.0
    assert bv.value(U + "time_embed.0.weight") is None
    assert bv.for_block("TE") == 0.3 and bv.for_block("M00") is None
    # SDXL: TE is both text encoders; a preset as an entry sets its values first
    bv = parse_block_values("sdxl", "flat:0.5, TE:0, OUT0[0-2]:1")
    assert bv.for_block("TE1") == 0.0 and bv.for_block("TE2") == 0.0 and bv.for_block("VAE") == 0.5
    assert bv.for_block("OUT02") == 1.0 and bv.for_block("OUT03") == 0.5
    # short names: IN4 = IN04, M = M00, a bare family name is the whole family
    bv = parse_block_values("sdxl", "IN:0.1, OUT3-OUT5:0.3, M:0.5, IN4:1")
    assert bv.table() == {**{f"IN{i:02d}": 0.1 for i in range(9)}, "IN04": 1.0, "M00": 0.5,
                          "OUT03": 0.3, "OUT04": 0.3, "OUT05": 0.3}
    assert parse_block_values("flux", "IN:0.2, D:0.4, S5:1").table() == {
        "IN": 0.2, **{f"D{i:02d}": 0.4 for i in range(19)}, "S05": 1.0}
    # a mapping from YAML/JSON, with a preset
    bv = parse_block_values("flux", {"preset": "flat", "D00-D03": 0, "S*": 0.5, "T5": 0})
    assert bv.for_block("D03") == 0.0 and bv.for_block("D04") == 1.0 and bv.for_block("S37") == 0.5
    assert bv.value("text_encoders.t5xxl.transformer.shared.weight") == 0.0
    assert bv.value("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight") == 1.0


def test_other_list_forms():
    sdxl = architecture("sdxl")
    bv = parse_block_values(sdxl, [0.5] * 20 + [0.0])  # supermerger's 21: VAE last
    assert bv.value("first_stage_model.decoder.conv_in.weight") == 0.0
    assert bv.value("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight") == 0.5
    flux = architecture("flux")
    values = [0.1, 0.2, 0.3] + [0.4] * 19 + [0.6] * 38 + [0.9]  # supermerger's 61: CLIP, T5, IN, D, S, OUT
    bv = parse_block_values(flux, ",".join(map(str, values)))
    assert bv.value("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight") == 0.1
    assert bv.value("text_encoders.t5xxl.transformer.shared.weight") == 0.2
    assert bv.value(U + "img_in.weight") == 0.3 and bv.value(U + "final_layer.linear.weight") == 0.9
    assert bv.value("vae.decoder.conv_in.weight") is None  # BASE unset in this form
    assert len(parse_block_values(flux, [1] * 60).table()) == 60
    sd3 = architecture("sd3")
    bv = parse_block_values(sd3, [0.0, 0.1] + [0.5] * 24 + [1.0])  # 27: SD3 medium
    assert bv.value(U + "joint_blocks.23.x_block.mlp.fc1.weight") == 0.5
    assert bv.value(U + "final_layer.linear.weight") == 1.0
    assert len(parse_block_values(sd3, [1] * 41).table()) == 41
    sized = sd3.sized(_keys("sd3"))
    assert len(parse_block_values(sized, [1] * 27).table()) == 27
    msg = _err(sized, [1] * 41)
    assert msg == "--blocks: 41 values, but SD3 takes 27 (BASE, IN, J00-J23, OUT)"


def _err(arch, spec, **kw):
    with pytest.raises(BlockSpecError) as info:
        parse_block_values(arch, spec, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_spec_errors_name_the_offending_item():
    assert _err("sdxl", "IN11:1") == ("--blocks: IN11 is not an SDXL block "
                                      "(SDXL: BASE, IN00-IN08, M00, OUT00-OUT08, TE1, TE2, VAE)")
    assert _err("flux", "J03:1", what="--alpha-blocks").startswith("--alpha-blocks: J03 is not a Flux block (Flux: "
                                                                   "BASE, IN, D00-D18, S00-S37, OUT, TE, T5, VAE)")
    assert _err("sd1", ",".join(["1"] * 25)) == \
        "--blocks: 25 values, but SD1.x takes 26 (BASE, IN00-IN11, M00, OUT00-OUT11)"
    assert _err("sd1", ",".join(["1"] * 20)) == \
        "--blocks: 20 values is a SDXL block list; the models are SD1.x (26 blocks)"
    assert _err("sdxl", [1] * 26) == "--blocks: 26 values is a SD1.x/SD2.x block list; the models are SDXL (20 blocks)"
    assert "61 values is a Flux block list" in _err("sdxl", [1] * 61)
    assert "BASE" in _err("sd1", "BASE:nan") and "nan" in _err("sd1", "BASE:nan")
    assert "inf" in _err("sd1", {"M00": float("inf")})
    msg = _err("sd1", ",".join(["1"] * 13 + ["inf"] + ["1"] * 12))
    assert "value 14 (M00)" in msg and "inf" in msg
    assert "value 3 (IN01): 'x'" in _err("sd1", ",".join(["1", "1", "x"] + ["1"] * 23))
    assert "OUT3*" in _err("sdxl", "OUT3*:1")
    assert "IN05-OUT02" in _err("sd1", "IN05-OUT02:1")
    assert "'0.5'" in _err("sd1", "IN00:1, 0.5")
    assert "gradd" in _err("sd1", "gradd")
    assert "'abc'" in _err("sd1", "M00:abc")
    assert "empty" in _err("sd1", "   ")
    assert "unknown preset 'nope'" in _err("sd1", {"preset": "nope"})
    assert "SDXL" in _err("sd1", preset("sdxl", "flat"))
    with pytest.raises(BlockSpecError, match="unknown block preset 'nope'"):
        preset("sd1", "nope")


# --------------------------------------------------------------------------- presets

def test_presets_give_the_documented_values():
    sd1 = architecture("sd1")
    body = sd1.blocks[1:]
    assert set(sd1.presets) == set(PRESETS)
    assert preset(sd1, "flat").table() == {b: 1.0 for b in sd1.blocks}
    assert parse_block_values(sd1, "flat:0.5").table() == {b: 0.5 for b in sd1.blocks}
    g = preset(sd1, "grad_in_out").table()
    assert g["BASE"] == 0.0 and g["IN00"] == 0.0 and g["M00"] == 0.5 and g["OUT11"] == 1.0
    assert all(g[b] == round(i / 24, 6) for i, b in enumerate(body))
    r = preset(sd1, "grad_out_in").table()
    assert r["BASE"] == 1.0 and r["IN00"] == 1.0 and r["OUT11"] == 0.0
    s = preset(sd1, "smooth").table()
    assert s["IN00"] == 0.0 and s["M00"] == 0.5 and s["OUT11"] == 1.0 and s["IN03"] < g["IN03"]
    ring = preset(sd1, "ring").table()
    assert ring["IN00"] == 1.0 and ring["OUT11"] == 1.0 and ring["M00"] == 0.0
    assert preset(sd1, "in_only").table() == {b: float(b.startswith("IN")) for b in sd1.blocks}
    assert preset(sd1, "mid_only").table() == {b: float(b == "M00") for b in sd1.blocks}
    assert preset(sd1, "out_only").table() == {b: float(b.startswith("OUT")) for b in sd1.blocks}
    assert preset(sd1, "base_only").table() == {b: float(b == "BASE") for b in sd1.blocks}
    assert preset(sd1, "model_only").table() == {b: float(b != "BASE") for b in sd1.blocks}
    te = preset("sdxl", "te_only")
    assert te.for_block("TE1") == 1.0 and te.for_block("TE2") == 1.0 and te.for_block("VAE") == 0.0
    assert te.value(U + "time_embed.0.weight") == 0.0
    assert preset(sd1, "grad_in_out", 0.5).table()["OUT11"] == 0.5
    flux = preset("flux", "in_only").table()
    assert {b for b, v in flux.items() if v} == {"IN", *(f"D{i:02d}" for i in range(19))}
    fo = preset("flux", "out_only").table()
    assert {b for b, v in fo.items() if v} == {"OUT", *(f"S{i:02d}" for i in range(19, 38))}
    sd3 = architecture("sd3").sized(_keys("sd3"))
    assert {b for b, v in preset(sd3, "mid_only").table().items() if v} == {f"J{i:02d}" for i in range(8, 16)}
    for name in SUPPORTED:
        for p in architecture(name).presets:
            table = preset(name, p).table()
            assert table and all(0.0 <= v <= 1.0 for v in table.values()), (name, p)
            assert parse_block_values(name, p) == preset(name, p)


# --------------------------------------------------------------------------- files and overrides

def test_load_block_file(tmp_path):
    y = tmp_path / "blocks.yaml"
    y.write_text("model_b: 'BASE:0, OUT*:1'\nmodel_c:\n  preset: grad_in_out\n  M00: 0.25\n")
    data = load_block_file(y)
    assert parse_block_values("sd1", data["model_b"]).for_block("OUT04") == 1.0
    assert parse_block_values("sd1", data["model_c"]).for_block("M00") == 0.25
    j = tmp_path / "blocks.json"
    j.write_text(json.dumps([0.5] * 20))
    assert parse_block_values("sdxl", load_block_file(j)).for_block("VAE") == 0.5
    for name, text, needle in [("bad.yaml", "a: [1, 2\n", "not valid YAML"), ("bad.json", "{", "not valid JSON"),
                               ("num.yaml", "3\n", "expected a mapping"), ("empty.yaml", "", "empty"),
                               ("keys.yaml", "1: 0.5\n", "key 1"), ("nested.yaml", "- [1, 2]\n", "nested")]:
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(BlockSpecError, match=needle) as info:
            load_block_file(p)
        assert str(p) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BlockSpecError, match="missing.yaml: not found"):
        load_block_file(tmp_path / "missing.yaml")


def test_parse_override():
    assert parse_override("attn2=0.5") == ("attn2", 0.5)
    assert parse_override(" *.ff.net.* = 0 ") == ("*.ff.net.*", 0.0)
    for bad, needle in [("attn2", "PATTERN=VALUE"), ("=1", "PATTERN=VALUE"), ("attn2=", "PATTERN=VALUE"),
                        ("attn2=x", "'x'"), ("attn2=nan", "attn2")]:
        with pytest.raises(BlockSpecError, match=needle):
            parse_override(bad)


def test_match_overrides():
    keys = ["a.attn2.to_k.weight", "a.attn20.to_k.weight", "b.attn2.to_v.weight", "b.ff.net.0.proj.weight",
            "c.to_k.bias"]
    values, counts = match_overrides(keys, [("attn2", 0.5), ("*.to_k.*", 0.1), ("b.ff", 0.0)])
    assert values == {"a.attn2.to_k.weight": 0.1, "b.attn2.to_v.weight": 0.5, "a.attn20.to_k.weight": 0.1,
                      "c.to_k.bias": 0.1, "b.ff.net.0.proj.weight": 0.0}
    assert counts == {"attn2": 2, "*.to_k.*": 3, "b.ff": 1}
    values, _ = match_overrides(keys, [("attn2.to_k", 1.0)])
    assert values == {"a.attn2.to_k.weight": 1.0}
    with pytest.raises(BlockSpecError, match="'attn3' matches no key"):
        match_overrides(keys, [("attn2", 0.5), ("attn3", 1.0)])
    with pytest.raises(BlockSpecError, match="attn2"):
        match_overrides(keys, [("attn2", float("nan"))])
    # on a real layout
    values, counts = match_overrides(_keys("sd15"), [("attn2", 0.0)])
    assert counts["attn2"] == len(values) == 16 * 5  # 16 transformers: to_q, to_k, to_v, to_out.0 weight+bias


def test_describe_lists_blocks_fine_names_and_presets():
    text = describe("sdxl")
    for needle in ("BASE", "IN00-IN08", "M00", "OUT00-OUT08", "TE1", "TE2", "VAE", "grad_in_out", "label_emb",
                   "20 values", "21 values"):
        assert needle in text
    assert "D00-D18" in describe("flux") and "61 values" in describe("flux")
    assert "J00-J37" in describe("sd3") and "27 values" in describe("sd3")


def test_block_values_spec_text_round_trips():
    for name in SUPPORTED:
        for p in architecture(name).presets:
            bv = preset(name, p)
            assert parse_block_values(name, bv.spec()) == bv
    bv = parse_block_values("sd1", "BASE:0, IN00-IN05:0.2, M00:1, OUT*:0.8, TE:0.1")
    assert bv.spec() == "BASE:0.0, IN00-IN05:0.2, M00:1.0, OUT00-OUT11:0.8, TE:0.1"
    assert preset("flux", "in_only").spec() == "BASE:0.0, IN:1.0, D00-D18:1.0, S00-S37:0.0, OUT:0.0"


def test_block_values_api():
    bv = parse_block_values("sd1", "M00:0.5")
    assert isinstance(bv, BlockValues) and bv.table() == {"M00": 0.5} and not bv.is_complete()
    assert preset("sd1", "flat").is_complete()
    assert bv.value("diffusion_model.middle_block.0.in_layers.0.weight", kind="comfy_model") == 0.5
    assert math.isclose(parse_block_values("sd1", "M00:1e-3").for_block("M00"), 0.001)

import json
from pathlib import Path

import pytest

from merge_core.errors import MergeError
from merge_core.lora.keys import lora_modules

LAYOUTS = Path(__file__).resolve().parents[2] / "merge_core" / "data" / "layouts"


def _specs(name):
    return {t["key"]: tuple(t["shape"]) for t in json.loads((LAYOUTS / f"{name}.json").read_text())["tensors"]}


def test_sd15_covers_the_350_layers_loaders_map_with_kohya_names():
    mods = {m.name: m for m in lora_modules(_specs("sd15"))}
    assert len(mods) == 350  # 278 UNet (attention, ff, proj, resnet, skip, time-emb, samplers) + 72 text encoder
    expected = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "lora_unet_down_blocks_2_downsamplers_0_conv": "model.diffusion_model.input_blocks.9.0.op.weight",
        "lora_unet_mid_block_resnets_1_time_emb_proj": "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "lora_unet_mid_block_attentions_0_proj_in": "model.diffusion_model.middle_block.1.proj_in.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "model.diffusion_model.output_blocks.2.1.conv.weight",
        "lora_unet_up_blocks_1_upsamplers_0_conv": "model.diffusion_model.output_blocks.5.2.conv.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj":
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "lora_unet_up_blocks_3_resnets_2_conv2": "model.diffusion_model.output_blocks.11.0.out_layers.3.weight",
        "lora_te_text_model_encoder_layers_11_mlp_fc2":
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    }
    for name, key in expected.items():
        assert mods[name].key == key
    assert not any("conv_in" in n or "time_embedding" in n or "norm" in n for n in mods)


def test_sdxl_text_encoders_and_fused_qkv():
    mods = lora_modules(_specs("sdxl"))
    te2 = [m for m in mods if m.name.startswith("lora_te2_text_model_encoder_layers_0_")]
    q, k, v = (next(m for m in te2 if m.name.endswith(f"self_attn_{x}_proj")) for x in "qkv")
    assert q.key == k.key == v.key == "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert (q.row_start, k.row_start, v.row_start, v.row_stop) == (0, 1280, 2560, 3840) and q.shape == (1280, 1280)
    names = {m.name: m.key for m in mods}
    assert names["lora_te2_text_model_encoder_layers_0_mlp_fc1"].endswith("resblocks.0.mlp.c_fc.weight")
    assert names["lora_te1_text_model_encoder_layers_0_self_attn_out_proj"].startswith("conditioner.embedders.0.")
    # SDXL has 3 levels: its first upsampler sits after an attention-bearing block
    assert names["lora_unet_up_blocks_0_upsamplers_0_conv"] == "model.diffusion_model.output_blocks.2.2.conv.weight"
    assert len({m.name for m in mods}) == len(mods)


def test_sd2_openclip_text_encoder_takes_its_prefixes_from_the_architecture_data():
    # SD2: the SD1.5 UNet with a 1024-wide context, and SDXL's OpenCLIP-G text encoder at SD2's place
    specs = {k: ((v[0], 1024) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v)
             for k, v in _specs("sd15").items() if not k.startswith("cond_stage_model.")}
    specs.update({"cond_stage_model.model." + k[len("conditioner.embedders.1.model."):]: v
                  for k, v in _specs("sdxl").items() if k.startswith("conditioner.embedders.1.model.")})
    mods = lora_modules(specs)
    assert len(mods) == 278 + 31 * 6   # the layout's OpenCLIP-G keeps 31 resblocks
    te = {m.name: m for m in mods if m.block == "text_encoder"}
    assert len(te) == 186 and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
    v = te["lora_te_text_model_encoder_layers_30_self_attn_v_proj"]
    assert (v.key, v.row_start, v.row_stop) == \
        ("cond_stage_model.model.transformer.resblocks.30.attn.in_proj_weight", 2560, 3840)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(MergeError, match="supports SD1.x, SD2.x, SDXL, SD3 and Flux checkpoints, not Llama"):
        lora_modules({"model.layers.0.self_attn.q_proj.weight": (64, 64),
                      "model.layers.0.mlp.gate_proj.weight": (128, 64), "lm_head.weight": (100, 64),
                      "model.embed_tokens.weight": (100, 64)})

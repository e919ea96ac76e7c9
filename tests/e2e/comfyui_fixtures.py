"""Runs INSIDE a ComfyUI environment: writes small SD1.5 checkpoints that ComfyUI detects as SD1.5.

UNet: ComfyUI's own UNetModel at SD1.5 widths (320 channels, 768 context) with the depth shrunk (one
level, one res block); CLIP-L and VAE with their real shapes (from merge_core's SD1.5 layout), shared
by all models except two CLIP tensors (so a CLIP merge has something to merge); each model's UNet is the same
random base plus its own perturbation.

usage: python comfyui_fixtures.py COMFYUI_DIR LAYOUT_JSON OUT_DIR N
"""
import json
import sys

comfy_dir, layout_path, out_dir, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, comfy_dir)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

torch.manual_seed(0)
unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                 channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                 transformer_depth_middle=1, use_spatial_transformer=True, num_heads=8, context_dim=768,
                 use_linear_in_transformer=False, adm_in_channels=None, dtype=torch.float32)
# ComfyUI builds modules without initialising them (torch.empty): take only the keys and shapes
init = torch.Generator().manual_seed(2)
base = {k: torch.randn(v.shape, generator=init) * 0.05 for k, v in unet.state_dict().items()}
layout = json.load(open(layout_path))["tensors"]
gen = torch.Generator().manual_seed(1)
shared = {t["key"]: (torch.randn(t["shape"], generator=gen) * 0.02).half()
          for t in layout if t["key"].startswith(("cond_stage_model.", "first_stage_model."))}
shared["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
PER_MODEL_CLIP = ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                  "cond_stage_model.transformer.text_model.final_layer_norm.weight")
for m in range(count):
    g = torch.Generator().manual_seed(100 + m)
    sd = dict(shared)
    for k in PER_MODEL_CLIP:
        sd[k] = (shared[k].float() + torch.randn(shared[k].shape, generator=g) * 0.01).half()
    for k, v in base.items():
        noise = torch.randn(v.shape, generator=g) * 0.01
        sd["model.diffusion_model." + k] = (v + noise).half()
    save_file(sd, f"{out_dir}/tiny_sd15_{m}.safetensors")
print("RESULT ok")

"""Runs INSIDE a ComfyUI environment (its python, its checkout on sys.path); called by
test_comfyui_lora_keys.py. Loads a hyper checkpoint with ComfyUI's own loader, builds ComfyUI's LoRA
key map for it, checks that every module of our LoRA files is in it, applies the LoRAs with ComfyUI's
own LoRA code at the given strengths and prints the patched weights' distance to our reconstruction.

usage: python comfyui_lora_check.py COMFYUI_DIR HYPER.safetensors STRENGTHS_JSON LORA1 [LORA2 ...]
"""
import json
import sys

comfy_dir, hyper_path, strengths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
lora_paths = sys.argv[4:]
sys.path.insert(0, comfy_dir)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import comfy.cli_args  # noqa: E402,F401
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(hyper_path, output_vae=True, output_clip=True)
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)

unknown, modules = [], set()
for path in lora_paths:
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    for key in sd:
        name = key.split(".lora_down")[0].split(".lora_up")[0].split(".alpha")[0]
        modules.add(name)
        if name not in key_map:
            unknown.append(name)

# apply all LoRAs at their strengths with ComfyUI's own code, then read the patched weights
m, c = model, clip
for path, s in zip(lora_paths, strengths):
    m, c = comfy.sd.load_lora_for_models(m, c, comfy.utils.load_torch_file(path, safe_load=True), s, s)
m.patch_model()
c.patcher.patch_model()
unet_sd = m.model.state_dict()
clip_sd = c.cond_stage_model.state_dict()
out = {"modules": len(modules), "unknown": sorted(set(unknown))[:20], "n_unknown": len(set(unknown)),
       "model_class": type(model.model).__name__, "weights": {}}
probe = {  # ComfyUI key -> our checkpoint key
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.4.0.in_layers.2.weight": "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
    "diffusion_model.output_blocks.2.1.conv.weight": "model.diffusion_model.output_blocks.2.1.conv.weight",
    "diffusion_model.middle_block.1.proj_in.weight": "model.diffusion_model.middle_block.1.proj_in.weight",
}
for k, ours in probe.items():
    out["weights"][ours] = unet_sd[k].float().flatten()[:4096].tolist()
te_key = [k for k in clip_sd if k.endswith("encoder.layers.3.mlp.fc1.weight")][0]
out["weights"]["cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"] = \
    clip_sd[te_key].float().flatten()[:4096].tolist()
print("RESULT " + json.dumps(out))

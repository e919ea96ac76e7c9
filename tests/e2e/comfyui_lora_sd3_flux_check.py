"""Runs INSIDE a ComfyUI environment (its python, its checkout on sys.path); called by
test_comfyui_lora_sd3_flux.py.

ComfyUI sizes an SD3/Flux model it detects from a checkpoint at full width (Flux: hidden_size 3072
hard-coded), so the small test models are not loaded with load_checkpoint_guess_config. Instead this
builds ComfyUI's own objects for the small config: the model (comfy.supported_models.SD3 / Flux with the
given unet_config, `.get_model()`, a comfy.model_base.SD3 / Flux) and the text encoders (ComfyUI's
CLIPTextModel / T5 classes held as clip_l / clip_g / t5xxl `.transformer`, as its SD3 and Flux CLIP
models hold them). Then:
- renames the hyper checkpoint's keys to ComfyUI's with ComfyUI's own code (the model config's
  process_unet_state_dict / process_clip_state_dict) and compares keys and shapes with those objects;
- builds ComfyUI's LoRA key map (comfy.lora.model_lora_keys_unet / model_lora_keys_clip), checks every
  module of our LoRA files is in it, loads them with comfy.lora.load_lora and applies them at the given
  strengths with comfy.lora.calculate_weight to the hyper weights;
- writes the patched weights (ComfyUI key names) to OUT and prints RESULT {json}.

usage: python comfyui_lora_sd3_flux_check.py COMFYUI_DIR ARCH UNET_CONFIG_JSON TE_CONFIGS_JSON HYPER
       STRENGTHS_JSON OUT.safetensors LORA1 [LORA2 ...]
"""
import json
import sys

comfy_dir, arch, unet_config, te_configs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
hyper_path, strengths, out_path, lora_paths = sys.argv[5], json.loads(sys.argv[6]), sys.argv[7], sys.argv[8:]
sys.path.insert(0, comfy_dir)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import comfy.cli_args  # noqa: E402,F401
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.clip_model  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.text_encoders.t5  # noqa: E402
import comfy.utils  # noqa: E402

config_class = {"flux": comfy.supported_models.Flux, "sd3": comfy.supported_models.SD3}[arch]
model_config = config_class(unet_config)
model = model_config.get_model({})
ops = comfy.ops.disable_weight_init
te = torch.nn.Module()      # clip_l / clip_g / t5xxl, each with its .transformer, as ComfyUI's CLIP models hold them
for name in {"flux": ("clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g", "t5xxl")}[arch]:
    holder = torch.nn.Module()
    if name == "t5xxl":
        holder.transformer = comfy.text_encoders.t5.T5(te_configs[name], torch.float32, "cpu", ops)
    else:
        holder.transformer = comfy.clip_model.CLIPTextModel(te_configs[name], torch.float32, "cpu", ops)
    te.add_module(name, holder)

key_map = comfy.lora.model_lora_keys_unet(model, {})
key_map = comfy.lora.model_lora_keys_clip(te, key_map)

# the hyper checkpoint under ComfyUI's names, renamed by ComfyUI's own code (as its checkpoint loader does)
sd = comfy.utils.load_torch_file(hyper_path, safe_load=True)
unet_prefix = "model.diffusion_model."
dit = model_config.process_unet_state_dict({k[len(unet_prefix):]: v for k, v in sd.items()
                                           if k.startswith(unet_prefix)})
ours = {"diffusion_model." + k: v for k, v in dit.items()}
origin = {"diffusion_model." + k: unet_prefix + k for k in dit}   # unchanged names for SD3/Flux
clip = model_config.process_clip_state_dict({k: v for k, v in sd.items() if k.startswith("text_encoders.")})
ours.update(clip)
origin.update({k: "text_encoders." + k for k in clip})

model_sd = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
dit_ours = {k: tuple(v.shape) for k, v in ours.items() if k.startswith("diffusion_model.")}
te_sd = {k: tuple(v.shape) for k, v in te.state_dict().items()}
report = {
    "model_class": type(model).__name__,
    "dit_missing": sorted(set(model_sd) - set(dit_ours))[:20],     # in ComfyUI's model, not in our checkpoint
    "dit_extra": sorted(set(dit_ours) - set(model_sd))[:20],
    "dit_shape_mismatch": sorted(k for k in model_sd if k in dit_ours and model_sd[k] != dit_ours[k])[:20],
    "te_missing": sorted(k for k in te_sd if k not in ours)[:20],
    "te_shape_mismatch": sorted(k for k in te_sd if k in ours and tuple(ours[k].shape) != te_sd[k])[:20],
}

patches, unknown, modules, not_plain = {}, set(), set(), []
for path, strength in zip(lora_paths, strengths):
    lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
    names = {k.split(".lora_down")[0].split(".lora_up")[0].split(".alpha")[0] for k in lora_sd}
    modules |= names
    unknown |= {n for n in names if n not in key_map}
    for key, adapter in comfy.lora.load_lora(lora_sd, key_map).items():
        if not isinstance(key, str):   # a (key, offset) target: not what our names should map to
            not_plain.append(str(key))
            continue
        patches.setdefault(key, []).append((strength, adapter, 1.0, None, None))

patched = {}
for key, plist in patches.items():
    weight = ours[key].float().clone()
    patched[key] = comfy.lora.calculate_weight(plist, weight, key, intermediate_dtype=torch.float32).contiguous()
save_file(patched, out_path)
report.update({"modules": len(modules), "n_unknown": len(unknown), "unknown": sorted(unknown)[:20],
               "not_plain": not_plain[:20], "patched": {k: origin[k] for k in patched},
               "patched_in_model": sum(k in model_sd or k in te_sd for k in patched)})
print("RESULT " + json.dumps(report))

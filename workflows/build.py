"""Writes the example workflows (ComfyUI UI format, drag-and-drop loadable) in this folder.

    python workflows/build.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
OUT_TYPES = {"CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"], "ManifoldMergeCheckpoints": ["MODEL", "CLIP", "VAE"],
             "ManifoldMergeHyperLoraLoader": ["MODEL", "CLIP"], "ManifoldMergeHyperMerge": ["STRING", "STRING"],
             "ManifoldMergeExtractLora": ["STRING"], "ManifoldMergeBlockWeights": ["BLOCK_WEIGHTS"],
             "ModelSave": [], "CheckpointSave": [], "CLIPSave": [], "Note": [], "PreviewImage": [],
             "CLIPTextEncode": ["CONDITIONING"], "EmptyLatentImage": ["LATENT"], "KSampler": ["LATENT"],
             "VAEDecode": ["IMAGE"]}
MUTED = 2  # LiteGraph mode NEVER: shown purple, skipped when queued; Ctrl+M turns it on
COLUMNS = 4


def out_types(node_type):
    if node_type in OUT_TYPES:
        return OUT_TYPES[node_type]
    return ["CLIP"] if node_type.endswith("Clip") else ["MODEL"]


def workflow(nodes, note=None):
    """nodes: list of (type, widgets_values, {input_name: (source_index, output_slot, type)}[, extras]); extras
    (e.g. {"mode": MUTED}) are copied into the node. `note`: the text of a Note node placed first on the canvas
    (its id comes after the others, so the indices above stay the nodes' ids - 1)."""
    ui_nodes, links = [], []
    for i, (node_type, widgets, inputs, *extras) in enumerate(nodes, start=1):
        node_inputs = []
        for name, (src, slot, typ) in inputs.items():
            link_id = len(links) + 1
            links.append([link_id, src + 1, slot, i, len(node_inputs), typ])
            node_inputs.append({"name": name, "type": typ, "link": link_id})
        cell = i if note else i - 1
        ui_nodes.append({"id": i, "type": node_type,
                         "pos": [60 + 500 * (cell % COLUMNS), 80 + 340 * (cell // COLUMNS)],
                         "size": [440, 280], "flags": {}, "order": i - 1, "mode": 0, "inputs": node_inputs,
                         "outputs": [{"name": t, "type": t, "links": []} for t in out_types(node_type)],
                         "properties": {"Node name for S&R": node_type}, "widgets_values": widgets,
                         **(extras[0] if extras else {})})
    for link in links:
        ui_nodes[link[1] - 1]["outputs"][link[2]]["links"].append(link[0])
    if note:
        ui_nodes.append({"id": len(ui_nodes) + 1, "type": "Note", "pos": [60, 80], "size": [440, 280], "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {"text": ""}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def loader(name):
    return ("CheckpointLoaderSimple", [name], {})


def preview(nodes, model, clip, vae, prompt="a photo of a red fox in a snowy forest, detailed, soft light"):
    """nodes + text prompts, an empty latent, KSampler, VAEDecode and PreviewImage showing the merge at once.
    model / clip / vae: (node index, output slot)."""
    n = len(nodes)
    return nodes + [("CLIPTextEncode", [prompt], {"clip": (*clip, "CLIP")}),
                    ("CLIPTextEncode", ["blurry, low quality, watermark"], {"clip": (*clip, "CLIP")}),
                    ("EmptyLatentImage", [512, 512, 1], {}),
                    ("KSampler", [0, "fixed", 20, 7.0, "euler", "normal", 1.0],
                     {"model": (*model, "MODEL"), "positive": (n, 0, "CONDITIONING"),
                      "negative": (n + 1, 0, "CONDITIONING"), "latent_image": (n + 2, 0, "LATENT")}),
                    ("VAEDecode", [], {"samples": (n + 3, 0, "LATENT"), "vae": (*vae, "VAE")}),
                    ("PreviewImage", [], {"images": (n + 4, 0, "IMAGE")})]


SAVE = ("The save node is muted (purple): when you like the preview, select it and press Ctrl+M, then queue "
        "again; it writes into ComfyUI's output folder.")
PICK = "Pick your own checkpoints in the loaders (model_a, model_b... are placeholders). "
SAMPLER = " The sampler, the prompts and the preview show the merged model at once (fixed seed: compare runs)."

WORKFLOWS = {
    "karcher_merge": (preview(
        [loader("model_a.safetensors"), loader("model_b.safetensors"), loader("model_c.safetensors"),
         ("ManifoldMergeKarcherModel", [1.0, 1.0, 10, 1e-5],
          {"model1": (0, 0, "MODEL"), "model2": (1, 0, "MODEL"), "model3": (2, 0, "MODEL")}),
         ("ManifoldMergeKarcherClip", [1.0, 1.0, 10, 1e-5],
          {"clip1": (0, 1, "CLIP"), "clip2": (1, 1, "CLIP"), "clip3": (2, 1, "CLIP")}),
         ("CheckpointSave", ["merged/karcher"], {"model": (3, 0, "MODEL"), "clip": (4, 0, "CLIP"),
                                                  "vae": (0, 2, "VAE")}, {"mode": MUTED})],
        model=(3, 0), clip=(4, 0), vae=(0, 2)),
        "Karcher mean (Riemannian average) of 2-8 models. " + PICK + "Connect a model to the last free input "
        "and the next one appears (up to 8); weight1..weightN weigh each model; iterations / tolerance stop the "
        "iteration. UNet (MODEL) and text encoder (CLIP) are merged by two nodes; the VAE comes from the first "
        "loader." + SAMPLER + " " + SAVE),
    "slerp_merge": (preview(
        [loader("model_a.safetensors"), loader("model_b.safetensors"),
         ("ManifoldMergeSlerpModel", [0.5], {"model_a": (0, 0, "MODEL"), "model_b": (1, 0, "MODEL")}),
         ("ManifoldMergeSlerpClip", [0.5], {"clip_a": (0, 1, "CLIP"), "clip_b": (1, 1, "CLIP")}),
         ("CheckpointSave", ["merged/slerp"], {"model": (2, 0, "MODEL"), "clip": (3, 0, "CLIP"),
                                               "vae": (0, 2, "VAE")}, {"mode": MUTED})],
        model=(2, 0), clip=(3, 0), vae=(0, 2)),
        "SLERP of two models: t = 0 is model_a, t = 1 is model_b, 0.5 halfway along the arc. " + PICK +
        "No base is connected: the weights themselves are interpolated. To interpolate the fine-tunes' changes "
        "from a common base instead, see slerp_task_vector.json." + SAMPLER + " " + SAVE),
    "slerp_task_vector": (preview(
        [loader("model_a.safetensors"), loader("model_b.safetensors"), loader("base.safetensors"),
         ("ManifoldMergeSlerpModel", [0.5], {"model_a": (0, 0, "MODEL"), "model_b": (1, 0, "MODEL"),
                                             "base_model": (2, 0, "MODEL")}),
         ("ModelSave", ["merged/slerp_task_vector"], {"model": (3, 0, "MODEL")}, {"mode": MUTED})],
        model=(3, 0), clip=(0, 1), vae=(0, 2)),
        "SLERP in task-vector mode: with base_model connected, the differences model_a - base and model_b - base "
        "are interpolated and added back to the base (base = the model both were fine-tuned from, e.g. SD1.5). " +
        PICK + "The text encoder and VAE come from model_a." + SAMPLER + " " + SAVE),
    "moving_average": (preview(
        [loader("epoch_1.safetensors"), loader("epoch_2.safetensors"), loader("epoch_3.safetensors"),
         ("ManifoldMergeMovingAverageModel", ["ema", 0.5, ""],
          {"model1": (0, 0, "MODEL"), "model2": (1, 0, "MODEL"), "model3": (2, 0, "MODEL")}),
         ("ModelSave", ["merged/ema"], {"model": (3, 0, "MODEL")}, {"mode": MUTED})],
        model=(3, 0), clip=(2, 1), vae=(2, 2)),
        "Moving average of training checkpoints, oldest first: sma (equal), ema (alpha: each newer input's "
        "weight), wma (weights, default N..1). Only the chosen method's widgets are shown. " + PICK +
        "Connect more epochs to the free input (up to 8)." + SAMPLER + " " + SAVE),
    # Block weights: one spec for SLERP's t (MODEL and CLIP: the CLIP's keys are in TE), and one row per model
    # for Karcher's weights (lines without a label apply to every model).
    "block_weights_merge": (preview(
        [loader("model_a.safetensors"), loader("model_b.safetensors"), loader("model_c.safetensors"),
         ("ManifoldMergeBlockWeights", ["sd1", "none", "BASE:0.5, IN00-IN05:0.3, M00:0.5, OUT*:0.8, TE:0.5", ""], {}),
         ("ManifoldMergeSlerpModel", [0.5], {"model_a": (0, 0, "MODEL"), "model_b": (1, 0, "MODEL"),
                                             "block_weights": (3, 0, "BLOCK_WEIGHTS")}),
         ("ManifoldMergeSlerpClip", [0.5], {"clip_a": (0, 1, "CLIP"), "clip_b": (1, 1, "CLIP"),
                                            "block_weights": (3, 0, "BLOCK_WEIGHTS")}),
         ("CheckpointSave", ["merged/slerp_blocks"], {"model": (4, 0, "MODEL"), "clip": (5, 0, "CLIP"),
                                                      "vae": (0, 2, "VAE")}, {"mode": MUTED}),
         ("ManifoldMergeBlockWeights", ["sd1", "none", "model1: IN*:2, M00:1\nmodel2: OUT*:2\nBASE:1", ""], {}),
         ("ManifoldMergeKarcherModel", [1.0, 1.0, 10, 1e-5],
          {"model1": (0, 0, "MODEL"), "model2": (1, 0, "MODEL"), "model3": (2, 0, "MODEL"),
           "block_weights": (7, 0, "BLOCK_WEIGHTS")}),
         ("ModelSave", ["merged/karcher_blocks"], {"model": (8, 0, "MODEL")}, {"mode": MUTED})],
        model=(4, 0), clip=(5, 0), vae=(0, 2)),
        "Block weights: the first Block weights node sets SLERP's t per block (BASE, IN00-IN11, M00, OUT00-OUT11; "
        "TE = the text encoder), the second gives Karcher one row per model. Set architecture to your models' "
        "(sd1, sdxl...). " + PICK + "The preview shows the SLERP merge; wire the Karcher node into the sampler "
        "to see it." + SAMPLER + " " + SAVE),
    "merge_checkpoints": (preview(
        [("ManifoldMergeCheckpoints", ["model_a.safetensors", "model_b.safetensors", "slerp", "", 0.5, 0.5, 0.5, ""],
          {}),
         ("CheckpointSave", ["merged/ab"], {"model": (0, 0, "MODEL"), "clip": (0, 1, "CLIP"),
                                            "vae": (0, 2, "VAE")}, {"mode": MUTED})],
        model=(0, 0), clip=(0, 1), vae=(0, 2)),
        "Merge checkpoints streams 2-8 files from models/checkpoints through merge_core (never all in memory). "
        "ckpt_1 / ckpt_2: the models (pick yours); set ckpt_3 and ckpt_4 appears (up to ckpt_8). method: any "
        "merge method; only its widgets are shown. save_as: a file name to also write the merge next to ckpt_1 "
        "in models/checkpoints (empty: not written; an existing file is never replaced)." + SAMPLER + " " + SAVE),
    "hyper_merge": ([("ManifoldMergeHyperMerge", ["model_a.safetensors", "model_b.safetensors", "64,64,32,32", 6,
                                                 "mix", "float16"], {})],
                    "Hyper-merge: 2-8 checkpoints become one hyper checkpoint (NAME_hyper.safetensors next to "
                    "ckpt_1 in models/checkpoints) plus a set of LoRAs (NAME_0-64.safetensors... in models/loras); "
                    "each source model is the hyper checkpoint plus the LoRAs at its strengths (the multipliers "
                    "output). ranks: one LoRA per rank. Nothing existing is overwritten: change name to run again. "
                    "Then open hyper_lora_loader.json to rebuild (and preview) any source model."),
    "hyper_lora_loader": (preview(
        [loader("mix_hyper.safetensors"),
         ("ManifoldMergeHyperLoraLoader", ["mix", "mix / model_b", ""], {"model": (0, 0, "MODEL"),
                                                                         "clip": (0, 1, "CLIP")}),
         ("ModelSave", ["merged/model_b_rebuilt"], {"model": (1, 0, "MODEL")}, {"mode": MUTED})],
        model=(1, 0), clip=(1, 1), vae=(0, 2)),
        "Hyper LoRA loader: load the hyper checkpoint made by hyper_merge.json, pick its set (hyper_set) and "
        "the source model to rebuild (source_model lists the set's models, read from the LoRAs). manual_strengths "
        "(one number per LoRA) overrides it to blend between the models." + SAMPLER + " " + SAVE),
    "extract_lora": ([loader("tuned.safetensors"), loader("base.safetensors"),
                      ("ManifoldMergeExtractLora", [64, 32, "tuned_lora"],
                       {"model": (0, 0, "MODEL"), "base_model": (1, 0, "MODEL"), "clip": (0, 1, "CLIP"),
                        "base_clip": (1, 1, "CLIP")})],
                     "Extract LoRA: the difference between a fine-tuned model (first loader) and its base (second) "
                     "as a kohya LoRA written to models/loras/FILENAME.safetensors (UNet and CLIP-L; conv_rank > 0 "
                     "adds 3x3 convolutions). Then use it with ComfyUI's LoraLoader."),
}

if __name__ == "__main__":
    for name, (nodes, note) in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(workflow(nodes, note), indent=1))
        print("wrote", name)

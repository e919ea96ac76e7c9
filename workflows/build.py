"""Writes the example workflows (ComfyUI UI format, drag-and-drop loadable) in this folder.

    python workflows/build.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
OUT_TYPES = {"CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"], "ManifoldMergeCheckpoints": ["MODEL", "CLIP", "VAE"],
             "ManifoldMergeHyperLoraLoader": ["MODEL", "CLIP"], "ManifoldMergeHyperMerge": ["STRING", "STRING"],
             "ManifoldMergeExtractLora": ["STRING"], "ManifoldMergeBlockWeights": ["BLOCK_WEIGHTS"],
             "ModelSave": [], "CheckpointSave": [], "CLIPSave": []}


def out_types(node_type):
    if node_type in OUT_TYPES:
        return OUT_TYPES[node_type]
    return ["CLIP"] if node_type.endswith("Clip") else ["MODEL"]


def workflow(nodes):
    """nodes: list of (type, widgets_values, {input_name: (source_index, output_slot, type)})."""
    ui_nodes, links = [], []
    for i, (node_type, widgets, inputs) in enumerate(nodes, start=1):
        node_inputs = []
        for name, (src, slot, typ) in inputs.items():
            link_id = len(links) + 1
            links.append([link_id, src + 1, slot, i, len(node_inputs), typ])
            node_inputs.append({"name": name, "type": typ, "link": link_id})
        ui_nodes.append({"id": i, "type": node_type, "pos": [60 + 380 * (i - 1) % 1520, 80 + 260 * ((i - 1) // 4)],
                         "size": [340, 200], "flags": {}, "order": i - 1, "mode": 0, "inputs": node_inputs,
                         "outputs": [{"name": t, "type": t, "links": []} for t in out_types(node_type)],
                         "properties": {"Node name for S&R": node_type}, "widgets_values": widgets})
    for link in links:
        ui_nodes[link[1] - 1]["outputs"][link[2]]["links"].append(link[0])
    return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def loader(name):
    return ("CheckpointLoaderSimple", [name], {})


WORKFLOWS = {
    "karcher_merge": [loader("model_a.safetensors"), loader("model_b.safetensors"), loader("model_c.safetensors"),
                      ("ManifoldMergeKarcherModel", [1.0, 1.0, 10, 1e-5],
                       {"model1": (0, 0, "MODEL"), "model2": (1, 0, "MODEL"), "model3": (2, 0, "MODEL")}),
                      ("ManifoldMergeKarcherClip", [1.0, 1.0, 10, 1e-5],
                       {"clip1": (0, 1, "CLIP"), "clip2": (1, 1, "CLIP"), "clip3": (2, 1, "CLIP")}),
                      ("CheckpointSave", ["merged/karcher"],
                       {"model": (3, 0, "MODEL"), "clip": (4, 0, "CLIP"), "vae": (0, 2, "VAE")})],
    "slerp_merge": [loader("model_a.safetensors"), loader("model_b.safetensors"), loader("base.safetensors"),
                    ("ManifoldMergeSlerpModel", [0.5], {"model_a": (0, 0, "MODEL"), "model_b": (1, 0, "MODEL"),
                                                        "base_model": (2, 0, "MODEL")}),
                    ("ModelSave", ["merged/slerp"], {"model": (3, 0, "MODEL")})],
    "moving_average": [loader("epoch_1.safetensors"), loader("epoch_2.safetensors"), loader("epoch_3.safetensors"),
                       ("ManifoldMergeMovingAverageModel", ["ema", 0.5, ""],
                        {"model1": (0, 0, "MODEL"), "model2": (1, 0, "MODEL"), "model3": (2, 0, "MODEL")}),
                       ("ModelSave", ["merged/ema"], {"model": (3, 0, "MODEL")})],
    # Block weights: one spec for SLERP's t (MODEL and CLIP: the CLIP's keys are in TE), and one row per model
    # for Karcher's weights (lines without a label apply to every model).
    "block_weights_merge": [loader("model_a.safetensors"), loader("model_b.safetensors"), loader("model_c.safetensors"),
                            ("ManifoldMergeBlockWeights",
                             ["sd1", "none", "BASE:0.5, IN00-IN05:0.3, M00:0.5, OUT*:0.8, TE:0.5", ""], {}),
                            ("ManifoldMergeSlerpModel", [0.5], {"model_a": (0, 0, "MODEL"), "model_b": (1, 0, "MODEL"),
                                                                "block_weights": (3, 0, "BLOCK_WEIGHTS")}),
                            ("ManifoldMergeSlerpClip", [0.5], {"clip_a": (0, 1, "CLIP"), "clip_b": (1, 1, "CLIP"),
                                                               "block_weights": (3, 0, "BLOCK_WEIGHTS")}),
                            ("CheckpointSave", ["merged/slerp_blocks"],
                             {"model": (4, 0, "MODEL"), "clip": (5, 0, "CLIP"), "vae": (0, 2, "VAE")}),
                            ("ManifoldMergeBlockWeights",
                             ["sd1", "none", "model1: IN*:2, M00:1\nmodel2: OUT*:2\nBASE:1", ""], {}),
                            ("ManifoldMergeKarcherModel", [1.0, 1.0, 10, 1e-5],
                             {"model1": (0, 0, "MODEL"), "model2": (1, 0, "MODEL"), "model3": (2, 0, "MODEL"),
                              "block_weights": (7, 0, "BLOCK_WEIGHTS")}),
                            ("ModelSave", ["merged/karcher_blocks"], {"model": (8, 0, "MODEL")})],
    "merge_checkpoints": [("ManifoldMergeCheckpoints", ["model_a.safetensors", "model_b.safetensors", "karcher", "",
                                                        0.5, 0.5, 0.5, "merged_ab"], {}),
                          ("CheckpointSave", ["merged/ab"], {"model": (0, 0, "MODEL"), "clip": (0, 1, "CLIP"),
                                                             "vae": (0, 2, "VAE")})],
    "hyper_merge": [("ManifoldMergeHyperMerge", ["model_a.safetensors", "model_b.safetensors", "64,64,32,32", 6,
                                                 "mix", "float16"], {})],
    "hyper_lora_loader": [loader("mix_hyper.safetensors"),
                          ("ManifoldMergeHyperLoraLoader", ["mix", "model_b", ""],
                           {"model": (0, 0, "MODEL"), "clip": (0, 1, "CLIP")}),
                          ("ModelSave", ["merged/model_b_rebuilt"], {"model": (1, 0, "MODEL")})],
    "extract_lora": [loader("tuned.safetensors"), loader("base.safetensors"),
                     ("ManifoldMergeExtractLora", [64, 32, "tuned_lora"],
                      {"model": (0, 0, "MODEL"), "base_model": (1, 0, "MODEL"), "clip": (0, 1, "CLIP"),
                       "base_clip": (1, 1, "CLIP")})],
}

if __name__ == "__main__":
    for name, nodes in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(workflow(nodes), indent=1))
        print("wrote", name)

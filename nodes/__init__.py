"""ComfyUI nodes (classic V1 API). Imported only by the root __init__.py when ComfyUI is present."""
from .lora_nodes import LORA_NODES
from .merge_nodes import MERGE_NODES

NODE_CLASS_MAPPINGS = {**MERGE_NODES, **LORA_NODES}
DISPLAY_NAMES = {
    "ManifoldMergeKarcherModel": "Karcher merge (MODEL)", "ManifoldMergeKarcherClip": "Karcher merge (CLIP)",
    "ManifoldMergeSlerpModel": "SLERP merge (MODEL)", "ManifoldMergeSlerpClip": "SLERP merge (CLIP)",
    "ManifoldMergeMovingAverageModel": "Moving average SMA/EMA/WMA (MODEL)",
    "ManifoldMergeMovingAverageClip": "Moving average SMA/EMA/WMA (CLIP)",
    "ManifoldMergeCheckpoints": "Merge checkpoints (streamed from disk)",
    "ManifoldMergeHyperMerge": "Hyper-merge (checkpoints -> hyper + LoRAs)",
    "ManifoldMergeHyperLoraLoader": "Hyper LoRA loader",
    "ManifoldMergeExtractLora": "Extract LoRA",
}
NODE_DISPLAY_NAME_MAPPINGS = {k: f"{v} · Manifold Merge" for k, v in DISPLAY_NAMES.items()}

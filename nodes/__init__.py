"""ComfyUI nodes (classic V1 API). Imported only by the root __init__.py when ComfyUI is present."""
from .block_nodes import BLOCK_NODES
from .lora_nodes import LORA_NODES
from .merge_nodes import MERGE_NODES

NODE_CLASS_MAPPINGS = {**MERGE_NODES, **BLOCK_NODES, **LORA_NODES}
DISPLAY_NAMES = {
    "ManifoldMergeHyperMerge": "Hyper-merge (checkpoints -> hyper + LoRAs)",
    "ManifoldMergeHyperLoraLoader": "Hyper LoRA loader",
    "ManifoldMergeExtractLora": "Extract LoRA",
}
NODE_DISPLAY_NAME_MAPPINGS = {k: f"{getattr(cls, 'DISPLAY_NAME', None) or DISPLAY_NAMES[k]} · Manifold Merge"
                              for k, cls in NODE_CLASS_MAPPINGS.items()}

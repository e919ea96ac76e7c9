"""Hyper-model + multi-LoRA decomposition: M checkpoints -> one hyper checkpoint + K LoRAs."""

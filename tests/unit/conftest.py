import pytest
import torch

from merge_core.io import save_safetensors

UNET = "model.diffusion_model."
TO_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN = UNET + "input_blocks.0.0.weight"
TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
POS_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def tiny_sd1(seed: int, dtype=torch.float16, conv_in_channels: int = 4, vocab: int = 50, extra: dict | None = None):
    """A tiny checkpoint with real SD1 key names (detected as SD1.x)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        TO_K: torch.randn(32, 768, generator=g),
        CONV_IN: torch.randn(8, conv_in_channels, 3, 3, generator=g),
        UNET + "out.2.bias": torch.randn(4, generator=g),
        TOKENS: torch.randn(vocab, 16, generator=g),
        "logit_scale": torch.tensor(4.6 + seed),
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd[POS_IDS] = torch.arange(77).unsqueeze(0)
    sd.update(extra or {})
    return sd


@pytest.fixture
def write(tmp_path):
    def _write(name, sd, metadata=None):
        path = tmp_path / name
        save_safetensors(path, sd, metadata)
        return path
    return _write

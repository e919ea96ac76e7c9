import json
from pathlib import Path

import pytest

from merge_core.arch import detect_architecture

LAYOUTS = Path(__file__).resolve().parents[2] / "merge_core" / "data" / "layouts"


def _specs(name):
    data = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {t["key"]: tuple(t["shape"]) for t in data["tensors"]}


@pytest.mark.parametrize("layout,expected", [("sd15", "sd1"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux")])
def test_real_layouts_are_detected(layout, expected):
    assert detect_architecture(_specs(layout)) == expected


def test_sd2_is_told_from_sd1_by_the_cross_attention_width():
    specs = _specs("sd15")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    specs[key] = (320, 1024)
    assert detect_architecture(specs) == "sd2"


def test_bare_unet_dicts_as_comfyui_holds_them():
    unet = {k[len("model."):]: v for k, v in _specs("sdxl").items() if k.startswith("model.diffusion_model.")}
    assert detect_architecture(unet) == "sdxl"
    assert detect_architecture({"foo.weight": (3, 3)}) == "unknown"

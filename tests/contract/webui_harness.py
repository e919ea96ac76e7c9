"""Load the extension the way AUTOMATIC1111 does, against the stand-in `modules` package.

A1111 (modules/script_loading.py) loads each `scripts/*.py` with
spec_from_file_location under the file's own name, while the extension root is
first on sys.path; the root `__init__.py` is never imported.
"""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = Path(__file__).resolve().parent
FAKES = {"a1111": [CONTRACT / "fake_webui"],
         "forge": [CONTRACT / "fake_webui", CONTRACT / "fake_forge"],
         "reforge": [CONTRACT / "fake_webui", CONTRACT / "fake_reforge"]}
HOST_PACKAGES = ("modules", "backend", "modules_forge", "ldm_patched", "manifold_webui")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in HOST_PACKAGES or name == "manifold_merge.py":
            del sys.modules[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(path: Path):
    """modules.script_loading.load_module, in short."""
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location(path.name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def start_webui(tmp_path: Path, demo_models: list[Path], flavour: str = "a1111") -> SimpleNamespace:
    """A fresh stand-in WebUI with the demo checkpoints in models/Stable-diffusion, and our script loaded."""
    _purge()
    for folder in reversed(FAKES[flavour]):
        sys.path.insert(0, str(folder))
    from modules import calls, paths, script_callbacks, sd_models, shared
    calls.clear()
    models = tmp_path / "models"
    ckpt_dir = models / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (models / "Lora").mkdir()
    for p in demo_models:
        shutil.copy(p, ckpt_dir / p.name)
    paths.models_path = str(models)
    sd_models.model_path = str(ckpt_dir)
    sd_models.list_models()
    load_script(ROOT / "scripts" / "manifold_merge.py")
    return SimpleNamespace(calls=calls, sd_models=sd_models, shared=shared, callbacks=script_callbacks,
                           ckpt_dir=ckpt_dir, lora_dir=models / "Lora", flavour=flavour)


def stop_webui() -> None:
    for fakes in FAKES.values():
        for folder in fakes:
            while str(folder) in sys.path:
                sys.path.remove(str(folder))
    _purge()

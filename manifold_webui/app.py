"""`python -m merge_core app`: the Manifold Merge tab as a web app of its own, on 127.0.0.1 only."""
from __future__ import annotations

import argparse
from pathlib import Path

from .hosts import Host, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models", help="checkpoint folder (default: ./models)")
    parser.add_argument("--lora-dir", help="LoRA folder for hyper-merge (default: MODELS/Lora)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--demo", action="store_true", help="put three small demo checkpoints into the folder first")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=0)


def build(models_dir, lora_dir=None, settings: Settings | None = None, demo: bool = False):
    """The Blocks for a models folder (created if missing); with demo=True, demo checkpoints are added."""
    from .service import MergeService
    from .ui import build_tab
    # Absolute from here on: the tab's messages name the folder, and a name from a request is only
    # ever looked up in this folder's own listing (hosts.pick_listed), whatever the working directory.
    folder = Path(models_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lora_dir = Path(lora_dir).expanduser().resolve() if lora_dir is not None else None
    host = Host(folder, lora_dir, settings or Settings(device="auto"))
    host.lora_dir().mkdir(parents=True, exist_ok=True)
    if demo:
        from merge_core.demo import write_demo_models
        write_demo_models(folder)
    return build_tab(MergeService(host))


def launch(blocks, port: int, block: bool = True):
    blocks.queue()
    # Only the local machine: merging writes files into the folders. Inputs are confined to the listed
    # checkpoints (any path in a request is refused), but the app has no login.
    return blocks.launch(server_name="127.0.0.1", server_port=port, inbrowser=False, share=False,
                         prevent_thread_lock=not block, show_error=True)


def main(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("the app needs gradio: pip install -r requirements-app.txt") from None
    settings = Settings(dtype=args.dtype, device=args.device, threads=args.threads)
    blocks = build(args.models, args.lora_dir, settings, demo=args.demo)
    print(f"Manifold Merge: checkpoints in {Path(args.models).resolve()}; open http://127.0.0.1:{args.port}")
    launch(blocks, args.port)
    return 0

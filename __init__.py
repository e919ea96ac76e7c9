"""ComfyUI entry point of Manifold Merge (also an A1111 extension: see scripts/ and docs/).

ComfyUI imports this folder as a package. Nothing from ComfyUI is imported unless ComfyUI is
running (so `pytest` and A1111 never trigger it); the nodes then import merge_core relatively, and
this folder is never put on sys.path (our `nodes/` package must not shadow ComfyUI's `nodes` module).
"""


def _comfy_present() -> bool:
    try:
        import comfy.model_patcher  # noqa: F401
        import folder_paths  # noqa: F401
        return True
    except Exception:  # absent, or a stub without a spec: no host
        return False


if _comfy_present():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

# The front-end extension (javascript/comfyui/manifold_merge.js: per-method widgets, model sockets added as they are
# connected, the hyper LoRA loader's source models); plain files, served by ComfyUI.
WEB_DIRECTORY = "./javascript/comfyui"  # its own folder: A1111 loads javascript/*.js as classic scripts

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

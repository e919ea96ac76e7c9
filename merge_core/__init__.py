"""Manifold Merge core: streaming model merging (Karcher, SLERP, moving averages, ...).

Pure PyTorch + safetensors + numpy. Nothing here imports a host (A1111, ComfyUI)
or gradio. See docs/API.md for the contract the host adapters rely on.
"""
__version__ = "0.1.0"

from .errors import (ArchitectureMismatch, BadCheckpoint, DeviceUnavailable, MergeCancelled, MergeError,  # noqa: E402
                     MissingKeys, NonFiniteOutput, OutputExists, ShapeMismatch, UnsafeCheckpoint)
from .arch import detect_architecture  # noqa: E402


def merge(*args, **kwargs):
    """See merge_core.engine.merge (imported lazily to keep `import merge_core` light)."""
    from .engine import merge as _merge
    return _merge(*args, **kwargs)


__all__ = ["ArchitectureMismatch", "BadCheckpoint", "DeviceUnavailable", "MergeCancelled", "MergeError",
           "MissingKeys", "NonFiniteOutput", "OutputExists", "ShapeMismatch", "UnsafeCheckpoint",
           "__version__", "detect_architecture", "merge"]

"""Registration with AUTOMATIC1111 / Forge / reForge: the tab and its settings.

Called from scripts/manifold_merge.py at script-load time; `modules` is the host's package.
The extension root is on sys.path only while the WebUI loads that script, so every top-level
package we need (merge_core, manifold_webui) is imported here, at load time; later imports are
of their submodules, which Python finds through the package, not through sys.path.
"""
from __future__ import annotations

import merge_core  # noqa: F401  (see above)

from . import hosts, service

SECTION = ("manifold_merge", "Manifold Merge")
TAB = ("Manifold Merge", "manifold_merge")


def on_ui_tabs():
    from .ui import build_tab  # gradio is imported when the WebUI builds its UI
    return [(build_tab(service.MergeService(hosts.detect_host())), *TAB)]


def on_ui_settings():
    import gradio as gr
    from modules import shared

    def add(key, default, label, component, args=None):
        shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=SECTION))

    add("manifold_merge_dtype", "auto", "Default output dtype (auto = the inputs' dtype)", gr.Dropdown,
        {"choices": list(service.DTYPES)})
    add("manifold_merge_device", "host", "Merge device (host = the WebUI's own device)", gr.Dropdown,
        {"choices": ["host", "auto", "cpu", "cuda"]})
    add("manifold_merge_threads", 0, "Worker threads (0 = automatic)", gr.Slider,
        {"minimum": 0, "maximum": 16, "step": 1})
    add("manifold_merge_keep_in_ram", False,
        "Merge and load: keep the merged weights in RAM, so Save writes them without merging again "
        "(costs one model's size of RAM)", gr.Checkbox)


def register() -> None:
    from modules import script_callbacks
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)

"""Manifold Merge for AUTOMATIC1111 / Forge / reForge, and the same tab as a standalone web app.

hosts.py   one adapter per host (folders, checkpoint list, progress, loading a merge)
service.py the tab's actions, without gradio (validation, merge_core calls)
charts.py  HTML heatmap and bar chart
ui.py      the gradio Blocks (3.41 and 4.40)
webui.py   registration with the WebUI (on_ui_tabs, on_ui_settings)
app.py     `python -m merge_core app`: the tab on 127.0.0.1 without a WebUI
"""

"""The Manifold Merge tab as a gradio Blocks, for gradio 3.41 (A1111, reForge) and 4.40 (Forge, standalone).

Only constructs and keyword arguments that both versions accept are used, and
every handler returns `gr.update(...)` (never `gr.X.update`). The handlers are
thin: they build a request, call `MergeService`, and turn its result or its
error message into component updates. Event names (api_name) are prefixed
because A1111 shares one API namespace between all extensions.
"""
from __future__ import annotations

import traceback

import gradio as gr

from merge_core.errors import MergeError

from .service import (DTYPES, INSPECT_COLUMNS, METHOD_LABELS, NONE, MergeRequest, MergeService, friendly,
                      without_hash)

DEVICES = ("host", "auto", "cpu", "cuda")
METHOD_HELP = """**karcher**: Riemannian mean of 2-100 models (weights optional) ·
**slerp**: spherical interpolation of two models at *t* ·
**sma / ema / wma**: simple, exponential (α) and weighted moving averages ·
**weighted**: (1-m)·A + m·B · **add-difference**: A + m·(B - C).
With a base model, Karcher and SLERP merge the differences from the base (task vectors)."""

# Which parameter controls each method shows (weights, t, alpha, multiplier, iterations+tolerance, base).
VISIBLE = {
    "karcher": (True, False, False, False, True, True),
    "slerp": (False, True, False, False, False, True),
    "sma": (False, False, False, False, False, False),
    "ema": (False, False, True, False, False, False),
    "wma": (True, False, False, False, False, False),
    "weighted": (False, False, False, True, False, False),
    "add-difference": (False, False, False, True, False, False),
}


def _frame(headers, rows):
    import pandas as pd  # gradio depends on pandas in both versions
    return pd.DataFrame(rows, columns=headers)


def _error(exc: Exception) -> str:
    """The tab's message for a failed action; unexpected errors also go to the console with their traceback."""
    if not isinstance(exc, (MergeError, OSError)):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    return friendly(exc)


def _ui_progress(progress):
    return lambda fraction, text: progress(fraction, desc=text)


def build_tab(service: MergeService) -> gr.Blocks:
    settings = service.host.settings()
    choices = service.checkpoints()

    def choice_updates(models=None, base=None, hyper=None, inspect=None):
        """New choices for the four model pickers; the selections given are kept where still there
        (matched by name, since a title gains " [hash]" once the WebUI has hashed the file)."""
        names = service.checkpoints(refresh=True)
        by_name = {without_hash(n): n for n in names}

        def multi(value):
            if value is None:
                return gr.update(choices=names)
            kept = [by_name[without_hash(x)] for x in value if without_hash(x) in by_name]
            return gr.update(choices=names, value=kept)

        base_update = gr.update(choices=[NONE] + names) if base is None else \
            gr.update(choices=[NONE] + names, value=by_name.get(without_hash(base), NONE))
        return multi(models), base_update, multi(hyper), multi(inspect)

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("## Manifold Merge", elem_id="manifold_merge_title")
        with gr.Tabs():
            # ---------------------------------------------------------------- Merge
            with gr.Tab("Merge", elem_id="manifold_merge_tab_merge"):
                with gr.Row():
                    models = gr.Dropdown(choices=choices, value=[], multiselect=True, label="Checkpoints (in order)",
                                         elem_id="manifold_merge_models", scale=8)
                    refresh = gr.Button("Refresh", elem_id="manifold_merge_refresh", scale=1)
                method = gr.Radio(choices=list(METHOD_LABELS), value="karcher", label="Method",
                                  elem_id="manifold_merge_method")
                gr.Markdown(METHOD_HELP)
                with gr.Row():
                    weights = gr.Textbox(label="Weights, one per model in the order picked (empty = equal)",
                                         placeholder="e.g. 1 1 2", elem_id="manifold_merge_weights")
                    t = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="t (SLERP)", visible=False,
                                  elem_id="manifold_merge_t")
                    alpha = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="α (EMA)", visible=False,
                                      elem_id="manifold_merge_alpha")
                    multiplier = gr.Slider(-1.0, 2.0, value=0.5, step=0.01, label="Multiplier m", visible=False,
                                           elem_id="manifold_merge_multiplier")
                with gr.Row():
                    karcher_iter = gr.Slider(0, 100, value=10, step=1, label="Karcher iterations",
                                             elem_id="manifold_merge_karcher_iter")
                    karcher_tol = gr.Number(value=1e-5, label="Karcher tolerance", elem_id="manifold_merge_karcher_tol")
                    base = gr.Dropdown(choices=[NONE] + choices, value=NONE, label="Base model (task-vector mode)",
                                       elem_id="manifold_merge_base")
                with gr.Row():
                    name = gr.Textbox(label="Output name (saved as NAME.safetensors in the checkpoint folder)",
                                      elem_id="manifold_merge_name")
                    dtype = gr.Dropdown(choices=list(DTYPES), value=settings.dtype, label="Output dtype",
                                        elem_id="manifold_merge_dtype")
                    device = gr.Dropdown(choices=list(DEVICES), value=settings.device,
                                         label=f"Device (host = {service.device('host')})",
                                         elem_id="manifold_merge_device")
                with gr.Row():
                    save = gr.Button("Save", variant="primary", elem_id="manifold_merge_save")
                    load = gr.Button("Merge and load", elem_id="manifold_merge_load",
                                     interactive=service.host.can_hot_load)
                    cancel = gr.Button("Cancel", variant="stop", elem_id="manifold_merge_cancel")
                    switch = gr.Button("Load the saved model", visible=False, elem_id="manifold_merge_switch")
                status = gr.Markdown("", elem_id="manifold_merge_status")
                saved_title = gr.State("")
                with gr.Accordion("Recipe written into the file's metadata", open=True):
                    recipe = gr.Code(language="json", label="Recipe", elem_id="manifold_merge_recipe")

            # ---------------------------------------------------------------- Hyper-merge
            with gr.Tab("Hyper-merge", elem_id="manifold_merge_tab_hyper"):
                gr.Markdown("M checkpoints → one hyper checkpoint (checkpoint folder) + K LoRAs (LoRA folder); "
                            "each model is the hyper checkpoint plus the LoRAs at its own strengths (the tags).")
                hyper_models = gr.Dropdown(choices=choices, value=[], multiselect=True, label="Checkpoints",
                                           elem_id="manifold_merge_hyper_models")
                with gr.Row():
                    ranks = gr.Textbox(value="64 64 32 32", label="LoRA ranks (one per LoRA)",
                                       elem_id="manifold_merge_hyper_ranks")
                    iterations = gr.Slider(1, 20, value=6, step=1, label="Rounds", elem_id="manifold_merge_hyper_iter")
                    hyper_name = gr.Textbox(value="hyper", label="Name", elem_id="manifold_merge_hyper_name")
                    hyper_dtype = gr.Dropdown(choices=["fp16", "bf16", "fp32"], value="fp16", label="Output dtype",
                                              elem_id="manifold_merge_hyper_dtype")
                with gr.Row():
                    hyper_run = gr.Button("Run hyper-merge", variant="primary", elem_id="manifold_merge_hyper_run")
                    hyper_cancel = gr.Button("Cancel", variant="stop", elem_id="manifold_merge_hyper_cancel")
                hyper_status = gr.Markdown("", elem_id="manifold_merge_hyper_status")
                multipliers = gr.Textbox(label="Prompt tags per model (copy into your prompt)", lines=4,
                                         show_copy_button=True, elem_id="manifold_merge_hyper_tags")
                hyper_table = gr.Dataframe(headers=["model", "λ per LoRA", "error (LoRA layers)", "error (all)"],
                                           label="Report", interactive=False, elem_id="manifold_merge_hyper_table")
                hyper_chart = gr.HTML("", elem_id="manifold_merge_hyper_chart")

            # ---------------------------------------------------------------- Inspect
            with gr.Tab("Inspect", elem_id="manifold_merge_tab_inspect"):
                inspect_models = gr.Dropdown(choices=choices, value=[], multiselect=True, label="Checkpoints",
                                             elem_id="manifold_merge_inspect_models")
                inspect_run = gr.Button("Inspect and compare", variant="primary", elem_id="manifold_merge_inspect_run")
                inspect_status = gr.Markdown("", elem_id="manifold_merge_inspect_status")
                inspect_table = gr.Dataframe(headers=list(INSPECT_COLUMNS), label="Models", interactive=False,
                                              elem_id="manifold_merge_inspect_table")
                heatmap = gr.HTML("", elem_id="manifold_merge_heatmap")
                with gr.Accordion("Metadata", open=False):
                    metadata = gr.Code(language="json", label="Metadata", elem_id="manifold_merge_metadata")

        pickers = [models, base, hyper_models, inspect_models]
        merge_inputs = [method, models, weights, t, alpha, multiplier, karcher_iter, karcher_tol, base, name, dtype,
                        device]

        def request(*values) -> MergeRequest:
            m, chosen, w, t_, a, mult, it, tol, b, n, dt, dev = values
            return MergeRequest(method=m, models=list(chosen or []), weights=w or "", t=t_, alpha=a,
                                multiplier=mult, karcher_iter=int(it), karcher_tol=float(tol), base=b or NONE,
                                name=n or "", dtype=dt, device=dev)

        # ---- Merge events
        def on_method(m):
            return [gr.update(visible=v) for v in VISIBLE.get(m, VISIBLE["karcher"])]

        method.change(on_method, method, [weights, t, alpha, multiplier, karcher_iter, base], queue=False)
        # karcher_tol follows karcher_iter's visibility
        method.change(lambda m: gr.update(visible=m == "karcher"), method, karcher_tol, queue=False)

        def on_preview(*values):
            try:
                return service.recipe_preview(request(*values))
            except MergeError as exc:
                return f"// not ready: {exc}"

        for component in merge_inputs:
            component.change(on_preview, merge_inputs, recipe, queue=False)

        def on_refresh(chosen, b, hyper_chosen, inspect_chosen):
            return choice_updates(chosen or [], b, hyper_chosen or [], inspect_chosen or [])

        refresh.click(on_refresh, pickers, pickers, api_name="manifold_merge_refresh")

        def on_save(m, chosen, w, t_, a, mult, it, tol, b, n, dt, dev, progress=gr.Progress()):
            try:
                message, title = service.save(request(m, chosen, w, t_, a, mult, it, tol, b, n, dt, dev),
                                              _ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return (_error(exc), "", gr.update(visible=False)) + tuple(gr.update() for _ in pickers)
            return (message, title, gr.update(visible=service.host.can_switch)) + \
                choice_updates(models=chosen or [], base=b)

        save.click(on_save, merge_inputs, [status, saved_title, switch] + pickers, api_name="manifold_merge_save")

        def on_load(m, chosen, w, t_, a, mult, it, tol, b, n, dt, dev, progress=gr.Progress()):
            try:
                return service.merge_and_load(request(m, chosen, w, t_, a, mult, it, tol, b, n, dt, dev),
                                              _ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc)

        load.click(on_load, merge_inputs, status, api_name="manifold_merge_load")

        def on_switch(title):
            try:
                return service.switch_to(title)
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc)

        switch.click(on_switch, saved_title, status, api_name="manifold_merge_switch")
        cancel.click(service.cancel, None, status, queue=False, api_name="manifold_merge_cancel")

        # ---- Hyper-merge events
        def on_hyper(chosen, rank_text, rounds, n, dt, progress=gr.Progress()):
            try:
                out = service.hyper(list(chosen or []), rank_text, int(rounds), n, dt,
                                    ui_progress=_ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return (_error(exc), "", gr.update(), "") + tuple(gr.update() for _ in pickers)
            return (out["message"], out["multipliers"], _frame(out["headers"], out["rows"]), out["chart"]) + \
                choice_updates(hyper=chosen or [])

        hyper_run.click(on_hyper, [hyper_models, ranks, iterations, hyper_name, hyper_dtype],
                        [hyper_status, multipliers, hyper_table, hyper_chart] + pickers,
                        api_name="manifold_merge_hyper")
        hyper_cancel.click(service.cancel, None, hyper_status, queue=False, api_name="manifold_merge_hyper_cancel")

        # ---- Inspect events
        def on_inspect(chosen, progress=gr.Progress()):
            try:
                out = service.inspect(list(chosen or []), _ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc), gr.update(), "", ""
            sim = out["similarity"]
            note = (f"Compared {sim['keys_compared']} tensors." if sim else "Pick two or more to compare them.")
            return note, _frame(out["headers"], out["rows"]), out["heatmap"], out["metadata"]

        inspect_run.click(on_inspect, inspect_models, [inspect_status, inspect_table, heatmap, metadata],
                          api_name="manifold_merge_inspect")
    return tab

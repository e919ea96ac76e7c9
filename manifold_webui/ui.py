"""The Manifold Merge tab as a gradio Blocks, for gradio 3.41 (A1111, reForge) and 4.40 (Forge, standalone).

Only constructs and keyword arguments that both versions accept are used, and
every handler returns `gr.update(...)` (never `gr.X.update`). The handlers are
thin: they build a request, call `MergeService`, and turn its result or its
error message into component updates. Event names (api_name) are prefixed
because A1111 shares one API namespace between all extensions.
"""
from __future__ import annotations

import html
import traceback

import gradio as gr

from merge_core import registry
from merge_core.errors import MergeError
from merge_core.registry import Param

from .service import (DTYPES, INSPECT_COLUMNS, METHOD_LABELS, NONE, MergeRequest, MergeService,
                      NeedsConfirmation, friendly, without_hash)

DEVICES = ("host", "auto", "cpu", "cuda")
# The HTTP API's first positions stay as they were; parameters of methods added later follow `device`.
LEGACY_ORDER = ("weights", "t", "alpha", "multiplier", "karcher_iter", "karcher_tol")
MAX_BLOCK_SLIDERS = 26  # SD1/SD2's list form; SDXL shows 20; SD3/Flux (41/60 blocks) are edited as text


def _plain_markdown(text: str) -> str:
    """A method's help as literal text in Markdown (its formulas hold * and _), in the tab's words."""
    text = text.replace("(needs --base)", "(needs a base model)").replace("--base", "a base model")
    return "".join("\\" + c if c in "\\`*_{}[]<>#|" else c for c in text)


def method_help() -> str:
    lines = [f"**{m.name}**: {_plain_markdown(m.help)}" for m in registry.all_methods()]
    labels = [registry.get(m).label for m in registry.base_methods()]
    bases = ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else "".join(labels)
    return " · ".join(lines) + f". With a base model, {bases} merge the differences from the base (task vectors)."


def method_params() -> list[Param]:
    """One control per parameter name across all methods (first declaration wins), legacy ones first."""
    seen: dict[str, Param] = {}
    for method in registry.all_methods():
        for p in method.params:
            seen.setdefault(p.name, p)
    legacy = [seen.pop(n) for n in LEGACY_ORDER if n in seen]
    return legacy + list(seen.values())


def merge_input_names() -> list[str]:
    """The Merge tab's inputs in the order its events (and their HTTP API: /manifold_merge_save and
    /manifold_merge_load) take them: the first twelve as before, then later methods' parameters, then the
    block weights and the overrides."""
    names = [p.name for p in method_params()]
    legacy = [n for n in LEGACY_ORDER if n in names]
    return ["method", "models"] + legacy + ["base", "name", "dtype", "device"] + \
        [n for n in names if n not in LEGACY_ORDER] + ["blocks", "overrides"] + list(OUTPUT_OPTIONS)


# The Merge tab's output options, after the block weights in its inputs (MergeRequest fields).
OUTPUT_OPTIONS = ("vae", "discard", "drop_ema", "shared_only", "overwrite")


def visible_params(method_name: str) -> set[str]:
    try:
        return {p.name for p in registry.get(method_name).params}
    except MergeError:
        return set()


def _control(p: Param, visible: bool):
    """The widget a parameter's declaration asks for."""
    elem_id = f"manifold_merge_{p.name}"
    label = p.label or p.name
    if p.per_model:
        return gr.Textbox(label=f"{label}, one per model in the order picked (empty = default)",
                          placeholder="e.g. 1 1 2", visible=visible, elem_id=elem_id)
    default = p.default if not callable(p.default) and p.default is not None else (p.minimum or 0)
    lo = p.minimum if p.minimum is not None else -10.0
    hi = p.maximum if p.maximum is not None else 10.0
    if p.kind is int and hi - lo <= 200:
        return gr.Slider(lo, hi, value=default, step=1, label=label, visible=visible, elem_id=elem_id)
    if p.kind is float and hi - lo <= 20 and abs(default) >= 1e-3:
        if p.min_open:
            lo = lo + 0.01
        return gr.Slider(lo, hi, value=default, step=0.01, label=label, visible=visible, elem_id=elem_id)
    return gr.Number(value=default, label=label, visible=visible, elem_id=elem_id)


def _frame(headers, rows):
    import pandas as pd  # gradio depends on pandas in both versions
    return pd.DataFrame(rows, columns=headers)


def _error(exc: Exception) -> str:
    """The tab's message for a failed action, styled as an error (a confirmation request as a question);
    unexpected errors also go to the console with their traceback."""
    if not isinstance(exc, (MergeError, OSError)):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    text = html.escape(friendly(exc))
    if isinstance(exc, NeedsConfirmation):
        return f'<div class="manifold-merge-confirm" style="color:#b7791f;font-weight:600">⚠ {text}</div>'
    return f'<div class="manifold-merge-error" style="color:#d9534f;font-weight:600">✖ {text}</div>'


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
                gr.Markdown(method_help())
                shown = visible_params("karcher")
                params = method_params()
                controls = {}
                with gr.Row():
                    for p in params:
                        controls[p.name] = _control(p, p.name in shown)
                base = gr.Dropdown(choices=[NONE] + choices, value=NONE, label="Base model (task-vector mode)",
                                   elem_id="manifold_merge_base")
                with gr.Accordion("Block weights", open=False, elem_id="manifold_merge_blocks_section"):
                    block_note = gr.Markdown("Pick checkpoints: the blocks follow the first one's architecture.",
                                             elem_id="manifold_merge_blocks_note")
                    block_arch = gr.State(None)
                    with gr.Row():
                        block_preset = gr.Dropdown(choices=[NONE], value=NONE, label="Preset",
                                                   elem_id="manifold_merge_block_preset")
                        block_row = gr.Dropdown(choices=["1"], value="1", visible=False,
                                                label="Model row the sliders edit (Karcher/WMA: a weight per model "
                                                      "per block)", elem_id="manifold_merge_block_row")
                    sliders = []
                    for row in range(0, MAX_BLOCK_SLIDERS, 13):
                        with gr.Row():
                            for i in range(row, min(row + 13, MAX_BLOCK_SLIDERS)):
                                sliders.append(gr.Slider(0.0, 1.0, value=0.5, step=0.01, label=f"block {i}",
                                                         visible=False, min_width=60,
                                                         elem_id=f"manifold_merge_block_{i}"))
                    blocks_text = gr.Textbox(label="Block values (one line; Karcher/WMA: one line per model): a "
                                                   "comma list in the usual order, or named entries such as "
                                                   "BASE:0, IN00-IN05:0.2, M00:1, OUT*:0.8 (empty = none)",
                                             lines=2, elem_id="manifold_merge_blocks")
                    overrides_text = gr.Textbox(label="Per-key overrides, one PATTERN=VALUE per line (e.g. attn2=0.3)",
                                                lines=2, elem_id="manifold_merge_overrides")
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
                    load = gr.Button("Merge and load" if service.host.can_hot_load else
                                     "Merge and load (only inside a WebUI: here, use Save)",
                                     elem_id="manifold_merge_load", interactive=service.host.can_hot_load)
                    cancel = gr.Button("Cancel", variant="stop", elem_id="manifold_merge_cancel")
                    switch = gr.Button("Load the saved model", visible=False, elem_id="manifold_merge_switch")
                with gr.Accordion("Output options", open=False, elem_id="manifold_merge_output_options"):
                    with gr.Row():
                        vae = gr.Dropdown(choices=[NONE] + service.vaes(), value=NONE,
                                          label=f"Bake in VAE (from {service.host.vae_dir()})",
                                          elem_id="manifold_merge_vae")
                        discard = gr.Textbox(label="Discard weights matching (regular expression)",
                                             placeholder=r"e.g. ^model_ema\.|first_stage_model\.",
                                             elem_id="manifold_merge_discard")
                    with gr.Row():
                        drop_ema = gr.Checkbox(False, label="Drop EMA weights (model_ema.*)",
                                               elem_id="manifold_merge_drop_ema")
                        shared_only = gr.Checkbox(False, label="Merge shared keys only (models of different "
                                                               "architectures: the first model's other keys are kept)",
                                                  elem_id="manifold_merge_shared_only")
                        overwrite = gr.Checkbox(False, label="Overwrite an existing file (asks to confirm)",
                                                elem_id="manifold_merge_overwrite")
                status = gr.Markdown("", elem_id="manifold_merge_status")
                saved_title = gr.Textbox("", visible=False, elem_id="manifold_merge_saved_title")
                armed = gr.State("")
                with gr.Accordion("Run a recipe (chains of merges, key by key, no intermediate files)", open=False,
                                  elem_id="manifold_merge_recipe_run_section"):
                    recipe_text = gr.Code(language="yaml", label="Recipe (YAML: inputs are checkpoint names from "
                                                                 "the list; see docs/recipes.md)",
                                          elem_id="manifold_merge_recipe_text", interactive=True)
                    with gr.Row():
                        recipe_file = gr.File(label="or load a recipe file (.yaml/.json)", file_types=[".yaml", ".yml",
                                                                                                   ".json"],
                                              elem_id="manifold_merge_recipe_file")
                        recipe_name = gr.Textbox(label="Output name (empty: the recipe's output)",
                                                 elem_id="manifold_merge_recipe_name")
                    recipe_run = gr.Button("Run recipe", variant="primary", elem_id="manifold_merge_recipe_run")
                    recipe_status = gr.Markdown("", elem_id="manifold_merge_recipe_status")
                    recipe_title = gr.Textbox("", visible=False, elem_id="manifold_merge_recipe_title")
                with gr.Accordion("Recipe written into the file's metadata", open=True,
                                  elem_id="manifold_merge_recipe_box") as recipe_box:
                    recipe = gr.Code(language="json", label="Recipe", elem_id="manifold_merge_recipe")

            # ---------------------------------------------------------------- Hyper-merge
            with gr.Tab("Hyper-merge", elem_id="manifold_merge_tab_hyper"):
                gr.Markdown("M checkpoints → one hyper checkpoint (checkpoint folder) + K LoRAs (LoRA folder); "
                            "each model is the hyper checkpoint plus the LoRAs at its own strengths (the tags).")
                with gr.Row():
                    hyper_models = gr.Dropdown(choices=choices, value=[], multiselect=True, label="Checkpoints",
                                               elem_id="manifold_merge_hyper_models", scale=8)
                    hyper_refresh = gr.Button("Refresh", elem_id="manifold_merge_hyper_refresh", scale=1)
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
                hyper_payload = gr.Textbox("", visible=False, elem_id="manifold_merge_hyper_payload")
                hyper_result = gr.State(None)
                multipliers = gr.Textbox(label="Prompt tags per model (copy into your prompt)", lines=4,
                                         show_copy_button=True, elem_id="manifold_merge_hyper_tags")
                hyper_table = gr.Dataframe(headers=["model", "λ per LoRA", "error (LoRA layers)", "error (all)"],
                                           label="Report", interactive=False, elem_id="manifold_merge_hyper_table")
                hyper_chart = gr.HTML("", elem_id="manifold_merge_hyper_chart")

            # ---------------------------------------------------------------- Inspect
            with gr.Tab("Inspect", elem_id="manifold_merge_tab_inspect"):
                with gr.Row():
                    inspect_models = gr.Dropdown(choices=choices, value=[], multiselect=True, label="Checkpoints",
                                                 elem_id="manifold_merge_inspect_models", scale=8)
                    inspect_refresh = gr.Button("Refresh", elem_id="manifold_merge_inspect_refresh", scale=1)
                inspect_run = gr.Button("Inspect and compare", variant="primary", elem_id="manifold_merge_inspect_run")
                inspect_status = gr.Markdown("", elem_id="manifold_merge_inspect_status")
                inspect_table = gr.Dataframe(headers=list(INSPECT_COLUMNS), label="Models", interactive=False,
                                              elem_id="manifold_merge_inspect_table")
                heatmap = gr.HTML("", elem_id="manifold_merge_heatmap")
                block_similarity = gr.HTML("", elem_id="manifold_merge_block_similarity")
                with gr.Accordion("Metadata", open=False):
                    metadata = gr.Code(language="json", label="Metadata", elem_id="manifold_merge_metadata")

        pickers = [models, base, hyper_models, inspect_models]
        legacy = [controls[n] for n in LEGACY_ORDER if n in controls]
        later = [controls[p.name] for p in params if p.name not in LEGACY_ORDER]
        merge_inputs = [method, models] + legacy + [base, name, dtype, device] + later + [
            blocks_text, overrides_text, vae, discard, drop_ema, shared_only, overwrite]
        names_in_order = [n for n in LEGACY_ORDER if n in controls] + \
            [p.name for p in params if p.name not in LEGACY_ORDER]

        def request(*values) -> MergeRequest:
            m, chosen = values[0], values[1]
            n_legacy = len(legacy)
            b, n, dt, dev = values[2 + n_legacy:6 + n_legacy]
            raw = dict(zip(names_in_order, values[2:2 + n_legacy] + values[6 + n_legacy:6 + n_legacy + len(later)]))
            options = dict(zip(OUTPUT_OPTIONS, values[-len(OUTPUT_OPTIONS):]))
            values = values[:-len(OUTPUT_OPTIONS)]
            blocks_value, overrides_value = values[-2], values[-1]
            known = {k: raw.pop(k) for k in LEGACY_ORDER if k in raw}
            if "weights" in known:
                known["weights"] = known["weights"] or ""
            for k in ("karcher_iter",):
                if k in known and known[k] is not None:
                    known[k] = int(known[k])
            return MergeRequest(method=m, models=list(chosen or []), base=b or NONE, name=n or "", dtype=dt,
                                device=dev, blocks=blocks_value or "", overrides=overrides_value or "",
                                vae=options["vae"] or NONE, discard=options["discard"] or "",
                                drop_ema=bool(options["drop_ema"]), shared_only=bool(options["shared_only"]),
                                overwrite=bool(options["overwrite"]), extra=raw, **known)

        # ---- Merge events
        param_controls = [controls[n] for n in names_in_order]

        def on_method(m, chosen):
            shown = visible_params(m)
            entry_takes_base = m in registry.base_methods()
            block_param = registry.get(m).block_param if shown or m in registry.method_names() else None
            per_model = bool(block_param and block_param.per_model)
            rows = [str(i + 1) for i in range(max(1, len(chosen or [])))]
            return [gr.update(visible=n in shown) for n in names_in_order] + \
                [gr.update(visible=entry_takes_base), gr.update(visible=per_model, choices=rows, value=rows[0])]

        method.change(on_method, [method, models], param_controls + [base, block_row], queue=False)

        def lines_of(text: str, count: int) -> list[str]:
            lines = (text or "").splitlines()
            return lines + [""] * (count - len(lines))

        def on_models_for_blocks(chosen, m):
            try:
                layout = service.block_layout(list(chosen or []))
            except Exception as exc:  # noqa: BLE001  (shown in the tab)
                return [None, _error(exc), gr.update()] + [gr.update(visible=False) for _ in sliders] + [gr.update()]
            blocks_list = layout["blocks"]
            show = len(blocks_list) <= MAX_BLOCK_SLIDERS
            note = layout["note"] + ("" if show or not blocks_list else " Edit its blocks in the text box.")
            slider_updates = [gr.update(visible=show and i < len(blocks_list),
                                        label=blocks_list[i] if i < len(blocks_list) else f"block {i}")
                              for i in range(MAX_BLOCK_SLIDERS)]
            rows = [str(i + 1) for i in range(max(1, len(chosen or [])))]
            return [layout["arch"], note, gr.update(choices=[NONE] + layout["presets"], value=NONE)] + \
                slider_updates + [gr.update(choices=rows, value=rows[0])]

        models.change(on_models_for_blocks, [models, method],
                      [block_arch, block_note, block_preset] + sliders + [block_row], queue=False)

        def row_index(m, row) -> int | None:
            param = registry.get(m).block_param
            return int(row) - 1 if param is not None and param.per_model else None

        def on_preset(arch, preset_name, m, chosen, row, text):
            if not arch or preset_name in (None, NONE):
                return [gr.update() for _ in sliders] + [gr.update()]
            values = service.preset_values(arch, preset_name)
            line = ",".join(f"{v:g}" for v in values)
            index = row_index(m, row)
            if index is None:
                new_text = line
            else:
                lines = lines_of(text, max(len(chosen or []), index + 1))
                lines[index] = line
                new_text = "\n".join(lines)
            return [gr.update(value=values[i]) if i < len(values) else gr.update() for i in range(len(sliders))] + \
                [new_text]

        block_preset.change(on_preset, [block_arch, block_preset, method, models, block_row, blocks_text],
                            sliders + [blocks_text], queue=False)

        def on_slider(arch, m, chosen, row, text, *values):
            """A moved slider rewrites its row as the full list, in the usual order (round trip)."""
            if not arch:
                return gr.update()
            from merge_core.blocks import architecture
            count = len(architecture(arch).blocks)  # the sliders' layout, from the state: no header read again
            line = ",".join(f"{float(v):g}" for v in values[:count])
            index = row_index(m, row)
            if index is None:
                return line
            lines = lines_of(text, max(len(chosen or []), index + 1))
            lines[index] = line
            return "\n".join(lines)

        for slider in sliders:
            slider.release(on_slider, [block_arch, method, models, block_row, blocks_text] + sliders, blocks_text,
                           queue=False)

        def on_text(arch, m, row, text):
            """Typed values (list or named form) move the sliders they set; others stay."""
            if not arch:
                return [gr.update() for _ in sliders] + [gr.update()]
            index = row_index(m, row) or 0
            lines = (text or "").splitlines()
            line = lines[index] if index < len(lines) else ""
            if not line.strip():
                return [gr.update() for _ in sliders] + [gr.update()]
            try:
                values = service.row_values(arch, line)
            except MergeError as exc:
                return [gr.update() for _ in sliders] + [_error(exc)]
            from merge_core.blocks import architecture
            order = list(architecture(arch).blocks)
            return [gr.update(value=values[order[i]]) if i < len(order) and order[i] in values else gr.update()
                    for i in range(len(sliders))] + [gr.update()]

        blocks_text.blur(on_text, [block_arch, method, block_row, blocks_text], sliders + [block_note], queue=False)
        block_row.change(on_text, [block_arch, method, block_row, blocks_text], sliders + [block_note], queue=False)

        def on_preview(*values):
            try:
                return service.recipe_preview(request(*values)), gr.update(visible=True)
            except MergeError as exc:
                return f"// not ready: {exc}", gr.update(visible=True)

        for component in merge_inputs:
            component.change(on_preview, merge_inputs, [recipe, recipe_box], queue=False)

        def on_refresh(chosen, b, hyper_chosen, inspect_chosen):
            return choice_updates(chosen or [], b, hyper_chosen or [], inspect_chosen or [])

        refresh.click(on_refresh, pickers, pickers, api_name="manifold_merge_refresh")
        refresh.click(lambda chosen: gr.update(choices=[NONE] + service.vaes()), vae, vae, queue=False)
        hyper_refresh.click(on_refresh, pickers, pickers, queue=False)
        inspect_refresh.click(on_refresh, pickers, pickers, queue=False)

        # One progress display per job: the job's event has the status as its only visible output; what it
        # changes elsewhere (pickers, tables) follows in a second step without a progress bar.
        def on_save(progress=gr.Progress(), *values):  # gradio puts the tracker at its position: first
            *values, armed_name = values
            try:
                req = request(*values)
                key = (req.name or "").strip()
                message, title = service.save(req, _ui_progress(progress),
                                              confirmed=bool(armed_name) and armed_name == key)
            except NeedsConfirmation as exc:
                return _error(exc), "", key  # armed: the next Save of this name replaces the file
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc), "", ""
            return message, title, ""

        def after_save(title, chosen, b):
            if not title:  # failed: no recipe box (nothing was written), pickers as they were
                return (gr.update(visible=False), gr.update(visible=False)) + tuple(gr.update() for _ in pickers)
            return (gr.update(visible=service.host.can_switch), gr.update(visible=True)) + \
                choice_updates(models=list(chosen or []), base=b)

        save.click(on_save, merge_inputs + [armed], [status, saved_title, armed], api_name="manifold_merge_save") \
            .then(after_save, [saved_title, models, base], [switch, recipe_box] + pickers, show_progress="hidden")

        def on_load(progress=gr.Progress(), *values):
            try:
                return service.merge_and_load(request(*values), _ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc)

        load.click(on_load, merge_inputs, status, api_name="manifold_merge_load")

        def on_recipe_file(upload):
            if upload is None:
                return gr.update()
            path = getattr(upload, "name", upload)
            try:
                with open(path, encoding="utf-8") as handle:
                    return handle.read(1 << 20)
            except (OSError, UnicodeDecodeError) as exc:
                return f"# could not read that file: {exc}"

        recipe_file.upload(on_recipe_file, recipe_file, recipe_text, queue=False)

        def on_recipe(progress=gr.Progress(), *values):
            text, out_name = values
            try:
                return service.run_recipe(text, out_name, _ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc), ""

        recipe_run.click(on_recipe, [recipe_text, recipe_name], [recipe_status, recipe_title],
                         api_name="manifold_merge_recipe") \
            .then(lambda title, *picked: choice_updates(*picked) if title else tuple(gr.update() for _ in pickers),
                  [recipe_title] + pickers, pickers, show_progress="hidden")

        def on_switch(title):
            try:
                return service.switch_to(title)
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc)

        switch.click(on_switch, saved_title, status, api_name="manifold_merge_switch")
        cancel.click(service.cancel, None, status, queue=False, api_name="manifold_merge_cancel")

        # ---- Hyper-merge events
        def on_hyper(progress=gr.Progress(), *values):
            chosen, rank_text, rounds, n, dt = values
            try:
                out = service.hyper(list(chosen or []), rank_text, int(rounds), n, dt,
                                    ui_progress=_ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc), "", None
            return out["message"], out["multipliers"], out

        def after_hyper(out, chosen):
            if not out:
                return (gr.update(), gr.update(), gr.update()) + tuple(gr.update() for _ in pickers)
            return (out["multipliers"], _frame(out["headers"], out["rows"]), out["chart"]) + \
                choice_updates(hyper=list(chosen or []))

        hyper_run.click(on_hyper, [hyper_models, ranks, iterations, hyper_name, hyper_dtype],
                        [hyper_status, hyper_payload, hyper_result], api_name="manifold_merge_hyper") \
            .then(after_hyper, [hyper_result, hyper_models], [multipliers, hyper_table, hyper_chart] + pickers,
                  show_progress="hidden")
        hyper_cancel.click(service.cancel, None, hyper_status, queue=False, api_name="manifold_merge_hyper_cancel")

        # ---- Inspect events
        inspect_result = gr.State(None)
        inspect_payload = gr.Textbox("", visible=False, elem_id="manifold_merge_inspect_payload")

        def on_inspect(progress=gr.Progress(), *values):
            (chosen,) = values
            try:
                out = service.inspect(list(chosen or []), _ui_progress(progress))
            except Exception as exc:  # noqa: BLE001  (shown in the tab, never a bare gradio error)
                return _error(exc), "", None
            sim = out["similarity"]
            note = (f"Compared {sim['keys_compared']} tensors." if sim else "Pick two or more to compare them.")
            return note, out["metadata"], out

        def after_inspect(out):
            if not out:
                return gr.update(), gr.update(), gr.update(), gr.update()
            return (_frame(out["headers"], out["rows"]), out["heatmap"], out.get("block_heatmap", ""),
                    out["metadata"])

        inspect_run.click(on_inspect, inspect_models, [inspect_status, inspect_payload, inspect_result],
                          api_name="manifold_merge_inspect") \
            .then(after_inspect, inspect_result, [inspect_table, heatmap, block_similarity, metadata],
                  show_progress="hidden")
    return tab

"""The A1111 / Forge / reForge extension against a stand-in `modules` package.

Runs under gradio 3.41.2 (A1111 1.10, reForge) and 4.40.0 (Forge) in separate
venvs (.ci/webui.sh); skipped where gradio is not installed, unless
MANIFOLD_REQUIRE_GRADIO=1 (set by .ci/webui.sh), which turns the skip into a failure.
"""
from __future__ import annotations

import contextlib
import html
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

from merge_core.demo import small_sd15_state_dicts, write_demo_models
from merge_core.engine import merge
from merge_core.io import save_safetensors
from merge_core.io.sources import open_model

if os.environ.get("MANIFOLD_REQUIRE_GRADIO"):
    import gradio as gr
else:
    gr = pytest.importorskip("gradio")

import webui_harness as H  # noqa: E402  (tests/contract is on sys.path under pytest)

NAMES = ["demo_model_1.safetensors", "demo_model_2.safetensors", "demo_model_3.safetensors"]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("demo"))


@pytest.fixture(params=["a1111"])
def webui(request, tmp_path, demo_models):
    ui = H.start_webui(tmp_path, demo_models, request.param)
    yield ui
    H.stop_webui()


def _service(ui):
    from manifold_webui.hosts import detect_host
    from manifold_webui.service import MergeService
    return MergeService(detect_host())


def _titles(ui, names=NAMES):
    return [ui.sd_models.get_closet_checkpoint_match(n).title for n in names]


def _assert_same_tensors(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def _read(path: Path) -> dict:
    with open_model(path) as src:
        return {k: src.load(k).clone() for k in src.keys()}


def test_script_registers_tab_and_settings_like_a1111(webui):
    assert len(webui.callbacks.ui_tabs_callbacks) == 1
    assert len(webui.callbacks.ui_settings_callbacks) == 1
    webui.callbacks.ui_settings_callbacks[0]()
    labels = webui.shared.opts.data_labels
    assert set(labels) == {"manifold_merge_dtype", "manifold_merge_device", "manifold_merge_threads",
                           "manifold_merge_keep_in_ram"}
    assert all(info.section == ("manifold_merge", "Manifold Merge") for info in labels.values())
    assert webui.shared.opts.manifold_merge_dtype == "auto" and webui.shared.opts.manifold_merge_keep_in_ram is False
    tabs = webui.callbacks.ui_tabs_callbacks[0]()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("Manifold Merge", "manifold_merge")


def test_hosts_are_told_apart(tmp_path, demo_models):
    expected = {"a1111": "WebUIHost", "forge": "ForgeHost", "reforge": "ReForgeHost"}
    for flavour, cls in expected.items():
        H.start_webui(tmp_path / flavour, demo_models, flavour)
        try:
            from manifold_webui.hosts import detect_host
            assert type(detect_host()).__name__ == cls
        finally:
            H.stop_webui()


def test_save_writes_the_core_merge_refreshes_the_list_and_reports_progress(webui, demo_models):
    from manifold_webui.service import MergeRequest
    service = _service(webui)
    req = MergeRequest(method="karcher", models=_titles(webui), weights="1 2 1", name="tab_karcher", dtype="fp16")
    message, title = service.save(req)
    out = webui.ckpt_dir / "tab_karcher.safetensors"
    assert "Saved tab_karcher.safetensors" in message and out.is_file()
    expected = merge(demo_models, "karcher", weights=[1, 2, 1], dtype="fp16").state_dict
    _assert_same_tensors(_read(out), expected)
    # the host list was rescanned and the new file is in it under its title
    assert ("list_models",) in webui.calls and title in webui.sd_models.checkpoints_list
    # the WebUI's own progress saw every tensor and the job was closed
    state = webui.shared.state
    assert ("state.begin", "Manifold Merge: save") in webui.calls and ("state.end", "Manifold Merge: save") in webui.calls
    assert state.sampling_steps == len(expected) and state.steps_seen[-1] == len(expected)
    # the recipe is in the metadata
    with open_model(out) as src:
        recipe = src.metadata["manifold_merge_recipe"]
    assert '"method": "karcher"' in recipe and "demo_model_2" in recipe


def test_merge_and_load_hands_the_merge_to_load_model_without_writing(webui, demo_models):
    from manifold_webui.service import MergeRequest
    service = _service(webui)
    before = sorted(p.name for p in webui.ckpt_dir.iterdir())
    req = MergeRequest(method="slerp", models=_titles(webui, NAMES[:2]), t=0.3, name="hot")
    message = service.merge_and_load(req)
    assert "loaded hot" in message
    (call,) = [c for c in webui.calls if c[0] == "load_model"]
    info, state_dict = call[1], call[2]
    _assert_same_tensors(state_dict, merge(demo_models[:2], "slerp", t=0.3).state_dict)
    assert info.name == "hot" and info.title.startswith("hot [")
    # a made-up file name beside the first input, never created
    assert Path(info.filename).parent == webui.ckpt_dir and not Path(info.filename).exists()
    # the host's calculate_shorthash() neither hashed the template's file nor listed the merge as a file
    assert info.shorthash == info.title[5:15] and info.title not in webui.sd_models.checkpoints_list
    # the next generation resolves the selected checkpoint to this info, so it does not reload from disk
    assert webui.sd_models.checkpoint_aliases[webui.shared.opts.sd_model_checkpoint] is info
    assert sorted(p.name for p in webui.ckpt_dir.iterdir()) == before


@pytest.mark.parametrize("webui", ["a1111", "reforge"], indirect=True)
def test_a_second_merge_and_then_an_input_file_really_load(webui, demo_models):
    """The hosts skip a load when the loaded model has the same filename (found in a real reForge run:
    the second merge was silently ignored, and so was picking the first input afterwards)."""
    from manifold_webui.service import MergeRequest
    service = _service(webui)
    service.merge_and_load(MergeRequest(method="sma", models=_titles(webui), name="first"))
    service.merge_and_load(MergeRequest(method="ema", models=_titles(webui), alpha=0.3, name="second"))
    loads = [c for c in webui.calls if c[0] == "load_model"]
    assert [c[1].name for c in loads] == ["first", "second"]
    _assert_same_tensors(webui.sd_models.model_data.sd_model.state_dict,
                         merge(demo_models, "ema", alpha=0.3).state_dict)
    assert not Path(loads[1][1].filename).exists() and loads[0][1].filename != loads[1][1].filename
    # the user picks the first input again: it is loaded from its file
    first_input = _titles(webui, NAMES[:1])[0]
    service.host.switch_to(first_input)
    assert webui.sd_models.model_data.sd_model.sd_checkpoint_info.title == first_input


def test_a_failed_host_load_is_a_message_and_the_next_generation_reloads_the_previous_file(webui, monkeypatch):
    from manifold_webui.service import MergeRequest, friendly
    service = _service(webui)
    webui.shared.opts.data["sd_model_checkpoint"] = previous = _titles(webui, NAMES[:1])[0]

    def broken_load(checkpoint_info=None, already_loaded_state_dict=None):
        webui.shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title  # hosts set it before loading
        raise RuntimeError("ERROR: Could not detect model type of: provided state dict")

    monkeypatch.setattr(webui.sd_models, "load_model", broken_load)
    before = dict(webui.sd_models.checkpoint_aliases)
    with pytest.raises(Exception) as info:
        service.merge_and_load(MergeRequest(method="sma", models=_titles(webui), name="broken"))
    text = friendly(info.value)
    assert "could not load the merge (RuntimeError: ERROR: Could not detect model type" in text
    assert webui.shared.opts.data["sd_model_checkpoint"] == previous
    assert webui.sd_models.checkpoint_aliases == before


@pytest.mark.parametrize("webui", ["a1111", "reforge"], indirect=True)
def test_a_failed_load_after_an_in_memory_merge_falls_back_to_a_real_file(webui, monkeypatch):
    """Found in a real reForge run: restoring the selection to the earlier merge (whose file is
    made up) made every later generation fail with FileNotFoundError."""
    from manifold_webui.service import MergeRequest, friendly
    service = _service(webui)
    titles = _titles(webui)
    service.merge_and_load(MergeRequest(method="sma", models=titles[1:], name="earlier"))
    assert webui.shared.opts.sd_model_checkpoint.startswith("earlier [")

    def broken_load(checkpoint_info=None, already_loaded_state_dict=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(webui.sd_models, "load_model", broken_load)
    with pytest.raises(Exception) as info:
        service.merge_and_load(MergeRequest(method="sma", models=titles, name="broken"))
    # the earlier merge's first input, a file of a kind the host loaded before, is what the next generation loads
    selected = webui.shared.opts.data["sd_model_checkpoint"]
    assert selected == titles[1] and Path(webui.sd_models.get_closet_checkpoint_match(selected).filename).is_file()
    assert f"the next generation loads {titles[1]} from its file" in friendly(info.value)
    assert not any(getattr(v, "in_memory_merge", False) for v in webui.sd_models.checkpoint_aliases.values())


def test_keep_in_ram_lets_save_write_the_loaded_merge(webui, demo_models):
    from manifold_webui.service import MergeRequest
    webui.callbacks.ui_settings_callbacks[0]()
    webui.shared.opts.manifold_merge_keep_in_ram = True
    service = _service(webui)
    req = MergeRequest(method="ema", models=_titles(webui), alpha=0.3, name="kept")
    assert "stay in RAM" in service.merge_and_load(req)
    message, _ = service.save(req)
    assert "kept in RAM" in message
    _assert_same_tensors(_read(webui.ckpt_dir / "kept.safetensors"), merge(demo_models, "ema", alpha=0.3).state_dict)


def test_settings_reach_the_merge(webui, demo_models):
    from manifold_webui.service import MergeRequest
    webui.callbacks.ui_settings_callbacks[0]()
    webui.shared.opts.manifold_merge_dtype = "fp32"
    service = _service(webui)
    assert service.host.settings().dtype == "fp32"
    assert service.device() == "cpu"  # "host" -> modules.devices.device
    service.save(MergeRequest(method="sma", models=_titles(webui), name="f32", dtype=service.host.settings().dtype))
    with open_model(webui.ckpt_dir / "f32.safetensors") as src:
        assert src.spec("model.diffusion_model.out.2.bias").dtype == torch.float32


def _nothing_written(ui, before):
    after = sorted(p.name for p in ui.ckpt_dir.iterdir())
    assert after == before, "a file was written or left behind"
    assert not [c for c in ui.calls if c[0] in ("load_model", "forge_loader")], "the running model was touched"


# case -> (what the message must say on Save, on Merge and load; None: not an error there)
BAD_INPUTS = {
    "architecture": (["xl_model", "SDXL"], ["xl_model", "SDXL"]),
    "missing": ([NAMES[2], "not found"], [NAMES[2], "not found"]),
    "taken": (["demo_model_1.safetensors already exists"], None),  # Merge and load writes no file
    "separator": (["path separators"], ["path separators"]),
    "weights": (["2 weights for 3 models"], ["2 weights for 3 models"]),
    "too_few": (["2-100 models, got 1"], ["2-100 models, got 1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_readable_errors_and_write_nothing(webui, case):
    from manifold_webui.service import MergeRequest, friendly
    service = _service(webui)
    titles = _titles(webui)
    if case == "architecture":
        save_safetensors(webui.ckpt_dir / "xl_model.safetensors", small_sd15_state_dicts(1, arch="sdxl")[0])
        webui.sd_models.list_models()
        titles = titles[:2] + _titles(webui, ["xl_model.safetensors"])
    if case == "missing":  # listed, then gone before the merge starts
        (webui.ckpt_dir / NAMES[2]).rename(webui.ckpt_dir / "moved.bin")
    before = sorted(p.name for p in webui.ckpt_dir.iterdir())
    req = MergeRequest(method="karcher", models=titles[:1] if case == "too_few" else titles,
                       name={"taken": "demo_model_1", "separator": "../escape"}.get(case, "bad"),
                       weights="1 2" if case == "weights" else "")
    for action, expected in zip((service.save, service.merge_and_load), BAD_INPUTS[case]):
        if expected is None:
            continue
        with pytest.raises(Exception) as info:
            action(req)
        text = friendly(info.value)
        assert text.startswith("Error: ") and all(part in text for part in expected), text
    _nothing_written(webui, before)
    assert not (webui.ckpt_dir.parent / "escape.safetensors").exists()


def test_cancel_and_interrupt_stop_with_nothing_written(webui):
    from merge_core.errors import MergeCancelled
    from manifold_webui.service import MergeRequest
    service = _service(webui)
    before = sorted(p.name for p in webui.ckpt_dir.iterdir())
    seen = []

    def cancel_after_ten(fraction, text):
        seen.append(fraction)
        if len(seen) == 10:
            service.cancel()

    with pytest.raises(MergeCancelled):
        service.save(MergeRequest(method="karcher", models=_titles(webui), name="cancelled"), cancel_after_ten)
    assert len(seen) == 10
    _nothing_written(webui, before)
    # the WebUI's own Interrupt button (shared.state.interrupted) stops it as well
    original = webui.shared.State.begin

    def begin_then_interrupt(self, job="(unknown)"):
        original(self, job)
        self.interrupted = True

    webui.shared.State.begin = begin_then_interrupt
    try:
        with pytest.raises(MergeCancelled):
            service.merge_and_load(MergeRequest(method="sma", models=_titles(webui), name="x"))
    finally:
        webui.shared.State.begin = original
    _nothing_written(webui, before)
    assert webui.calls[-1] == ("state.end", "Manifold Merge: merge and load")


@pytest.mark.parametrize("webui", ["forge"], indirect=True)
def test_forge_loads_through_forge_loader_and_keeps_the_model(webui, demo_models):
    from manifold_webui.service import MergeRequest
    md = webui.sd_models.model_data
    md.sd_model = object()
    md.forge_loading_parameters = {"checkpoint_info": "demo_model_1", "additional_modules": []}
    service = _service(webui)
    message = service.merge_and_load(MergeRequest(method="sma", models=_titles(webui), name="forged"))
    assert "Forge" in message
    (call,) = [c for c in webui.calls if c[0] == "forge_loader"]
    _assert_same_tensors(call[1], merge(demo_models, "sma").state_dict)
    assert ("unload_all_models",) in webui.calls
    assert md.sd_model.sd_checkpoint_info.name == "forged"
    assert md.forge_hash == str(md.forge_loading_parameters)  # forge_model_reload() will not reload from disk
    assert "sd_model_checkpoint" not in webui.shared.opts.data  # Forge's own selection is left alone
    assert ("model_loaded_callback", md.sd_model) in webui.calls
    message, title = service.save(MergeRequest(method="sma", models=_titles(webui), name="forged_file"))
    assert "switched to" in service.switch_to(title) and ("checkpoint_change", title) in webui.calls


@pytest.mark.parametrize("webui", ["reforge"], indirect=True)
def test_reforge_loads_through_load_model(webui, demo_models):
    from manifold_webui.service import MergeRequest
    service = _service(webui)
    assert type(service.host).__name__ == "ReForgeHost"
    service.merge_and_load(MergeRequest(method="wma", models=_titles(webui), name="re"))
    (call,) = [c for c in webui.calls if c[0] == "load_model"]
    _assert_same_tensors(call[2], merge(demo_models, "wma").state_dict)


def test_hyper_merge_writes_checkpoint_and_loras_into_the_host_folders(webui):
    service = _service(webui)
    out = service.hyper(_titles(webui), "4 2", 2, "tabhyper", "fp16")
    assert (webui.ckpt_dir / "tabhyper_hyper.safetensors").is_file()
    assert sorted(p.name for p in webui.lora_dir.iterdir()) == ["tabhyper_0-4.safetensors", "tabhyper_1-2.safetensors"]
    lines = out["multipliers"].splitlines()
    assert len(lines) == 3 and all("<lora:tabhyper_0-4:" in line for line in lines)
    assert out["headers"][:3] == ["model", "λ0", "λ1"] and len(out["rows"]) == 3
    assert [r[0] for r in out["rows"]] == ["demo_model_1", "demo_model_2", "demo_model_3"]
    assert out["chart"].count("<div style='display:flex") == 3


def test_inspect_reports_models_and_their_cosine_similarity(webui, demo_models):
    service = _service(webui)
    out = service.inspect(_titles(webui))
    assert [r[1] for r in out["rows"]] == ["sd1"] * 3
    sim = out["similarity"]
    flat = [torch.cat([t.flatten().double() for k, t in _read(p).items() if t.is_floating_point()])
            for p in demo_models]
    expected = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
    assert sim["cosine"][0][1] == pytest.approx(float(expected), abs=1e-9)
    assert f"{sim['cosine'][0][1]:.6f}" in out["heatmap"]


def _render_like_a1111(tabs):
    """modules/ui.py: every extension tab is rendered into one Blocks inside a TabItem."""
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tabs():
            for interface, label, ifid in tabs:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    return demo


def _merge_args(**given) -> list:
    """Positional arguments for /manifold_merge_save and /manifold_merge_load, by name (the list of the
    tab's inputs is generated from the method registry, so it grows when a method is added)."""
    from manifold_webui.ui import method_params, merge_input_names
    defaults = {p.name: (p.default if not callable(p.default) and p.default is not None else
                         ("" if p.per_model else 0)) for p in method_params()}
    defaults.update(weights="", base="(none)", dtype="auto", device="host", blocks="", overrides="", vae="(none)",
                    discard="", drop_ema=False, shared_only=False, overwrite=False)
    defaults.update(given)
    return [defaults[n] for n in merge_input_names()]


@contextlib.contextmanager
def _served(webui):
    """The tab rendered like A1111 does, served on 127.0.0.1 with the queue on; yields a gradio_client."""
    from gradio_client import Client
    demo = _render_like_a1111(webui.callbacks.ui_tabs_callbacks[0]())
    demo.queue()
    port = H.free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def test_tab_events_over_http_with_gradio_client(webui, demo_models):
    """The real gradio server and client: Save, an error, and Inspect through the tab's events."""
    with _served(webui) as client:
        args = _merge_args(method="wma", models=_titles(webui), weights="3 2 1", name="over_http")
        result = client.predict(*args, api_name="/manifold_merge_save")
        assert result[0].startswith("Saved over_http.safetensors"), result[0]
        _assert_same_tensors(_read(webui.ckpt_dir / "over_http.safetensors"),
                             merge(demo_models, "wma", weights=[3, 2, 1]).state_dict)
        result = client.predict(*args, api_name="/manifold_merge_save")
        assert "already exists" in result[0]
        result = client.predict(_titles(webui, NAMES[:2]), api_name="/manifold_merge_inspect")
        assert result[0].startswith("Compared 1130 tensors")
        result = client.predict(_titles(webui), "4 2", 1, "http_hyper", "fp16", api_name="/manifold_merge_hyper")
        assert result[0].startswith("Wrote http_hyper_hyper.safetensors"), result[0]
        assert result[1].count("<lora:http_hyper_1-2:") == 3


def test_block_weights_over_http_equal_the_cli_and_errors_use_the_tabs_words(webui, demo_models, tmp_path):
    """Block values and per-key overrides typed into the tab give the CLI's file; a bad block or parameter is
    an error in the tab's words (its labels, never a CLI flag) and writes nothing."""
    from merge_core.cli import main
    blocks = "BASE:0, IN00-IN05:0.2, M00:1, OUT*:0.8"
    with _served(webui) as client:
        args = _merge_args(method="slerp", models=_titles(webui, NAMES[:2]), t=0.3, name="bw_http", blocks=blocks,
                           overrides="attn2=0.3")
        result = client.predict(*args, api_name="/manifold_merge_save")
        assert result[0].startswith("Saved bw_http.safetensors"), result[0]
        cli_out = tmp_path / "bw_cli.safetensors"
        assert main(["merge", "--models", *map(str, demo_models[:2]), "--method", "slerp", "--t", "0.3",
                     "--blocks", blocks, "--override", "attn2=0.3", "--output", str(cli_out), "-q"]) == 0
        _assert_same_tensors(_read(webui.ckpt_dir / "bw_http.safetensors"), _read(cli_out))
        before = sorted(p.name for p in webui.ckpt_dir.iterdir())
        for bad_blocks, bad_tol, message in [("IN12:1", 1e-5, "IN12 is not an SD1.x block"),
                                             (",".join(["0.5"] * 20), 1e-5, "SDXL"),
                                             ("", float("nan"), "“Karcher tolerance” must be in (0, 1], got nan")]:
            bad = _merge_args(method="karcher", models=_titles(webui), karcher_tol=bad_tol, name="bw_bad",
                              blocks="\n".join([bad_blocks] * 3) if bad_blocks else "")
            result = client.predict(*bad, api_name="/manifold_merge_save")
            assert "manifold-merge-error" in result[0] and "Error:" in result[0], result[0]
            assert html.unescape(message) in html.unescape(result[0]) and "--" not in result[0]
        assert sorted(p.name for p in webui.ckpt_dir.iterdir()) == before


SECRET = "outside-secret-metadata"


def _outside_checkpoint(folder: Path) -> tuple[Path, str]:
    """A real checkpoint outside the models folder, and its short hash: neither may come back."""
    import hashlib
    folder.mkdir(parents=True, exist_ok=True)
    path = save_safetensors(folder / "secret.safetensors", {"w": torch.ones(4)}, {"secret": SECRET})
    return path, hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_webui_names_must_be_titles_from_the_hosts_list(webui, tmp_path):
    """The host's list decides, never get_closet_checkpoint_match (a substring of any title, and
    aliases that hold the in-memory merges): raw paths, even of a listed file, are refused."""
    from manifold_webui.hosts import shown
    from manifold_webui.service import MergeRequest, friendly
    from merge_core.errors import MergeError
    service = _service(webui)
    secret, secret_hash = _outside_checkpoint(tmp_path / "outside")
    service.merge_and_load(MergeRequest(method="sma", models=_titles(webui, NAMES[:2]), name="inmem"))
    in_memory = webui.shared.opts.sd_model_checkpoint
    before = sorted(p.name for p in webui.ckpt_dir.iterdir())
    refused = [str(secret), str(webui.ckpt_dir / NAMES[0]), "../../outside/secret.safetensors",
               "../Lora/x.safetensors", "demo_model", in_memory, "", NAMES[0] + "\0"]
    for bad in refused:
        for action in (lambda: service.inspect([bad]), lambda: service.switch_to(bad),
                       lambda: service.hyper([_titles(webui)[0], bad], "2", 1, "hy", "fp16"),
                       lambda: service.save(MergeRequest(models=_titles(webui, NAMES[:1]) + [bad], name="out"))):
            with pytest.raises(MergeError) as info:
                action()
            text = friendly(info.value)
            assert text.startswith(f"Error: {shown(bad)}: not a checkpoint in the models folder ({webui.ckpt_dir})") \
                or (bad == "" and text == "Error: save a merge first"), (bad, text)
            assert "\n" not in text and secret_hash not in text and SECRET not in text
    assert sorted(p.name for p in webui.ckpt_dir.iterdir()) == before and list(webui.lora_dir.iterdir()) == []
    # what the tab holds: full titles, and names whose " [hash]" came or went after the list was read
    rows = service.inspect([_titles(webui)[0], NAMES[1], NAMES[2] + " [0000000000]"])["rows"]
    assert [r[0] for r in rows] == ["demo_model_1", "demo_model_2", "demo_model_3"]


def _plain(message: str) -> str:
    """A status as the user reads it: the error styling's tags and mark taken off."""
    import re
    return html.unescape(re.sub(r"<[^>]+>", "", message)).strip().lstrip("✖⚠ ").strip()


def _inspect_over_http(client, names):
    result = client.predict(names, api_name="/manifold_merge_inspect")
    return _plain(result[0]), repr(result)


def test_inspect_over_http_refuses_paths_outside_the_folder(webui, tmp_path):
    """The endpoint takes any strings (the dropdown's choices are no protection): an outside file's
    metadata and hash never come back, through the tab in a WebUI or the standalone app."""
    from manifold_webui import app
    secret, secret_hash = _outside_checkpoint(tmp_path / "outside")
    with _served(webui) as client:
        for bad in (str(secret), "../../outside/secret.safetensors"):
            status, everything = _inspect_over_http(client, [bad])
            assert status.startswith(f'Error: "{bad}": not a checkpoint in the models folder'), status
            assert SECRET not in everything and secret_hash not in everything
    models = tmp_path / "standalone"
    for p in NAMES:
        models.mkdir(exist_ok=True)
        (models / p).write_bytes((webui.ckpt_dir / p).read_bytes())
    (models / "sub").mkdir()
    blocks = app.build(models)  # creates models/Lora
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    port = H.free_port()
    app.launch(blocks, port, block=False)
    try:
        from gradio_client import Client
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for bad in (str(secret), "../outside/secret.safetensors", "sub/../../outside/secret.safetensors"):
            status, everything = _inspect_over_http(client, [NAMES[0], bad])
            assert status == (f'Error: "{bad}": not a checkpoint in the models folder ({models.resolve()}); '
                              f'pick one from the list (Refresh rescans the folder)'), status
            assert SECRET not in everything and secret_hash not in everything
        status, everything = _inspect_over_http(client, [NAMES[0]])
        assert status.startswith("Pick two or more") and '"demo": "manifold-merge"' in everything
    finally:
        blocks.close()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def _event(blocks, api_name):
    if isinstance(blocks.fns, dict):  # gradio 4
        (fn,) = [f.fn for f in blocks.fns.values() if f.api_name == api_name]
    else:  # gradio 3: the api names are in the dependency list, in the same order
        (fn,) = [f.fn for f, dep in zip(blocks.fns, blocks.dependencies) if dep["api_name"] == api_name]
    return fn


def test_refresh_keeps_selections_when_titles_gain_a_hash(webui):
    """A1111 shows "name.safetensors" until a file is hashed, then "name.safetensors [hash]"."""
    blocks = webui.callbacks.ui_tabs_callbacks[0]()[0][0]
    titles = _titles(webui)
    bare = [t.split(" [")[0] for t in titles]
    assert bare != titles
    models, base, hyper, inspect = _event(blocks, "manifold_merge_refresh")(bare[:2], bare[2], [bare[1]], [])
    assert models["value"] == titles[:2] and base["value"] == titles[2]
    assert hyper["value"] == [titles[1]] and inspect["value"] == []
    models, base, _, _ = _event(blocks, "manifold_merge_refresh")(["gone.safetensors"], "gone.safetensors", [], [])
    assert models["value"] == [] and base["value"] == "(none)" and "gone.safetensors" not in models["choices"]


def test_install_py_installs_only_missing_non_torch_requirements(tmp_path):
    fake = tmp_path / "fake_launch"
    fake.mkdir()
    log = tmp_path / "pip.log"
    (fake / "launch.py").write_text(
        "import os\n"
        "def is_installed(name):\n    return name.lower() in ('safetensors', 'numpy')\n"
        "def run_pip(command, desc=None):\n"
        f"    open({str(log)!r}, 'a').write(command + '\\n')\n")
    reqs = tmp_path / "ext"
    reqs.mkdir()
    (reqs / "install.py").write_text((H.ROOT / "install.py").read_text())
    (reqs / "requirements.txt").write_text("torch>=2.0\nsafetensors>=0.4\nnumpy\ntqdm>=4.60  # progress\n"
                                           "xformers\npyyaml>=6\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    subprocess.run([sys.executable, str(reqs / "install.py")], check=True, env=env)
    assert log.read_text().splitlines() == ['install "tqdm>=4.60"', 'install "pyyaml>=6"']
    # ComfyUI-Manager runs it too, without a `launch` module: it must do nothing and succeed
    log.unlink()
    done = subprocess.run([sys.executable, str(reqs / "install.py")], env=dict(os.environ, PYTHONPATH=""))
    assert done.returncode == 0 and not log.exists()


def test_standalone_host_refuses_merge_and_load_and_lists_the_folder(tmp_path, demo_models):
    from manifold_webui.hosts import Host
    from manifold_webui.service import MergeRequest, MergeService
    from merge_core.errors import MergeError
    for p in demo_models:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora" / "not_a_checkpoint.safetensors").write_bytes(b"")
    service = MergeService(Host(tmp_path))
    assert service.checkpoints() == NAMES
    with pytest.raises(MergeError, match="use Save"):
        service.merge_and_load(MergeRequest(models=NAMES, name="x"))
    message, title = service.save(MergeRequest(models=NAMES, name="standalone"))
    assert title == "standalone.safetensors" and title in service.checkpoints()


def test_cancel_reaches_a_running_job_over_http(webui):
    """Cancel is a queue-free event, so it gets through while the (queued) job runs."""
    with _served(webui) as client:
        job = client.submit(_titles(webui), "32 32", 200, "slow", "fp16", api_name="/manifold_merge_hyper")
        deadline = time.time() + 60
        while not any(c[0] == "state.begin" for c in webui.calls) and time.time() < deadline:
            time.sleep(0.05)
        client.predict(api_name="/manifold_merge_hyper_cancel")
        message = _plain(job.result(timeout=120)[0])
        assert message.startswith("Cancelled"), message
        assert webui.calls[-1] == ("state.end", "Manifold Merge: hyper-merge")
        assert list(webui.lora_dir.iterdir()) == []
        assert not list(webui.ckpt_dir.glob("slow*")) and not list(webui.ckpt_dir.glob(".slow*"))


A1111_SESSION = r'''
import importlib.util, sys
root, fakes, models = sys.argv[1:4]
sys.path.insert(0, fakes)
# modules/scripts.py load_scripts: the extension root is on sys.path only while its script loads
saved = list(sys.path)
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("manifold_merge.py", root + "/scripts/manifold_merge.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
sys.path[:] = saved
assert root not in sys.path
from modules import paths, script_callbacks, sd_models
paths.models_path = models
sd_models.model_path = models + "/Stable-diffusion"
sd_models.list_models()
script_callbacks.ui_settings_callbacks[0]()
(blocks, title, elem_id), = script_callbacks.ui_tabs_callbacks[0]()
service = sys.modules["manifold_webui.service"]
svc = service.MergeService(sys.modules["manifold_webui.hosts"].detect_host())
names = [sd_models.get_closet_checkpoint_match(n).title for n in ("demo_model_1", "demo_model_2")]
print(svc.save(service.MergeRequest(method="slerp", models=names, name="late_imports"))[0])
print(svc.inspect(names)["rows"][0][1])
print(svc.hyper(names, "2", 1, "late", "fp16")["message"])
'''


def test_everything_imports_after_the_extension_root_left_sys_path(webui):
    """A1111 removes the extension root from sys.path once the script is loaded; every later import
    (when the tab is built, on every click) must still work. Run in a clean interpreter (-I), where
    nothing else puts the repository on sys.path."""
    done = subprocess.run([sys.executable, "-I", "-c", A1111_SESSION, str(H.ROOT), str(H.CONTRACT / "fake_webui"),
                           str(webui.ckpt_dir.parent)], cwd=webui.ckpt_dir.parent, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Saved late_imports.safetensors") and lines[1] == "sd1"
    assert lines[2].startswith("Wrote late_hyper.safetensors")
    assert (webui.ckpt_dir / "late_imports.safetensors").is_file() and (webui.lora_dir / "late_0-2.safetensors").is_file()

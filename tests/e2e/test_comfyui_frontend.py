"""The node pack's front end in a real ComfyUI page: headless Chromium on a headless server (127.0.0.1).

ComfyUI serves its own front end (the comfyui-frontend-package of its environment) and this pack's
javascript/ folder; the tests add and load nodes through `window.app` and read the graph back:
- Merge checkpoints / Moving average show only the chosen method's widgets (from the node definition), and
  hidden widgets keep their values and their place in widgets_values and in the queued prompt;
- model sockets beyond a node's minimum appear one at a time as models are connected (and go again);
  ckpt_3..ckpt_8 appear one at a time as checkpoints are picked;
- the hyper LoRA loader's source_model is a drop-down of the chosen set's models (read from the LoRA metadata);
- every example workflow in workflows/ loads with no missing node type and no console error.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: the python that runs it) and
playwright (Python) and a Chromium are present (Debian's /usr/bin/chromium or $CHROMIUM; Playwright's own
browser download is not used). Runs with any python that has playwright and pytest, e.g.
    COMFYUI_DIR=$PWD/_hosts/ComfyUI COMFYUI_PYTHON=$PWD/.venv-comfy/bin/python \\
      .venv-gradio4/bin/python -m pytest -c tests/pytest.ini tests/e2e/test_comfyui_frontend.py
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from comfy_server import get_json, post_json, serve  # tests/e2e is on sys.path under pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run", allow_module_level=True)
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytest.importorskip("playwright")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)
from playwright.sync_api import sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# every checkpoint the example workflows name (empty files: the pickers only list names)
CHECKPOINTS = ["model_a.safetensors", "model_b.safetensors", "model_c.safetensors", "base.safetensors",
               "epoch_1.safetensors", "epoch_2.safetensors", "epoch_3.safetensors", "mix_hyper.safetensors",
               "tuned.safetensors"]
HYPER = {"mix_0-4": {"model_a": 0.5, "model_b": -0.5}, "mix_1-2": {"model_a": 0.1, "model_b": 0.2},
         "other_0-8": {"x": 1.0, "y": 2.0}}


def _write_lora(path: Path, lambdas: dict):
    """A one-tensor safetensors file carrying a hyper set's metadata (what the loader's drop-down reads)."""
    header = json.dumps({"__metadata__": {"manifold_hyper_lambdas": json.dumps(lambdas)},
                         "x.lora_up.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_fe")
    for sub in ("checkpoints", "loras", "custom_nodes", "output", "user/default"):
        (base / sub).mkdir(parents=True)
    for name in CHECKPOINTS:
        (base / "checkpoints" / name).write_bytes(b"")
    for name, lambdas in HYPER.items():
        _write_lora(base / "loras" / f"{name}.safetensors", lambdas)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    os.symlink(ROOT, base / "custom_nodes" / "manifold_merge")
    (base / "paths.yaml").write_text(f"e2e:\n  base_path: {base}\n  checkpoints: checkpoints\n  loras: loras\n"
                                     f"  custom_nodes: custom_nodes\n")
    with serve(base, ("--user-directory", str(base / "user"))) as url:
        yield url, base


@pytest.fixture(scope="module")
def page(server):
    url, base = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.console_log = []
        pg.on("console", lambda m: pg.console_log.append((m.type, f"{m.text} {m.location.get('url') or ''}")))
        pg.on("pageerror", lambda e: pg.console_log.append(("pageerror", f"{e} {e.stack}")))
        pg.goto(url)
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                             "LiteGraph.registered_node_types.ManifoldMergeCheckpoints && "
                             "LiteGraph.registered_node_types.ManifoldMergeCheckpoints.__manifold",
                             timeout=120_000)
        pg.evaluate(HELPERS)
        yield pg
        browser.close()


# Helpers in the page: nodes are added with LiteGraph.createNode + app.graph.add (as the node menu does); widget
# changes go through the widget's setValue (as picking a value in the drop-down does).
HELPERS = """() => {
  const h = {};
  h.add = (type) => { const n = LiteGraph.createNode(type); app.graph.add(n); return n; };
  h.node = (id) => app.graph.getNodeById(id);
  h.visible = (n) => n.widgets.filter((w) => !w.hidden).map((w) => w.name);
  h.hidden = (n) => n.widgets.filter((w) => w.hidden).map((w) => w.name);
  h.sockets = (n) => n.inputs.filter((i) => !i.widget).map((i) => i.name);
  h.set = (n, name, value) => {  // what picking a value in the widget does (BaseWidget.setValue: callback...)
    const w = n.widgets.find((x) => x.name === name);
    if (typeof w.setValue === "function") return w.setValue(value, {e: undefined, node: n, canvas: app.canvas});
    w.value = value;
    w.callback?.(value, app.canvas, n, null, null);
  };
  h.tick = () => new Promise((r) => setTimeout(r, 50));
  h.linksConsistent = (n) => n.inputs.every((inp, i) => inp.link == null ||
      (app.graph._links.get(inp.link)?.target_slot === i && app.graph._links.get(inp.link)?.target_id === n.id));
  window.__mm = h;
}"""


def _eval(page, body: str, arg=None):
    return page.evaluate(f"async (arg) => {{ const h = window.__mm; {body} }}", arg)


def _method_widgets(server, node_type):
    url, _ = server
    spec = get_json(f"{url}/object_info/{node_type}")[node_type]["input"]["required"]["method"]
    return spec[1]["manifold"]["method_widgets"]


def test_the_extension_is_served_and_registered(server, page):
    url, _ = server
    with urllib.request.urlopen(url + "/extensions/manifold_merge/manifold_merge.js", timeout=30) as r:
        assert b"registerExtension" in r.read()
    names = _eval(page, "return app.extensions.map((e) => e.name);")
    assert "ManifoldMerge.DynamicInputs" in names
    # the page's own start-up logs 404s for a fresh user folder (user.css, workflows...); none is ours
    ours = [m for m in page.console_log if m[0] in ("error", "pageerror", "warning") and "manifold_merge" in m[1]]
    assert not ours, ours


def test_merge_checkpoints_shows_only_the_chosen_methods_widgets_and_keeps_the_others(server, page):
    shown = _method_widgets(server, "ManifoldMergeCheckpoints")
    every = {w for ws in shown.values() for w in ws}
    for method in shown:  # every registered method, as the server lists them
        visible = set(_eval(page, """const n = h.add("ManifoldMergeCheckpoints"); h.set(n, "method", arg);
                                     const v = h.visible(n); app.graph.remove(n); return v;""", method))
        assert visible & every == set(shown[method]), method
        assert {"ckpt_1", "ckpt_2", "method", "save_as", "ckpt_3"} <= visible, method
    r = _eval(page, """
        const n = h.add("ManifoldMergeCheckpoints");
        const before = n.serialize().widgets_values.length;
        h.set(n, "method", "slerp"); h.set(n, "t", 0.3);
        const slerpSize = n.size[1];
        h.set(n, "method", "karcher");
        const karcher = h.visible(n);
        const values = n.serialize().widgets_values;
        const names = n.widgets.filter((w) => w.serialize !== false).map((w) => w.name);
        const prompt = await app.graphToPrompt();
        const inputs = prompt.output[String(n.id)].inputs;
        app.graph.remove(n);
        return {before, after: values.length, t: values[names.indexOf("t")], karcher, inputs, slerpSize,
                count: n.widgets.length};""")
    assert r["before"] == r["after"] == r["count"]  # nothing removed: widgets_values keep their order
    assert r["t"] == 0.3 and "t" not in r["karcher"] and "iterations" in r["karcher"]
    assert r["inputs"]["t"] == 0.3 and r["inputs"]["method"] == "karcher"  # hidden values are still queued


def test_checkpoint_pickers_appear_one_at_a_time(page):
    r = _eval(page, """
        const n = h.add("ManifoldMergeCheckpoints");
        const pickers = () => h.visible(n).filter((w) => /^ckpt_/.test(w));
        const first = pickers();
        h.set(n, "ckpt_3", "model_c.safetensors");
        const second = pickers();
        h.set(n, "ckpt_4", "base.safetensors");
        const third = pickers();
        h.set(n, "ckpt_4", "(none)");
        const back = pickers();
        const hyper = h.add("ManifoldMergeHyperMerge");
        const hyperFirst = h.visible(hyper).filter((w) => /^ckpt_/.test(w));
        h.set(hyper, "ckpt_3", "model_c.safetensors");
        const hyperSecond = h.visible(hyper).filter((w) => /^ckpt_/.test(w));
        app.graph.remove(n); app.graph.remove(hyper);
        return {first, second, third, back, hyperFirst, hyperSecond};""")
    assert r["first"] == ["ckpt_1", "ckpt_2", "ckpt_3"]  # (the method's widgets are checked above)
    assert r["second"] == ["ckpt_1", "ckpt_2", "ckpt_3", "ckpt_4"]
    assert r["third"] == ["ckpt_1", "ckpt_2", "ckpt_3", "ckpt_4", "ckpt_5"]
    assert r["back"] == r["second"]
    assert r["hyperFirst"] == ["ckpt_1", "ckpt_2", "ckpt_3"] and r["hyperSecond"][-1] == "ckpt_4"


def test_moving_average_shows_alpha_for_ema_and_weights_for_wma(server, page):
    assert _method_widgets(server, "ManifoldMergeMovingAverageModel") == {"sma": [], "ema": ["alpha"],
                                                                         "wma": ["weights"]}
    r = _eval(page, """
        const n = h.add("ManifoldMergeMovingAverageModel");
        const out = {};
        for (const m of ["sma", "ema", "wma"]) { h.set(n, "method", m); out[m] = h.visible(n); }
        app.graph.remove(n);
        return out;""")
    assert r["sma"] == ["method"] and r["ema"] == ["method", "alpha"] and r["wma"] == ["method", "weights"]


def test_model_sockets_appear_as_models_are_connected(page):
    r = _eval(page, """
        const loader = h.add("CheckpointLoaderSimple");
        const n = h.add("ManifoldMergeKarcherModel");
        const steps = [{sockets: h.sockets(n), visible: h.visible(n)}];
        for (let k = 1; k <= 8; k++) {
          const free = n.inputs.findIndex((i) => i.name === "model" + k);
          loader.connect(0, n, free);
          await h.tick();
          steps.push({sockets: h.sockets(n), visible: h.visible(n), ok: h.linksConsistent(n)});
        }
        n.disconnectInput(n.inputs.findIndex((i) => i.name === "model8")); await h.tick();
        n.disconnectInput(n.inputs.findIndex((i) => i.name === "model7")); await h.tick();
        const afterDisconnect = h.sockets(n);
        const bw = h.add("ManifoldMergeBlockWeights");
        bw.connect(0, n, n.inputs.findIndex((i) => i.name === "block_weights")); await h.tick();
        const prompt = await app.graphToPrompt();
        const inputs = prompt.output[String(n.id)].inputs;
        const ok = h.linksConsistent(n);
        const clip = h.add("ManifoldMergeWeightedSumClip");
        const slerp = h.add("ManifoldMergeSlerpModel");
        const moving = h.add("ManifoldMergeMovingAverageClip");
        const others = {clip: h.sockets(clip), slerp: h.sockets(slerp), moving: h.sockets(moving)};
        for (const x of [loader, n, bw, clip, slerp, moving]) app.graph.remove(x);
        return {steps, afterDisconnect, inputs, ok, others};""")
    steps = r["steps"]
    tail = ["base_model", "block_weights"]  # Karcher takes a base (task-vector mode): new sockets go before it
    assert steps[0]["sockets"] == ["model1", "model2", "model3", *tail]
    assert {"weight1", "weight2", "weight3"} <= set(steps[0]["visible"]) and "weight4" not in steps[0]["visible"]
    assert steps[2]["sockets"] == ["model1", "model2", "model3", *tail]  # 2 connected: one free more
    assert steps[3]["sockets"] == ["model1", "model2", "model3", "model4", *tail]
    assert "weight4" in steps[3]["visible"] and "weight5" not in steps[3]["visible"]
    assert steps[8]["sockets"] == [f"model{i}" for i in range(1, 9)] + tail
    assert all(s["ok"] for s in steps[1:])
    assert r["afterDisconnect"] == [f"model{i}" for i in range(1, 8)] + tail
    assert r["ok"] and [f"model{i}" for i in range(1, 7)] == [k for k in r["inputs"] if k.startswith("model")]
    assert r["inputs"]["block_weights"][1] == 0
    assert r["others"]["slerp"] == ["model_a", "model_b", "base_model", "block_weights"]
    assert r["others"]["clip"] == ["clip_a", "clip_b", "block_weights"]
    assert r["others"]["moving"] == ["clip1", "clip2", "clip3", "block_weights"]


def test_a_workflow_saved_with_every_socket_loads_with_its_links(page):
    """Before the front end, a Karcher node serialised all 8 model sockets: it loads, connected ones keep their
    links, the unconnected tail goes (one free socket stays) and the values are the saved ones."""
    wf = json.loads((ROOT / "workflows" / "karcher_merge.json").read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "ManifoldMergeKarcherModel")
    node["inputs"] += [{"name": f"model{i}", "type": "MODEL", "link": None} for i in range(4, 9)]
    node["widgets_values"] = [2.0, 3.0, 12, 1e-4, 4.0, 5.0, 6.0]  # weight1, weight2, iterations, tolerance, w3..
    r = _eval(page, """
        await app.loadGraphData(arg, true, false);
        const n = app.graph.nodes.find((x) => x.type === "ManifoldMergeKarcherModel");
        const prompt = await app.graphToPrompt();
        return {sockets: h.sockets(n), ok: h.linksConsistent(n), values: n.serialize().widgets_values,
                inputs: prompt.output[String(n.id)].inputs};""", wf)
    assert r["sockets"] == ["model1", "model2", "model3", "model4", "base_model", "block_weights"] and r["ok"]
    assert r["values"][:7] == [2.0, 3.0, 12, 1e-4, 4.0, 5.0, 6.0]
    assert r["inputs"]["weight3"] == 4.0 and r["inputs"]["iterations"] == 12
    assert [r["inputs"][f"model{i}"][0] for i in (1, 2, 3)] == ["1", "2", "3"]


def test_hyper_lora_loader_source_model_lists_the_chosen_sets_models(server, page):
    url, _ = server
    spec = get_json(f"{url}/object_info/ManifoldMergeHyperLoraLoader")["ManifoldMergeHyperLoraLoader"]["input"]
    assert spec["required"]["hyper_set"][0] == ["mix", "other"]
    assert spec["required"]["source_model"][0][1:] == ["mix / model_a", "mix / model_b", "other / x", "other / y"]
    r = _eval(page, """
        const n = h.add("ManifoldMergeHyperLoraLoader");
        const w = n.widgets.find((x) => x.name === "source_model");
        const mix = [...w.options.values];
        h.set(n, "source_model", "mix / model_b");
        h.set(n, "hyper_set", "other");
        const other = {values: [...w.options.values], value: w.value};
        app.graph.remove(n);
        return {mix, other};""")
    none = spec["required"]["source_model"][0][0]
    assert r["mix"] == [none, "mix / model_a", "mix / model_b"]
    assert r["other"] == {"values": [none, "other / x", "other / y"], "value": "other / x"}
    old = json.loads((ROOT / "workflows" / "hyper_lora_loader.json").read_text())
    loader = next(n for n in old["nodes"] if n["type"] == "ManifoldMergeHyperLoraLoader")
    loader["widgets_values"] = ["mix", "model_b", ""]  # typed when source_model was a text field
    r = _eval(page, """
        await app.loadGraphData(arg, true, false);
        const n = app.graph.nodes.find((x) => x.type === "ManifoldMergeHyperLoraLoader");
        const prompt = await app.graphToPrompt();
        return prompt.output[String(n.id)].inputs.source_model;""", old)
    assert r == "model_b"
    # ComfyUI's own validation takes both forms (a typed name is not refused as "not in list")
    for value in ("model_b", "mix / model_b"):
        graph = {"L": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mix_hyper.safetensors"}},
                 "R": {"class_type": "ManifoldMergeHyperLoraLoader",
                       "inputs": {"model": ["L", 0], "clip": ["L", 1], "hyper_set": "mix", "source_model": value,
                                  "manual_strengths": ""}},
                 "S": {"class_type": "ModelSave", "inputs": {"model": ["R", 0], "filename_prefix": "fe/never"}}}
        post_json(url + "/interrupt", {})
        res = post_json(url + "/prompt", {"prompt": graph, "client_id": "fe"})  # (the empty checkpoint then fails)
        assert "prompt_id" in res and not res.get("node_errors"), res


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_in_the_front_end(page, path):
    wf = json.loads(path.read_text())
    start = len(page.console_log)
    r = _eval(page, """
        await app.loadGraphData(arg, true, false);
        await h.tick();
        const missing = arg.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types));
        const nodes = app.graph.nodes.map((n) => ({type: n.type, errors: !!n.has_errors,
                                                   links: h.linksConsistent(n)}));
        const prompt = await app.graphToPrompt();
        return {missing, nodes, queued: Object.values(prompt.output).map((n) => n.class_type),
                dialogs: document.querySelectorAll(".p-dialog").length};""", wf)
    assert r["missing"] == [] and r["dialogs"] == 0, r
    assert len(r["nodes"]) == len(wf["nodes"]) and not any(n["errors"] for n in r["nodes"]), r["nodes"]
    assert all(n["links"] for n in r["nodes"])
    errors = [m for m in page.console_log[start:] if m[0] in ("error", "pageerror")]
    assert not errors, errors
    expected = {n["type"] for n in wf["nodes"] if n["type"] != "Note" and n["mode"] == 0}
    assert set(r["queued"]) == expected  # the Note is not queued, muted save nodes neither

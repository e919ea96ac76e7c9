"""The tab's logic without gradio: names, requests, the standalone host, the charts."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from manifold_webui.charts import bar_chart, heatmap
from manifold_webui.hosts import Host, shown
from manifold_webui.service import MergeRequest, MergeService, friendly
from merge_core.errors import MergeCancelled, MergeError
from merge_core.inputs import parse_numbers, plain_name


@pytest.mark.parametrize("text,name", [("merged", "merged"), (" my-mix_2 ", "my-mix_2"),
                                       ("x.safetensors", "x"), ("a.b", "a.b")])
def test_plain_names_are_accepted(text, name):
    assert plain_name(text) == name


@pytest.mark.parametrize("text", ["", "  ", "../x", "sub/x", "a\\b", ".hidden", "c:x", "a..b"])
def test_paths_and_hidden_names_are_refused(text):
    with pytest.raises(MergeError):
        plain_name(text)


def test_parse_numbers():
    assert parse_numbers("1, 2 3.5", "w") == [1.0, 2.0, 3.5]
    assert parse_numbers(" ", "w") is None
    assert parse_numbers("64 32", "ranks", int) == [64, 32]
    with pytest.raises(MergeError, match="ranks: expected numbers"):
        parse_numbers("64 x", "ranks", int)


def test_recipe_preview_shows_normalized_weights_and_parameters():
    service = MergeService(Host("."))
    req = MergeRequest(method="karcher", models=["a.safetensors [0123456789]", "b.safetensors"], weights="1 3",
                       name="out")
    preview = service.recipe_preview(req)
    assert '"normalized_weights": [\n    0.25,\n    0.75\n  ]' in preview
    assert '"name": "a"' in preview and '"output": "out.safetensors"' in preview
    with pytest.raises(MergeError, match="takes 2 models, got 3"):
        service.recipe_preview(MergeRequest(method="slerp", models=["a", "b", "c"]))


def test_standalone_host_lists_checkpoints_but_not_loras_or_hidden_files(tmp_path):
    for name in ("b.safetensors", "A.ckpt", "sub/c.safetensors", ".d.safetensors", "notes.txt",
                 "Lora/l.safetensors", ".cache/e.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    host = Host(tmp_path)
    assert host.list_checkpoints() == ["A.ckpt", "b.safetensors", "sub/c.safetensors"]
    with pytest.raises(MergeError, match='"gone.safetensors": not a checkpoint in the models folder'):
        host.checkpoint_path("gone.safetensors")


def test_friendly_messages():
    assert friendly(MergeError("x.safetensors: bad header")) == "Error: x.safetensors: bad header"
    assert friendly(MergeCancelled("stopped")) == "Cancelled: stopped"
    assert friendly(FileNotFoundError(2, "No such file or directory", "/m/x")) == "Error: /m/x No such file or directory"


def test_heatmap_and_bars_carry_the_numbers():
    html = heatmap(["a<b", "c"], [[1.0, 0.5], [0.5, 1.0]])
    assert "a&lt;b" in html and "0.500000" in html and "60.000°" in html
    bars = bar_chart(["m1", "m2"], [0.1, 0.2], "error")
    assert "width:50.0%" in bars and "width:100.0%" in bars and "0.2000" in bars


# ---- input names are confined to the host's own list of checkpoints ------------------------------
SECRET = "outside-secret-metadata"


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    from merge_core.demo import write_demo_models
    return write_demo_models(tmp_path_factory.mktemp("demo"), 2)


@pytest.fixture
def tree(tmp_path, demo_files):
    """models/ with two demo checkpoints, a sub-folder, a directory named like a checkpoint and links
    the listing does not show; outside/ beside it with a real checkpoint whose hash must never come back."""
    from merge_core.io import save_safetensors
    models, outside = tmp_path / "models", tmp_path / "outside"
    for folder in (models / "sub", models / "Lora", models / ".hidden", models / "dir.safetensors", outside):
        folder.mkdir(parents=True)
    for p in demo_files:
        shutil.copy(p, models / p.name)
    secret = save_safetensors(outside / "secret.safetensors", {"w": torch.ones(4)}, {"secret": SECRET})
    (models / ".hidden" / "link.safetensors").symlink_to(secret)
    (models / "Lora" / "link.safetensors").symlink_to(secret)
    return models, secret, hashlib.sha256(secret.read_bytes()).hexdigest()


def _bad_names(models, secret):
    return {
        "absolute outside": str(secret),
        "absolute inside": str(models / "demo_model_1.safetensors"),  # a raw path, not a listed name
        "dotdot": "../outside/secret.safetensors",
        "dotdot after a folder": "sub/../../outside/secret.safetensors",
        "dotdot back in": "sub/../demo_model_1.safetensors",
        "symlink in a hidden folder": ".hidden/link.safetensors",
        "symlink in the LoRA folder": "Lora/link.safetensors",
        "directory": "dir.safetensors",
        "folder": "sub",
        "the folder itself": ".",
        "empty": "",
        "NUL byte": "demo_model_1.safetensors\0",
        "NUL byte in a path": f"{secret}\0.safetensors",
        "not a string": 42,
    }


def _snapshot(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.lstat(os.path.join(d, f)).st_size)
                  for d, dirs, files in os.walk(root) for f in dirs + files)


@pytest.fixture
def spies(monkeypatch):
    """Every merge_core entry point that opens a checkpoint; none may run for a refused request."""
    import merge_core.engine
    import merge_core.hyper.pipeline
    import merge_core.inspect
    import merge_core.similarity
    called = []
    for module, name in ((merge_core.inspect, "inspect_model"), (merge_core.similarity, "pairwise_cosine"),
                         (merge_core.engine, "merge"), (merge_core.hyper.pipeline, "run_hyper")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: called.append((_n, a)))
    return called


@pytest.mark.parametrize("case", list(_bad_names(Path("models"), Path("outside/secret.safetensors"))))
def test_names_outside_the_list_are_refused_before_anything_is_read(tree, spies, case):
    models, secret, secret_hash = tree
    bad = _bad_names(models, secret)[case]
    service = MergeService(Host(models))
    good = service.checkpoints()
    assert good == ["demo_model_1.safetensors", "demo_model_2.safetensors"]
    before = _snapshot(models.parent)
    actions = {
        "inspect": lambda: service.inspect([bad]),
        "inspect with a good one": lambda: service.inspect([good[0], bad]),
        "merge": lambda: service.save(MergeRequest(models=[good[0], bad], name="out")),
        "base model": lambda: service.save(MergeRequest(method="slerp", models=good, base=bad, name="out")),
        "hyper-merge": lambda: service.hyper([good[0], bad], "2", 1, "hy", "fp16"),
    }
    if bad == "":
        del actions["base model"]  # an empty base is "no base model", as "(none)" is
    for action, call in actions.items():
        with pytest.raises(MergeError) as info:
            call()
        text = friendly(info.value)
        assert text == f"Error: {shown(bad)}: not a checkpoint in the models folder ({models}); pick one from " \
                       f"the list (Refresh rescans the folder)", (action, text)
        assert "\n" not in text and "\0" not in text and secret_hash[:10] not in text and SECRET not in text
    assert spies == [], "a checkpoint was opened for a refused name"
    assert _snapshot(models.parent) == before, "something was written or deleted"


def test_a_lone_string_is_one_name_not_its_characters(tree, spies):
    models, secret, _ = tree
    with pytest.raises(MergeError, match=f'^"{secret}": not a checkpoint'):
        MergeService(Host(models)).inspect(str(secret))
    assert spies == []


def test_listed_names_still_work_and_nothing_outside_comes_back(tree):
    models, _, secret_hash = tree
    service = MergeService(Host(models))
    out = service.inspect(service.checkpoints())
    assert [r[0] for r in out["rows"]] == ["demo_model_1", "demo_model_2"] and out["similarity"] is not None
    assert secret_hash[:10] not in repr(out) and SECRET not in repr(out)


def test_links_the_user_put_into_the_folder_are_listed_and_accepted(tree):
    """The rule is the host's own list: a symlinked file or sub-folder inside the models folder (models
    kept on another drive) is the user's choice, listed, and accepted; a loop is listed once."""
    models, secret, secret_hash = tree
    (models / "mine.safetensors").symlink_to(secret)
    (models / "drive").symlink_to(secret.parent, target_is_directory=True)
    (models / "sub" / "loop").symlink_to(models, target_is_directory=True)
    (models / "dangling.safetensors").symlink_to(models / "nowhere.safetensors")
    service = MergeService(Host(models))
    listed = service.checkpoints()
    assert listed == ["dangling.safetensors", "demo_model_1.safetensors", "demo_model_2.safetensors",
                      "drive/secret.safetensors", "mine.safetensors"]
    rows = service.inspect(["mine.safetensors", "drive/secret.safetensors"])["rows"]
    assert [r[0] for r in rows] == ["mine", "secret"] and {r[5] for r in rows} == {secret_hash[:10]}
    with pytest.raises(MergeError, match='^"dangling.safetensors": checkpoint not found in the models folder'):
        service.inspect(["dangling.safetensors"])
    with pytest.raises(MergeError, match="not a checkpoint in the models folder"):
        service.inspect(["drive/../outside/secret.safetensors"])


def test_shown_names_are_one_quoted_line():
    assert shown("a\0b\nc") == '"a\\x00b\\nc"'
    assert shown(None) == "None" and shown("x" * 500).endswith('..."') and len(shown("x" * 500)) < 170


def test_block_editor_layout_presets_and_per_model_rows_save_like_the_engine(tmp_path):
    """The tab's block editor: the first model's architecture gives the sliders; a preset gives one value
    per block in the usual order; Karcher's one row per model saves the engine's file."""
    from merge_core.demo import write_demo_models
    from merge_core.engine import merge
    from merge_core.io import open_model
    folder = tmp_path / "models"
    paths = write_demo_models(folder)
    service = MergeService(Host(folder))
    names = [p.name for p in paths]
    layout = service.block_layout(names)
    assert layout["arch"] == "sd1" and len(layout["blocks"]) == 26 and layout["blocks"][0] == "BASE"
    assert "grad_in_out" in layout["presets"]
    ramp = service.preset_values("sd1", "grad_in_out")
    assert len(ramp) == 26 and ramp[1:] == sorted(ramp[1:]) and ramp[-1] == 1.0 and 0 <= min(ramp[1:]) and max(ramp) <= 1
    assert service.row_values("sd1", "BASE:0, M00:1") == {"BASE": 0.0, "M00": 1.0}
    rows = "BASE:1, OUT*:2\nBASE:1\nBASE:0, IN*:1"
    req = MergeRequest(method="karcher", models=names, name="rows", blocks=rows, overrides="")
    message, _ = service.save(req)
    expected = merge(paths, "karcher", blocks=rows.splitlines()).state_dict
    with open_model(folder / "rows.safetensors") as src:
        for key, value in expected.items():
            assert torch.equal(src.load(key), value), key
    with pytest.raises(MergeError, match="has no parameter that can vary per block"):
        service.save(MergeRequest(method="sma", models=names, name="x", blocks="BASE:0"))
    assert not (folder / "x.safetensors").exists()


def test_the_recipe_box_runs_a_chain_of_listed_checkpoints_like_the_cli(tmp_path):
    from merge_core.cli import main
    from merge_core.demo import write_demo_models
    from merge_core.io import open_model
    folder = tmp_path / "models"
    write_demo_models(folder)
    service = MergeService(Host(folder))
    text = """
inputs: {a: demo_model_1.safetensors, b: demo_model_2.safetensors, c: demo_model_3.safetensors}
steps:
  k: {method: karcher, models: [a, b, c]}
  out: {method: slerp, models: [k, a], t: 0.3, blocks: "BASE:0, OUT*:0.8"}
output: chained.safetensors
"""
    message, _ = service.run_recipe(text)
    assert message.startswith("Saved chained.safetensors") and "2 steps" in message
    (tmp_path / "r.yaml").write_text(text.replace("demo_model_", str(folder / "demo_model_")))
    assert main(["merge", "--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "cli.safetensors"),
                 "-q"]) == 0
    with open_model(folder / "chained.safetensors") as ours, open_model(tmp_path / "cli.safetensors") as cli:
        for key in cli.keys():
            assert torch.equal(ours.load(key), cli.load(key)), key
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / "demo_model_1.safetensors").read_bytes())
    before = sorted(p.name for p in folder.iterdir())
    for bad, message in [(text.replace("demo_model_3.safetensors", str(outside)), "not a checkpoint in the models"),
                         ("steps: [", "not valid YAML"), ("just text", "paste a recipe"),
                         (text, "chained.safetensors already exists")]:
        with pytest.raises(MergeError, match=message):
            service.run_recipe(bad, "" if "already" in message else "other")
    assert sorted(p.name for p in folder.iterdir()) == before

"""The tab's logic without gradio: names, requests, the standalone host, the charts."""
import pytest

from manifold_webui.charts import bar_chart, heatmap
from manifold_webui.hosts import Host
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
    with pytest.raises(MergeError, match="gone.safetensors: checkpoint not found"):
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

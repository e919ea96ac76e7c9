"""The node pack without ComfyUI: registration shape, inputs/outputs, and the host guard."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_pack(name="manifold_merge_pack"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_root_init_exports_nothing_and_imports_no_host_without_comfyui():
    pack = _load_pack()
    assert pack.NODE_CLASS_MAPPINGS == {} and pack.NODE_DISPLAY_NAME_MAPPINGS == {}
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules


@pytest.fixture
def nodes(monkeypatch, tmp_path):
    """The nodes package imported as ComfyUI would (relative imports), with a stand-in folder_paths."""
    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda kind: ["a.safetensors", "b.safetensors"] if kind == "checkpoints" else []
    fp.get_folder_paths = lambda kind: [str(tmp_path)]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    _load_pack("mm_pack_nodes")
    import importlib
    return importlib.import_module("mm_pack_nodes.nodes")


def test_every_node_has_the_v1_shape(nodes):
    mappings = nodes.NODE_CLASS_MAPPINGS
    assert set(mappings) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS) and len(mappings) == 10
    for node_id, cls in mappings.items():
        assert node_id.startswith("ManifoldMerge") and cls.CATEGORY == "Manifold Merge"
        inputs = cls.INPUT_TYPES()
        assert "required" in inputs
        assert callable(getattr(cls, cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple)


def test_karcher_node_takes_two_to_eight_weighted_inputs(nodes):
    cls = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeKarcherModel"]
    spec = cls.INPUT_TYPES()
    assert {"model1", "model2", "weight1", "weight2", "iterations", "tolerance"} <= set(spec["required"])
    assert {f"model{i}" for i in range(3, 9)} <= set(spec["optional"])
    assert cls.RETURN_TYPES == ("MODEL",)
    assert nodes.NODE_CLASS_MAPPINGS["ManifoldMergeSlerpClip"].INPUT_TYPES()["optional"] == {"base_clip": ("CLIP",)}
    ckpt = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeCheckpoints"]
    assert ckpt.RETURN_TYPES == ("MODEL", "CLIP", "VAE")
    assert ckpt.INPUT_TYPES()["required"]["ckpt_1"] == (["a.safetensors", "b.safetensors"],)


def test_collect_and_parse_helpers(nodes):
    import importlib
    common = importlib.import_module("mm_pack_nodes.nodes.common")
    items, weights = common.collect({"model1": "a", "model3": "c", "weight1": 2.0, "weight3": 0.5}, "model",
                                    with_weight=True)
    assert items == ["a", "c"] and weights == [2.0, 0.5]
    assert common.parse_numbers("0.5, 0.3 ,0.2", "w") == [0.5, 0.3, 0.2]
    assert common.parse_numbers("  ", "w") is None
    MergeError = importlib.import_module("mm_pack_nodes.merge_core.errors").MergeError  # the pack's own copy
    with pytest.raises(MergeError, match="w: expected numbers"):
        common.parse_numbers("1,x", "w")
    assert common.plain_file_name("merged", "save_as") == "merged.safetensors"
    for bad in ("sub/merged", "..\\merged", ".hidden", ""):
        with pytest.raises(MergeError, match="save_as"):
            common.plain_file_name(bad, "save_as")


BUILTIN = {"CheckpointLoaderSimple", "CheckpointSave", "ModelSave", "CLIPSave"}


def test_example_workflows_use_real_nodes_inputs_and_consistent_links(nodes):
    import json
    files = sorted((ROOT / "workflows").glob("*.json"))
    assert len(files) == 7
    used = set()
    for path in files:
        wf = json.loads(path.read_text())
        by_id = {n["id"]: n for n in wf["nodes"]}
        for node in wf["nodes"]:
            assert node["type"] in BUILTIN or node["type"] in nodes.NODE_CLASS_MAPPINGS, (path.name, node["type"])
            used.add(node["type"])
            if node["type"] in nodes.NODE_CLASS_MAPPINGS:
                spec = nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
                names = set(spec["required"]) | set(spec.get("optional", {}))
                assert {i["name"] for i in node["inputs"]} <= names, (path.name, node["type"])
        for link_id, src, slot, dst, dst_slot, typ in wf["links"]:
            assert link_id in by_id[src]["outputs"][slot]["links"]
            assert by_id[dst]["inputs"][dst_slot]["link"] == link_id and by_id[dst]["inputs"][dst_slot]["type"] == typ
    assert set(nodes.NODE_CLASS_MAPPINGS) - used <= {"ManifoldMergeSlerpClip", "ManifoldMergeMovingAverageClip"}

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


LEGACY = {"ManifoldMergeKarcherModel", "ManifoldMergeKarcherClip", "ManifoldMergeSlerpModel", "ManifoldMergeSlerpClip",
          "ManifoldMergeMovingAverageModel", "ManifoldMergeMovingAverageClip", "ManifoldMergeCheckpoints",
          "ManifoldMergeHyperMerge", "ManifoldMergeHyperLoraLoader", "ManifoldMergeExtractLora"}


def test_every_node_has_the_v1_shape(nodes):
    mappings = nodes.NODE_CLASS_MAPPINGS
    assert set(mappings) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert LEGACY | {"ManifoldMergeBlockWeights"} <= set(mappings)
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
    assert set(nodes.NODE_CLASS_MAPPINGS["ManifoldMergeSlerpClip"].INPUT_TYPES()["optional"]) == {"base_clip",
                                                                                                  "block_weights"}
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


BUILTIN = {"CheckpointLoaderSimple", "CheckpointSave", "ModelSave", "CLIPSave", "CLIPTextEncode", "EmptyLatentImage",
           "KSampler", "VAEDecode", "PreviewImage", "Note"}
BUILTIN_INPUTS = {"CheckpointSave": {"model", "clip", "vae"}, "ModelSave": {"model"}, "CLIPSave": {"clip"},
                  "CLIPTextEncode": {"clip"}, "KSampler": {"model", "positive", "negative", "latent_image"},
                  "VAEDecode": {"samples", "vae"}, "PreviewImage": {"images"}}


def test_example_workflows_use_real_nodes_inputs_and_consistent_links(nodes):
    import json
    files = sorted((ROOT / "workflows").glob("*.json"))
    assert len(files) == 9
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
                widgets = [n for n, v in {**spec["required"], **spec.get("optional", {})}.items()
                           if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
                assert len(node["widgets_values"]) <= len(widgets), (path.name, node["type"])
            elif node["type"] in BUILTIN_INPUTS:
                assert {i["name"] for i in node["inputs"]} == BUILTIN_INPUTS[node["type"]], (path.name, node["type"])
            if node["type"] == "ManifoldMergeBlockWeights":  # its text parses
                nodes.NODE_CLASS_MAPPINGS[node["type"]]().run(*node["widgets_values"])
        for link_id, src, slot, dst, dst_slot, typ in wf["links"]:
            assert link_id in by_id[src]["outputs"][slot]["links"]
            assert by_id[dst]["inputs"][dst_slot]["link"] == link_id and by_id[dst]["inputs"][dst_slot]["type"] == typ
    assert (LEGACY | {"ManifoldMergeBlockWeights"}) - used <= {"ManifoldMergeMovingAverageClip"}


def _workflow(name):
    import json
    wf = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    return wf, {n["id"]: n for n in wf["nodes"]}


@pytest.mark.parametrize("name", ["karcher_merge", "slerp_merge", "slerp_task_vector", "moving_average",
                                  "block_weights_merge", "merge_checkpoints", "hyper_lora_loader"])
def test_example_workflows_end_in_a_sampler_and_a_preview_with_a_note(name):
    """merged MODEL -> KSampler -> VAEDecode -> PreviewImage (the merge's effect at once); saves muted; a Note."""
    wf, by_id = _workflow(name)
    types_ = [n["type"] for n in wf["nodes"]]
    assert types_.count("KSampler") == 1 and "VAEDecode" in types_ and "PreviewImage" in types_
    links = {link[0]: link for link in wf["links"]}

    def source(node, input_name):
        (link,) = [i["link"] for i in node["inputs"] if i["name"] == input_name]
        return by_id[links[link][1]]

    sampler = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert source(sampler, "model")["type"].startswith("ManifoldMerge")
    preview = next(n for n in wf["nodes"] if n["type"] == "PreviewImage")
    assert source(source(preview, "images"), "samples") is sampler
    note = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(note) == 1 and len(note[0]["widgets_values"][0]) > 100
    for node in wf["nodes"]:
        if node["type"] in ("ModelSave", "CheckpointSave", "CLIPSave"):
            assert node["mode"] == 2, (name, node["type"])  # muted: queueing previews, Ctrl+M to save


def test_slerp_example_has_no_base_and_the_task_vector_example_has_one():
    for name, with_base in (("slerp_merge", False), ("slerp_task_vector", True)):
        wf, _ = _workflow(name)
        slerp = next(n for n in wf["nodes"] if n["type"] == "ManifoldMergeSlerpModel")
        assert ("base_model" in {i["name"] for i in slerp["inputs"]}) == with_base, name
    for name in ("hyper_merge", "extract_lora"):
        wf, _ = _workflow(name)
        assert [n["type"] for n in wf["nodes"]].count("Note") == 1


def test_the_front_end_reads_which_widget_belongs_to_which_method_from_the_node_definition(nodes):
    """javascript/comfyui/manifold_merge.js lists no method: the method pickers carry {method: [widgets]}, optional model
    sockets {"grow": true} and per-model widgets the socket they follow."""
    registry = _pack("merge_core.registry")
    merge_nodes = _pack("nodes.merge_nodes")
    ckpt = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeCheckpoints"].INPUT_TYPES()
    names, opts = ckpt["required"]["method"]
    shown = opts["manifold"]["method_widgets"]
    assert set(shown) == set(names) == set(registry.method_names())
    widgets = {**ckpt["required"], **ckpt["optional"]}
    for method in registry.all_methods():
        assert all(w in widgets for w in shown[method.name])
        assert len(shown[method.name]) == len(method.params), method.name  # one widget per parameter
    assert shown["slerp"] == ["t"] and shown["ema"] == ["alpha"] and shown["sma"] == []
    assert set(shown["karcher"]) == {"weights", "iterations", "tolerance"}
    assert "models/checkpoints" in ckpt["required"]["save_as"][1]["tooltip"]
    assert "models/checkpoints" in nodes.NODE_CLASS_MAPPINGS["ManifoldMergeCheckpoints"].DESCRIPTION
    moving = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeMovingAverageModel"].INPUT_TYPES()
    assert moving["required"]["method"][1]["manifold"]["method_widgets"] == {"sma": [], "ema": ["alpha"],
                                                                            "wma": ["weights"]}
    assert all(moving["optional"][f"model{i}"][1]["manifold"] == {"grow": True} for i in range(3, 9))
    karcher = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeKarcherModel"].INPUT_TYPES()
    assert karcher["required"]["model2"] == ("MODEL",) and "manifold" not in karcher["required"]["weight2"][1]
    for i in range(3, 9):
        assert karcher["optional"][f"model{i}"] == ("MODEL", {"manifold": {"grow": True}})
        assert karcher["optional"][f"weight{i}"][1]["manifold"] == {"with": f"model{i}"}
    slerp = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeSlerpModel"].INPUT_TYPES()
    assert not any(isinstance(v[-1], dict) and "manifold" in v[-1]
                   for v in {**slerp["required"], **slerp["optional"]}.values())
    js = (ROOT / "javascript" / "comfyui" / "manifold_merge.js").read_text()
    for method in registry.method_names():
        assert f'"{method}"' not in js and f"'{method}'" not in js, method
    pack = _load_pack("mm_pack_web")
    assert pack.WEB_DIRECTORY == "./javascript/comfyui" and (ROOT / pack.WEB_DIRECTORY / "manifold_merge.js").is_file()
    assert merge_nodes.FRONT_END == "manifold"


def _write_lora(path, lambdas):
    import json
    import struct
    header = json.dumps({"__metadata__": {"manifold_hyper_lambdas": json.dumps(lambdas)},
                         "x.lora_up.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")


def test_hyper_lora_loader_source_model_is_a_drop_down_of_the_sets_models(nodes, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    lora_nodes = _pack("nodes.lora_nodes")
    for name, lambdas in (("mix_0-4", {"model_a": 0.5, "model_b": -0.5}), ("mix_1-2", {"model_a": 0.1, "model_b": 0.2}),
                          ("other_0-8", {"x": 1.0})):
        _write_lora(tmp_path / f"{name}.safetensors", lambdas)
    fp = sys.modules["folder_paths"]
    monkeypatch.setattr(fp, "get_filename_list",
                        lambda kind: sorted(p.name for p in tmp_path.glob("*.safetensors")) if kind == "loras" else [])
    monkeypatch.setattr(fp, "get_full_path", lambda kind, name: str(tmp_path / name), raising=False)
    spec = lora_nodes.ManifoldMergeHyperLoraLoader.INPUT_TYPES()["required"]
    assert spec["hyper_set"] == (["mix", "other"],)
    choices, opts = spec["source_model"]
    assert choices == [lora_nodes.NO_SOURCE, "mix / model_a", "mix / model_b", "other / x"]
    assert opts["manifold"] == {"narrow_by": "hyper_set"}
    assert lora_nodes.source_name("mix", "mix / model_b") == "model_b"
    assert lora_nodes.source_name("mix", "model_b") == "model_b"  # typed in an older workflow
    assert lora_nodes.source_name("mix", "") == lora_nodes.source_name("mix", lora_nodes.NO_SOURCE) == ""
    MergeError = _pack("merge_core.errors").MergeError
    with pytest.raises(MergeError, match="a model of the hyper set 'other', but hyper_set is 'mix'"):
        lora_nodes.source_name("mix", "other / x")
    # a typed name is not refused by ComfyUI's list check (the node checks it against the set's metadata)
    assert lora_nodes.ManifoldMergeHyperLoraLoader.VALIDATE_INPUTS(source_model="model_b") is True


# --- generated merge nodes, block weights ------------------------------------------------------------------

def _pack(name):
    import importlib
    return importlib.import_module(f"mm_pack_nodes.{name}")


class FakeClip:
    def __init__(self, sd):
        self.patcher = sd

    def clone(self):
        return FakeClip(self.patcher)


@pytest.fixture
def host(nodes, monkeypatch):
    """ComfyUI's side replaced: a MODEL is a plain state dict, a CLIP a FakeClip; merges run on the CPU."""
    bridge = _pack("nodes.bridge")
    monkeypatch.setattr(bridge, "effective_weights", lambda obj, prefix=None, skip=(): dict(obj))
    monkeypatch.setattr(bridge, "torch_device", lambda: "cpu")
    monkeypatch.setattr(bridge, "intermediate_device", lambda: "cpu")
    monkeypatch.setattr(bridge, "progress_callback", lambda: None)
    monkeypatch.setattr(bridge, "patched_clone", lambda patcher, merged: merged)
    calls = []
    merge_nodes = _pack("nodes.merge_nodes")
    real = merge_nodes.merge_state_dicts

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(merge_nodes, "merge_state_dicts", spy)
    return nodes, calls


UNET = {"diffusion_model.time_embed.0.weight": ((8, 4), "BASE"),
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ((8, 768), "IN01"),
        "diffusion_model.input_blocks.4.0.in_layers.2.weight": ((8, 8), "IN04"),
        "diffusion_model.middle_block.1.proj_in.weight": ((8, 8), "M00"),
        "diffusion_model.output_blocks.3.0.skip_connection.weight": ((8, 8), "OUT03"),
        "diffusion_model.out.2.weight": ((4, 8), "OUT11")}
CLIP = {"clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (8, 8),
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.bias": (8,),
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.o_proj.bias": (8,),
        "clip_l.transformer.text_model.final_layer_norm.weight": (8,)}


def _sd(shapes, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v[0] if isinstance(v[0], tuple) else v, generator=g) for k, v in shapes.items()}


def _block_weights(nodes, arch="sd1", preset="none", text="", overrides=""):
    (bw,) = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeBlockWeights"]().run(arch, preset, text, overrides)
    return bw


def test_every_registered_method_gets_model_and_clip_nodes_from_its_params(nodes):
    registry = _pack("merge_core.registry")
    merge_nodes = _pack("nodes.merge_nodes")
    for method in registry.all_methods():
        for kind in ("MODEL", "CLIP"):
            cls = nodes.NODE_CLASS_MAPPINGS[f"ManifoldMerge{merge_nodes.class_stem(method)}{kind.title()}"]
            spec = cls.INPUT_TYPES()
            assert cls.RETURN_TYPES == (kind,) and cls.METHOD == method.name
            models = merge_nodes.model_input_names(method, kind)
            assert models[:method.min_models] == [n for n in spec["required"] if spec["required"][n] == (kind,)]
            assert set(models[method.min_models:]) <= set(spec["optional"])
            assert spec["optional"]["block_weights"][0] == "BLOCK_WEIGHTS"
            assert (f"base_{kind.lower()}" in spec["optional"]) == method.takes_base
            for p in method.params:
                if merge_nodes.per_input(p):
                    for i in range(1, len(models) + 1):
                        assert spec["required" if i <= method.min_models else "optional"][
                            merge_nodes.per_input_name(p, i)][0] == ("INT" if p.kind is int else "FLOAT")
                    continue
                kind_name, opts = spec["required"][merge_nodes.input_name(p)]
                if kind_name == "STRING":
                    assert p.per_model or p.default is None or callable(p.default)
                    continue
                assert kind_name == ("INT" if p.kind is int else "FLOAT") and opts["default"] == p.default
                if p.maximum is not None:
                    assert opts["max"] == p.maximum
                if p.minimum is not None:
                    assert opts["min"] == p.minimum if not p.min_open else opts["min"] > p.minimum
    karcher = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeKarcherModel"].INPUT_TYPES()["required"]
    assert list(karcher) == ["model1", "weight1", "model2", "weight2", "iterations", "tolerance"]
    assert karcher["tolerance"][1]["default"] == 1e-5 and karcher["tolerance"][1]["step"] <= 1e-6
    wma = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeWMAModel"].INPUT_TYPES()["required"]
    assert wma["weights"][0] == "STRING"  # its default (N..1) depends on the number of models
    moving = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeMovingAverageModel"].INPUT_TYPES()["required"]
    assert list(moving) == ["method", "model1", "model2", "alpha", "weights"]
    ckpt = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeCheckpoints"].INPUT_TYPES()
    assert list(ckpt["required"]) == ["ckpt_1", "ckpt_2", "method", "weights", "t", "alpha", "multiplier", "save_as"]
    assert ckpt["required"]["method"][0] == registry.method_names()
    assert {"iterations", "tolerance", "block_weights"} <= set(ckpt["optional"])


def test_a_method_registered_later_gets_its_nodes_without_editing_nodes(host):
    import torch
    nodes, calls = host
    registry = _pack("merge_core.registry")
    merge_nodes = _pack("nodes.merge_nodes")
    registry.register(registry.Method(
        name="lerp-towards-test", label="Lerp towards", order=999, help="first + s*(second - first)",
        params=(registry.Param("s", 0.25, minimum=0.0, maximum=1.0, per_block=True, label="s",
                               help="how far towards the second model"),),
        min_models=2, max_models=2,
        coefficients=lambda gram, values, n: [1.0 - values["s"], values["s"]]))
    try:
        built = merge_nodes.build()
        cls = built["ManifoldMergeLerpTowardsModel"]
        spec = cls.INPUT_TYPES()
        assert list(spec["required"]) == ["model_a", "model_b", "s"]
        assert {k: spec["required"]["s"][1][k] for k in ("default", "min", "max")} == \
            {"default": 0.25, "min": 0.0, "max": 1.0}
        assert "ManifoldMergeLerpTowardsClip" in built
        assert "lerp-towards-test" in built["ManifoldMergeCheckpoints"].INPUT_TYPES()["required"]["method"][0]
        a, b = _sd(UNET, 1), _sd(UNET, 2)
        bw = _block_weights(nodes, text="IN04:1, BASE:0")
        (out,) = cls().run(model_a=a, model_b=b, s=0.25, block_weights=bw)
        for key, (_, block) in UNET.items():
            s = {"IN04": 1.0, "BASE": 0.0}.get(block, 0.25)
            assert torch.allclose(out[key], a[key] * (1 - s) + b[key] * s, atol=1e-6), key
    finally:
        registry.unregister("lerp-towards-test")


def test_block_weights_reach_the_model_blocks_of_a_comfyui_model(host):
    import torch
    nodes, calls = host
    a, b = _sd(UNET, 1), _sd(UNET, 2)
    bw = _block_weights(nodes, text="BASE:0, IN04:0.25, M00:1\nOUT*:0.75")
    (out,) = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeWeightedSumModel"]().run(
        model_a=a, model_b=b, multiplier=0.5, block_weights=bw)
    expected_m = {"BASE": 0.0, "IN01": 0.5, "IN04": 0.25, "M00": 1.0, "OUT03": 0.75, "OUT11": 0.75}
    for key, (_, block) in UNET.items():
        m = expected_m[block]
        assert torch.allclose(out[key], a[key] * (1 - m) + b[key] * m, atol=1e-6), key
    blocks = calls[-1]["blocks"]
    assert type(blocks).__name__ == "HostBlockValues" and blocks.kind == "comfy_model"
    assert calls[-1]["overrides"] == []


def test_block_weights_reach_the_text_encoder_block_of_a_comfyui_clip(host):
    import torch
    nodes, calls = host
    a, b = FakeClip(_sd(CLIP, 1)), FakeClip(_sd(CLIP, 2))
    bw = _block_weights(nodes, text="TE:0.2, BASE:0.9", overrides="final_layer_norm=0.6")
    (out,) = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeWeightedSumClip"]().run(
        clip_a=a, clip_b=b, multiplier=0.5, block_weights=bw)
    assert set(out.patcher) == set(CLIP)  # nothing added (the architecture hint is removed again)
    for key in CLIP:
        m = 0.6 if "final_layer_norm" in key else 0.2
        assert torch.allclose(out.patcher[key], a.patcher[key] * (1 - m) + b.patcher[key] * m, atol=1e-6), key
    assert calls[-1]["blocks"].kind == "comfy_clip" and calls[-1]["overrides"] == [("final_layer_norm", 0.6)]
    proj = "clip_l.transformer.text_projection.weight"  # SD1: never loaded by ComfyUI (torch.empty)
    a.patcher[proj], b.patcher[proj] = torch.ones(8, 8), torch.full((8, 8), float("nan"))
    (out,) = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeWeightedSumClip"]().run(
        clip_a=a, clip_b=b, multiplier=0.5, block_weights=bw)
    assert set(out.patcher) == set(CLIP)  # left out of the merge: the clone keeps clip_a's own
    sdxl = {**CLIP, **{"clip_g." + k[len("clip_l."):]: v for k, v in CLIP.items()}}
    MergeError = _pack("merge_core.errors").MergeError
    with pytest.raises(MergeError, match="block weights are for SD1.x, but the connected models are SDXL: pick sdxl"):
        nodes.NODE_CLASS_MAPPINGS["ManifoldMergeWeightedSumClip"]().run(
            clip_a=FakeClip(_sd(sdxl, 1)), clip_b=FakeClip(_sd(sdxl, 2)), multiplier=0.5, block_weights=bw)


def test_karcher_rows_one_per_model_equal_the_engine_with_the_same_blocks(host):
    import torch
    nodes, calls = host
    engine = _pack("merge_core.engine")
    sds = [_sd(UNET, i) for i in (1, 2, 3)]
    bw = _block_weights(nodes, text="model1: IN*:3, BASE:1\nmodel2: OUT*:2\nM00:0.5")
    (out,) = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeKarcherModel"]().run(
        model1=sds[0], weight1=1.0, model2=sds[1], weight2=2.0, model3=sds[2], weight3=1.0, iterations=10,
        tolerance=1e-5, block_weights=bw)
    ours = engine.merge(sds, "karcher", params={"weights": [1.0, 2.0, 1.0]},
                        blocks=["M00:0.5, IN*:3, BASE:1", "M00:0.5, OUT*:2", "M00:0.5"]).state_dict
    plain = engine.merge(sds, "karcher", params={"weights": [1.0, 2.0, 1.0]}).state_dict
    for key in UNET:
        assert torch.allclose(out[key], ours[key], atol=1e-6), key
    assert not torch.allclose(out["diffusion_model.middle_block.1.proj_in.weight"],
                              plain["diffusion_model.middle_block.1.proj_in.weight"])
    assert isinstance(calls[-1]["blocks"], list) and len(calls[-1]["blocks"]) == 3


def test_the_checkpoint_merger_passes_block_weights_to_the_file_merge(host, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file
    nodes, calls = host
    engine = _pack("merge_core.engine")
    merge_nodes = _pack("nodes.merge_nodes")
    paths = []
    for i in (1, 2):
        sd = {"model." + k: v for k, v in _sd(UNET, i).items()}
        sd.update({"cond_stage_model.transformer." + k[len("clip_l.transformer."):]: v
                   for k, v in _sd(CLIP, i).items()})
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, paths[-1])
    fp = sys.modules["folder_paths"]
    monkeypatch.setattr(fp, "get_full_path_or_raise", lambda kind, name: str(tmp_path / name), raising=False)
    monkeypatch.setattr(merge_nodes, "load_result", lambda output, result: result.state_dict)
    seen = []
    real = merge_nodes.engine_merge
    monkeypatch.setattr(merge_nodes, "engine_merge", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    bw = _block_weights(nodes, text="OUT*:0.9, TE:0.1, M00:0", overrides="attn2=0.3")
    out = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeCheckpoints"]().run(
        method="weighted", save_as="", ckpt_1="m1.safetensors", ckpt_2="m2.safetensors", weights="", t=0.5,
        alpha=0.5, multiplier=0.4, block_weights=bw)
    ours = engine.merge(paths, "weighted", params={"multiplier": 0.4}, blocks="OUT*:0.9, TE:0.1, M00:0",
                        overrides=[("attn2", 0.3)]).state_dict
    assert set(out) == set(ours)
    for key in ours:
        assert torch.equal(out[key], ours[key]), key
    assert seen[-1]["blocks"].kind == "checkpoint" and seen[-1]["params"] == {"multiplier": 0.4}
    assert not list(tmp_path.glob("*.tmp*"))


# --- LoRA extraction: ComfyUI MODEL/CLIP keys renamed to checkpoint keys (merge_core.naming) ----------------

SDXL_UNET = {"diffusion_model.label_emb.0.0.weight": (8, 12),
             "diffusion_model.input_blocks.4.1.proj_in.weight": (8, 8),
             "diffusion_model.output_blocks.2.0.in_layers.2.weight": (8, 8, 3, 3)}
SDXL_CLIP = {"clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (16, 8),
             "clip_l.transformer.text_model.embeddings.position_ids": (1, 77),
             **{f"clip_g.transformer.text_model.encoder.layers.0.self_attn.{x}_proj.{p}":
                (8, 8) if p == "weight" else (8,) for x in "qkv" for p in ("weight", "bias")},
             "clip_g.transformer.text_model.encoder.layers.0.mlp.fc2.weight": (8, 16),
             "clip_g.transformer.text_projection.weight": (4, 8)}


def _extract(nodes, model, base, clip=None, base_clip=None):
    node = nodes.NODE_CLASS_MAPPINGS["ManifoldMergeExtractLora"]()
    return node.run(model, base, 4, 0, "extracted", clip=clip, base_clip=base_clip)


def test_extract_lora_renames_an_sdxl_model_and_both_text_encoders_to_checkpoint_keys(host, monkeypatch):
    import torch
    nodes, _ = host
    extract = _pack("merge_core.lora.extract")
    seen = []
    monkeypatch.setattr(extract, "extract_lora", lambda base, model, out, *a, **kw: seen.append((base, model)) or
                        {"modules": 1, "relative_error": 0.0})
    model, base = _sd(SDXL_UNET, 1), _sd(SDXL_UNET, 2)
    clip, base_clip = FakeClip(_sd(SDXL_CLIP, 3)), FakeClip(_sd(SDXL_CLIP, 4))
    _extract(nodes, model, base, clip, base_clip)
    (b, m), = seen
    g = "conditioner.embedders.1.model."
    assert set(m) == set(b) == {"model.diffusion_model.label_emb.0.0.weight",
                                "model.diffusion_model.input_blocks.4.1.proj_in.weight",
                                "model.diffusion_model.output_blocks.2.0.in_layers.2.weight",
                                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                                g + "transformer.resblocks.0.attn.in_proj_weight",
                                g + "transformer.resblocks.0.attn.in_proj_bias",
                                g + "transformer.resblocks.0.mlp.c_proj.weight", g + "text_projection"}
    layer = "clip_g.transformer.text_model.encoder.layers.0.self_attn."
    assert torch.equal(m[g + "transformer.resblocks.0.attn.in_proj_weight"],
                       torch.cat([clip.patcher[layer + f"{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(m[g + "text_projection"], clip.patcher["clip_g.transformer.text_projection.weight"].t())
    assert m["model.diffusion_model.label_emb.0.0.weight"] is model["diffusion_model.label_emb.0.0.weight"]


FC1 = "transformer.text_model.encoder.layers.0.mlp.fc1.weight"
T5_WI = "transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"


@pytest.mark.parametrize("unet,clip,expected", [
    ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768)}, {"clip_l." + FC1: (16, 8)},
     {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "cond_stage_model." + FC1}),
    ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024)}, {"clip_h." + FC1: (16, 8)},
     {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
      "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"}),
    ({"joint_blocks.0.context_block.attn.qkv.weight": (24, 8)},
     {"clip_l." + FC1: (16, 8), "clip_g." + FC1: (16, 8), "t5xxl." + T5_WI: (16, 8)},
     {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "text_encoders.clip_l." + FC1,
      "text_encoders.clip_g." + FC1, "text_encoders.t5xxl." + T5_WI}),
    ({"double_blocks.0.img_attn.qkv.weight": (24, 8)}, {"clip_l." + FC1: (16, 8), "t5xxl." + T5_WI: (16, 8)},
     {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "text_encoders.clip_l." + FC1,
      "text_encoders.t5xxl." + T5_WI}),
], ids=["sd1", "sd2", "sd3", "flux"])
def test_extract_lora_renames_every_architectures_model_and_clip(host, monkeypatch, unet, clip, expected):
    nodes, _ = host
    extract = _pack("merge_core.lora.extract")
    seen = []
    monkeypatch.setattr(extract, "extract_lora", lambda base, model, out, *a, **kw: seen.append(model) or
                        {"modules": 1, "relative_error": 0.0})
    model = _sd({"diffusion_model." + k: v for k, v in unet.items()}, 1)
    _extract(nodes, model, model, FakeClip(_sd(clip, 2)), FakeClip(_sd(clip, 3)))
    assert set(seen[0]) == expected


def test_extract_lora_writes_the_second_text_encoder_of_an_sdxl_clip(host, tmp_path):
    from safetensors.torch import load_file
    nodes, _ = host
    unet = {**SDXL_UNET, "diffusion_model.input_blocks.4.1.proj_out.weight": (8, 8)}
    model, base = _sd(unet, 1), _sd(unet, 2)
    clip, base_clip = FakeClip(_sd(SDXL_CLIP, 3)), FakeClip(_sd(SDXL_CLIP, 4))
    out = _extract(nodes, model, base, clip, base_clip)
    assert out["result"][0].startswith("wrote extracted.safetensors")
    names = {k.split(".", 1)[0] for k in load_file(tmp_path / "extracted.safetensors")}
    te2 = "lora_te2_text_model_encoder_layers_0_"
    assert {te2 + "self_attn_q_proj", te2 + "self_attn_v_proj", te2 + "mlp_fc2",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1"} <= names
    assert any(n.startswith("lora_unet_") for n in names)


def test_extract_lora_with_a_clip_of_another_architecture_is_a_one_line_error(host):
    nodes, _ = host
    MergeError = _pack("merge_core.errors").MergeError
    sd1 = {k: v for k, v in UNET.items()}
    with pytest.raises(MergeError, match=r"^clip_g\..*: no SD1\.x component has this key") as err:
        _extract(nodes, _sd(sd1, 1), _sd(sd1, 2), FakeClip(_sd(SDXL_CLIP, 3)), FakeClip(_sd(SDXL_CLIP, 4)))
    assert "\n" not in str(err.value)
    with pytest.raises(MergeError, match=r"^Extract LoRA: cannot tell the model's architecture from its weights "
                                         r"\(supported: SD1\.x"):
        _extract(nodes, {"diffusion_model.foo.weight": _sd({"x": (2, 2)}, 1)["x"]},
                 {"diffusion_model.foo.weight": _sd({"x": (2, 2)}, 2)["x"]})


@pytest.mark.parametrize("arch,preset,text,overrides,message", [
    ("sd1", "none", "", "", "block weights: nothing set"),
    ("sdxl", "none", "IN11:1", "", "block weights: IN11 is not an SDXL block"),
    ("sd1", "none", "0.5, 0.5, 0.5", "", "block weights: 3 values, but SD1.x takes 26"),
    ("sd1", "none", "0," * 19 + "0", "", "20 values is a SDXL block list"),
    ("sd1", "none", "M00:x", "", "block weights: M00: 'x' is not a number"),
    ("sd1", "none", "M00:nan", "", "not a finite number"),
    ("sd1", "none", "model9: M00:1", "", "block weights: model9: a node takes models 1 to 8"),
    ("sd1", "none", "model1:", "", "block weights: the model1: row is empty"),
    ("sd1", "none", "model2: OUT*:x", "", "block weights model2: OUT*: 'x' is not a number"),
    ("sd1", "none", "", "attn2", "block weights override: 'attn2' is not PATTERN=VALUE"),
    ("sd1", "none", "", "attn2=big", "block weights override attn2: 'big' is not a number"),
    ("sd9", "none", "M00:1", "", "block weights: unknown architecture 'sd9'"),
])
def test_block_weights_node_errors_are_one_line_in_node_words(nodes, arch, preset, text, overrides, message):
    MergeError = _pack("merge_core.errors").MergeError
    with pytest.raises(MergeError) as info:
        _block_weights(nodes, arch, preset, text, overrides)
    assert message in str(info.value) and "--" not in str(info.value) and "\n" not in str(info.value)


def test_block_weights_node_output(nodes):
    blocks = _pack("merge_core.blocks")
    bw = _block_weights(nodes, "sdxl", "grad_in_out", "M00:1\nOUT08=0.5", "# comment\n*.attn2.*=0\n")
    expected = blocks.preset(blocks.architecture("sdxl"), "grad_in_out").values
    assert bw.arch == "sdxl" and bw.common == {**expected, "M00": 1.0, "OUT08": 0.5}
    assert bw.rows == {} and bw.overrides == (("*.attn2.*", 0.0),)
    listed = _block_weights(nodes, "sd1", "none", ",".join(["0.5"] * 26))
    assert listed.common == {b: 0.5 for b in blocks.architecture("sd1").blocks}
    rows = _block_weights(nodes, "flux", "none", "model1: D*:1\nmodel2: S*:1\nmodel1: D00:0")
    assert rows.common == {} and rows.rows[1]["D00"] == 0.0 and rows.rows[1]["D01"] == 1.0
    assert set(rows.rows[2]) == {f"S{i:02d}" for i in range(38)}
    assert repr(bw) == repr(_block_weights(nodes, "sdxl", "grad_in_out", "M00:1\nOUT08=0.5", "*.attn2.*=0"))


def _run_node(nodes, name, **inputs):
    return nodes.NODE_CLASS_MAPPINGS[name]().run(**inputs)


@pytest.mark.parametrize("node,inputs,bw,message", [
    ("ManifoldMergeSlerpModel", {"t": 0.5}, ("sd1", "model1: M00:1"),
     "block weights: SLERP takes one row (t per block); remove the 'model1:' label"),
    ("ManifoldMergeKarcherModel", {"weight1": 1.0, "weight2": 1.0, "iterations": 10, "tolerance": 1e-5},
     ("sd1", "model3: M00:1"), "block weights: a model3: row, but only 2 models are connected"),
    ("ManifoldMergeKarcherModel", {"weight1": 1.0, "weight2": 1.0, "iterations": 10, "tolerance": 1e-5},
     ("sd1", "M00:1", "attn2=0.5"), "block weights overrides set one number per key, but Karcher mean's weights"),
    ("ManifoldMergeSlerpModel", {"t": 0.5}, ("sd1", "M00:1.5"), "block weights (t, M00) must be in [0, 1], got 1.5"),
    ("ManifoldMergeSlerpModel", {"t": 0.5}, ("sdxl", "M00:1"),
     "block weights are for SDXL, but the connected models are SD1.x: pick sd1"),
    ("ManifoldMergeSlerpModel", {"t": 0.5}, ("sd1", "", "zzz=0.5"),
     "block weights override: pattern 'zzz' matches no key"),
    ("ManifoldMergeSMAModel", {}, ("sd1", "M00:1"), "SMA has no parameter that can vary per block"),
    ("ManifoldMergeSlerpModel", {"t": 1.5}, None, "t must be in [0, 1], got 1.5"),
    ("ManifoldMergeMovingAverageModel", {"method": "wma", "alpha": 0.5, "weights": "1,2,3"}, None,
     "weights: 3 values given for 2 models"),
    ("ManifoldMergeMovingAverageModel", {"method": "wma", "alpha": 0.5, "weights": "1,x"}, None,
     "weights: expected numbers"),
])
def test_merge_node_errors_name_the_problem_in_node_words(host, node, inputs, bw, message):
    nodes, calls = host
    MergeError = _pack("merge_core.errors").MergeError
    names = ("model_a", "model_b") if "Slerp" in node else ("model1", "model2")
    models = {names[0]: _sd(UNET, 1), names[1]: _sd(UNET, 2)}
    if bw is not None:
        inputs = {**inputs, "block_weights": _block_weights(nodes, bw[0], "none", bw[1], *bw[2:])}
    with pytest.raises(MergeError) as info:
        _run_node(nodes, node, **models, **inputs)
    text = str(info.value)
    assert message in text and "--" not in text and "\n" not in text, text
    assert not calls or "Slerp" in node  # a bad widget/row stops before merge_core runs (overrides: inside it)


def test_cli_flags_in_core_messages_become_input_names(nodes):
    merge_nodes = _pack("nodes.merge_nodes")
    registry = _pack("merge_core.registry")
    methods = registry.all_methods()
    assert merge_nodes.node_words("--karcher-iter must be a whole number", methods) == \
        "iterations must be a whole number"
    assert merge_nodes.node_words("--blocks: 2 block rows given", methods) == "block_weights: 2 block rows given"
    assert merge_nodes.node_words("cannot merge different architectures (a: SD1.x; b: SDXL). Use --force to merge "
                                  "only the keys they share.", methods).endswith("Connect models of one architecture.")
    assert "--" not in merge_nodes.node_words("x.safetensors: output already exists (use --overwrite to replace it)",
                                              methods)


def test_the_webuis_javascript_folder_holds_only_classic_scripts():
    """A1111/Forge load every javascript/*.js of an extension as a classic <script>: an ES module there (the
    ComfyUI front end) would be a SyntaxError on every page load, so that one lives in javascript/comfyui/."""
    import re
    top = sorted((ROOT / "javascript").glob("*.js"))
    assert top, "the tab's hints file is missing"
    for path in top:
        text = path.read_text()
        assert not re.search(r"^\s*(import|export)\s", text, re.M), path.name
    assert (ROOT / "javascript" / "comfyui" / "manifold_merge.js").is_file()

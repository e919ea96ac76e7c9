"""Reading and writing: round trips through the real formats, and every bad input."""
import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch

from merge_core.errors import BadCheckpoint, OutputExists, UnsafeCheckpoint
from merge_core.io import SafetensorsWriter, TensorSpec, open_model, save_safetensors
from merge_core.io.sources import expand_model_args


def _sample():
    return {"w": torch.randn(3, 5).half(), "s": torch.tensor(1.5), "i": torch.arange(4),
            "b": torch.tensor([True, False, True]), "bf": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0, 4)}


def test_safetensors_round_trip_both_ways(tmp_path):
    sd = _sample()
    ours = save_safetensors(tmp_path / "ours.safetensors", sd, {"k": "v"})
    loaded = safetensors.torch.load_file(ours)  # the official reader accepts our files
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    safetensors.torch.save_file(sd, tmp_path / "theirs.safetensors", {"a": "b"})
    with open_model(tmp_path / "theirs.safetensors") as src:  # and we read theirs
        assert src.metadata == {"a": "b"}
        assert set(src.keys()) == set(sd)
        assert all(torch.equal(src.load(k), v) for k, v in sd.items())
        assert src.spec("w") == TensorSpec((3, 5), torch.float16)


def test_truncated_safetensors_is_named(tmp_path):
    path = save_safetensors(tmp_path / "m.safetensors", {"w": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(BadCheckpoint, match=r"m\.safetensors: truncated"):
        open_model(path)
    path.write_bytes(data[:5])
    with pytest.raises(BadCheckpoint, match="not a safetensors file"):
        open_model(path)


def _write_raw(path, header: dict, payload: bytes):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + payload)


def test_header_that_lies_is_refused(tmp_path):
    path = tmp_path / "liar.safetensors"
    _write_raw(path, {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, bytes(64))
    with pytest.raises(BadCheckpoint, match="header lies about tensor 'w'"):
        open_model(path)
    _write_raw(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))
    with pytest.raises(BadCheckpoint, match="overlap"):
        open_model(path)
    _write_raw(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8))
    with pytest.raises(BadCheckpoint, match="truncated"):
        open_model(path)
    path.write_bytes(struct.pack("<Q", 10) + b"{not json!")
    with pytest.raises(BadCheckpoint, match="corrupt safetensors header"):
        open_model(path)
    path.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    with pytest.raises(BadCheckpoint, match="header claims"):
        open_model(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(BadCheckpoint, match="nope.safetensors: file not found"):
        open_model(tmp_path / "nope.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BadCheckpoint, match="unsupported file type"):
        open_model(tmp_path / "x.txt")


def test_pickled_checkpoint_with_state_dict_wrapper(tmp_path):
    sd = {"w": torch.randn(3, 3), "pos": torch.arange(3)}
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "m.ckpt")
    with open_model(tmp_path / "m.ckpt") as src:
        assert set(src.keys()) == {"w", "pos"}
        assert torch.equal(src.load("w"), sd["w"])


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create this file


def test_pickle_that_runs_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil(str(marker))}, bad)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpoint, match="evil.ckpt: refused to load"):
        open_model(bad)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # a plain (non-torch) pickle with the same payload
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(BadCheckpoint):
        open_model(raw)
    assert not marker.exists()


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "broken.pt"
    torch.save({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadCheckpoint, match="broken.pt"):
        open_model(path)


def test_sharded_hf_folder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    a, b = {"x": torch.randn(4)}, {"y": torch.randn(2, 2)}
    save_safetensors(folder / "model-00001-of-00002.safetensors", a)
    save_safetensors(folder / "model-00002-of-00002.safetensors", b)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    with open_model(folder) as src:
        assert torch.equal(src.load("x"), a["x"]) and torch.equal(src.load("y"), b["y"])
    assert expand_model_args([folder]) == [folder]  # an HF folder is ONE model


def test_plain_folder_expands_in_natural_order(tmp_path):
    for name in ["model_10", "Model_2", "model_1"]:
        save_safetensors(tmp_path / f"{name}.safetensors", {"x": torch.zeros(1)})
    assert [p.stem for p in expand_model_args([tmp_path])] == ["model_1", "Model_2", "model_10"]


def test_writer_is_atomic_under_an_injected_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    specs = {"a": TensorSpec((10,), torch.float32), "b": TensorSpec((10,), torch.float32)}
    with pytest.raises(RuntimeError, match="injected"):
        with SafetensorsWriter(target, specs) as w:
            w.write("a", torch.ones(10))
            raise RuntimeError("injected")
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"precious")
    with pytest.raises(OutputExists):
        SafetensorsWriter(target, specs).__enter__()
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(target, specs, overwrite=True) as w:
            w.write("a", torch.ones(10))
            raise KeyboardInterrupt
    assert target.read_bytes() == b"precious" and os.listdir(tmp_path) == ["out.safetensors"]


def test_writer_accepts_any_order_and_late_metadata(tmp_path):
    target = tmp_path / "out.safetensors"
    specs = {"a": TensorSpec((3,), torch.float16), "b": TensorSpec((), torch.float32)}
    with SafetensorsWriter(target, specs) as w:
        w.write("b", torch.tensor(2.5))
        w.write("a", torch.tensor([1.0, 2.0, 3.0]).half())
        w.set_metadata({"hash": "x" * 64})
    with open_model(target) as src:
        assert src.metadata == {"hash": "x" * 64}
        assert src.load("b").item() == 2.5 and src.load("a").tolist() == [1.0, 2.0, 3.0]


def test_sd1_era_ckpt_with_lightning_callback_and_numpy_scalars_loads(tmp_path, monkeypatch):
    """Old SD .ckpt files pickle a Lightning ModelCheckpoint and numpy scalars beside the weights."""
    import sys
    import types

    import numpy as np
    marker = tmp_path / "ran"
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = np.float64(0.5)
            self.dirpath = "logs"

        def __setstate__(self, state):  # the real class's code must never run while loading
            open(marker, "w").close()

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]:
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    sd = {"w": torch.randn(3)}
    torch.save({"state_dict": sd, "callbacks": {"ModelCheckpoint": ModelCheckpoint()},
                "epoch": np.int64(3)}, tmp_path / "old.ckpt")
    with open_model(tmp_path / "old.ckpt") as src:
        assert torch.equal(src.load("w"), sd["w"])
    assert not marker.exists()


def test_full_disk_is_reported_before_any_work(tmp_path, monkeypatch):
    import errno

    from merge_core.errors import MergeError

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(MergeError, match=r"out\.safetensors: not enough free disk space"):
        with SafetensorsWriter(tmp_path / "out.safetensors", {"a": TensorSpec((1000,), torch.float32)}):
            pass
    assert os.listdir(tmp_path) == []

"""The CUDA path gives the CPU path's numbers (runs only where CUDA is available)."""
import pytest
import torch

from merge_core.engine import merge
from merge_core.io import open_model

from conftest import TO_K, tiny_sd1

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("method,kw", [("sma", {}), ("ema", {"alpha": 0.3}), ("wma", {}),
                                       ("karcher", {"weights": [1, 2, 3]}), ("slerp", {"t": 0.3}),
                                       ("karcher", {"base": "BASE"})])
def test_cuda_matches_cpu(write, tmp_path, method, kw):
    paths = [write(f"m{i}.safetensors", tiny_sd1(i, dtype=torch.float32)) for i in range(3)]
    if kw.get("base") == "BASE":
        kw = dict(kw, base=paths[0])
        paths = paths[1:]
    if method == "slerp":
        paths = paths[:2]
    cpu = merge(paths, method, output=tmp_path / "cpu.safetensors", device="cpu", **kw)
    gpu = merge(paths, method, output=tmp_path / "gpu.safetensors", device="cuda", **kw)
    with open_model(cpu.path) as a, open_model(gpu.path) as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            x, y = a.load(key), b.load(key)
            assert x.dtype == y.dtype
            if x.is_floating_point():
                assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), key
            else:
                assert torch.equal(x, y)


def test_in_memory_merge_can_stay_on_the_gpu():
    sds = [{k: v.cuda() for k, v in tiny_sd1(i, dtype=torch.float16).items()} for i in range(2)]
    result = merge(sds, "slerp", t=0.5, device="cuda", output_device="cuda", dtype="fp32")
    assert result.state_dict[TO_K].device.type == "cuda"
    assert result.state_dict[TO_K].dtype == torch.float32

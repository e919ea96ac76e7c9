"""Hyper-merge on constructed collections with known structure, through the real files."""
import json
import os

import pytest
import torch

from merge_core.demo import tiny_base
from merge_core.errors import MergeCancelled, MergeError, OutputExists
from merge_core.hyper.pipeline import HyperConfig, run_hyper
from merge_core.hyper.project import project_model
from merge_core.io import open_model, save_safetensors
from merge_core.io.spec import TensorSpec
from merge_core.lora.extract import extract_lora
from merge_core.lora.keys import lora_modules

KEEP = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",   # linear
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",   # linear with the context width (detection)
        "input_blocks.1.1.proj_in.weight",                           # 1x1 conv
        "input_blocks.1.0.in_layers.2.weight",                       # 3x3 conv (LoCon)
        "input_blocks.1.0.in_layers.0.weight",                       # a norm: not covered
        "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.mlp.fc1.weight")


def small_base(seed=0):
    return {k: v.float() for k, v in tiny_base("sd15", seed).items() if k.endswith(KEEP)}


def build_collection(tmp_path, lam_true, ranks, seed=0, noise=0.0):
    """Models = base + sum_k lam_true[k, m] * P_k with P_k of exact rank ranks[k] in every covered layer."""
    base = small_base(seed)
    modules = lora_modules({k: TensorSpec.of(v) for k, v in base.items()})
    g = torch.Generator().manual_seed(seed + 7)
    parts = {m.name: [torch.randn(m.out_features, r, generator=g) @ torch.randn(r, m.in_features, generator=g) * 0.02
                      for r in ranks] for m in modules}
    paths = []
    for idx in range(lam_true.shape[1]):
        sd = {k: v.clone() for k, v in base.items()}
        for m in modules:
            delta = sum(float(lam_true[k, idx]) * parts[m.name][k] for k in range(len(ranks)))
            if noise:
                delta = delta + noise * torch.randn(delta.shape, generator=g)
            sd[m.key] += delta.reshape(m.shape)
        path = tmp_path / f"model_{idx}.safetensors"
        save_safetensors(path, sd)
        paths.append(path)
    return paths, modules


def apply_set(result, modules, stem):
    """An independent kohya LoRA application: W = hyper + sum_k up @ down * alpha / rank * strength."""
    from bench.hyper_files import lora_delta, read_multipliers
    strengths = read_multipliers(result.multipliers_path)
    with open_model(result.hyper_path) as h:
        out = {m.key: h.load(m.key).float().clone() for m in modules}
    for k, path in enumerate(result.lora_paths):
        with open_model(path) as lora:
            for m in modules:
                out[m.key] += (lora_delta(lora, m.name) * strengths[stem][k]).reshape(m.shape)
    return out


def test_known_structure_is_recovered_and_the_files_reproduce_the_models(tmp_path):
    lam_true = torch.tensor([[1.0, -0.5, 0.3, 0.8], [0.2, 1.0, -0.7, 0.1]])
    paths, modules = build_collection(tmp_path, lam_true, ranks=[2, 1])
    result = run_hyper(HyperConfig(models=paths, name="t", out_dir=tmp_path, ranks=[2, 1], iterations=30,
                                   dtype="float32", tol=1e-12))
    report = json.loads(result.report_path.read_text())
    assert report["mean_relative_error_covered"] < 1e-6
    for path in paths:
        rebuilt = apply_set(result, modules, path.stem)
        with open_model(path) as src:
            for m in modules:
                assert torch.allclose(rebuilt[m.key], src.load(m.key).float(), atol=2e-5), (path.stem, m.name)
    meta = open_model(result.lora_paths[0]).metadata
    assert json.loads(meta["manifold_hyper_lambdas"]).keys() == {p.stem for p in paths}
    # the hyper checkpoint is complete: every key of the inputs
    assert set(open_model(result.hyper_path).keys()) == set(open_model(paths[0]).keys())


def test_one_direction_of_exact_rank_reconstructs_after_one_round(tmp_path):
    paths, modules = build_collection(tmp_path, torch.tensor([[0.9, -0.4]]), ranks=[3])
    result = run_hyper(HyperConfig(models=paths, name="one", out_dir=tmp_path, ranks=[3], iterations=1,
                                   dtype="float32"))
    # (the error is read off accumulators, n - 2 lam.b + lam.A.lam: float32 products limit it to ~1e-7)
    assert result.report["rounds"][0]["mean_relative_error"] < 1e-6
    assert result.report["per_model"][0]["svd_floor_covered"] < 1e-8


def test_projection_of_a_model_in_the_set_returns_its_lambdas(tmp_path):
    lam_true = torch.tensor([[1.0, -0.5, 0.3, 0.8], [0.2, 1.0, -0.7, 0.1]])
    paths, _ = build_collection(tmp_path, lam_true, ranks=[2, 1], noise=1e-3)
    result = run_hyper(HyperConfig(models=paths, name="p", out_dir=tmp_path, ranks=[2, 1], iterations=6,
                                   dtype="float32", floor=False))
    for path in paths:
        projected = project_model(tmp_path / "p", path)
        assert projected["lambdas"] == pytest.approx(result.lambdas[path.stem], abs=1e-3)


def test_beats_per_model_start_and_reports_every_block(tmp_path):
    lam = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    paths, _ = build_collection(tmp_path, lam, ranks=[3, 2, 1], noise=2e-3)
    result = run_hyper(HyperConfig(models=paths, name="r", out_dir=tmp_path, ranks=[1, 3, 2], iterations=8,
                                   dtype="float32"))
    rounds = [r["mean_relative_error"] for r in result.report["rounds"]]
    assert rounds[-1] <= rounds[0] + 1e-9  # joint refinement never makes it worse than the PCA start
    row = result.report["per_model"][0]
    assert set(row["per_block"]) == {"input", "text_encoder"}
    assert row["svd_floor_covered"] <= row["relative_error_covered"] + 1e-6
    assert result.report["ranks"] == [3, 2, 1]  # larger ranks to larger components
    assert [p.name for p in result.lora_paths] == ["r_0-3.safetensors", "r_1-2.safetensors", "r_2-1.safetensors"]


def test_more_loras_than_directions_add_rank_to_the_largest(tmp_path):
    # 3 models around their mean span 2 directions; a third LoRA restarts on the largest one and adds rank there
    # (the reference's own setting, 4 models and ranks 64 64 32 32, is such a case: it runs, with a note)
    lam_true = torch.tensor([[1.0, -0.6, 0.2], [0.1, 0.5, -0.9]])
    paths, _ = build_collection(tmp_path, lam_true, ranks=[2, 1])
    two = run_hyper(HyperConfig(models=paths, name="two", out_dir=tmp_path, ranks=[1, 1], iterations=10,
                                dtype="float32", floor=False, tol=1e-9))
    three = run_hyper(HyperConfig(models=paths, name="three", out_dir=tmp_path, ranks=[1, 1, 1], iterations=10,
                                  dtype="float32", floor=False, tol=1e-9))
    assert three.report["mean_relative_error_covered"] < 0.5 * two.report["mean_relative_error_covered"]
    assert "3 LoRAs for 3 models" in three.report["note"] and "note" not in two.report
    for result in (two, three):  # each LoRA's share of the difference; together 1 - the pooled error
        shares = result.report["lora_energy_share"]
        assert all(-1e-6 <= x <= 1 for x in shares) and sum(shares) <= 1 + 1e-6
        assert sum(shares) >= 1 - max(r["relative_error_covered"] for r in result.report["per_model"]) - 1e-4
    assert len(three.lora_paths) == 3


def test_bad_inputs_write_nothing(tmp_path):
    paths, _ = build_collection(tmp_path, torch.tensor([[1.0, -1.0, 0.5]]), ranks=[1])
    before = set(os.listdir(tmp_path))
    with pytest.raises(MergeError, match="ranks must be positive"):
        run_hyper(HyperConfig(models=paths, name="x", out_dir=tmp_path, ranks=[4, 0]))
    with pytest.raises(MergeError, match="invalid name"):
        run_hyper(HyperConfig(models=paths, name="../x", out_dir=tmp_path, ranks=[1]))
    with pytest.raises(MergeCancelled):
        run_hyper(HyperConfig(models=paths, name="x", out_dir=tmp_path, ranks=[1], progress=lambda d, t, k: d < 5))
    assert set(os.listdir(tmp_path)) == before
    (tmp_path / "x_hyper.safetensors").write_bytes(b"mine")
    with pytest.raises(OutputExists):
        run_hyper(HyperConfig(models=paths, name="x", out_dir=tmp_path, ranks=[1]))
    assert (tmp_path / "x_hyper.safetensors").read_bytes() == b"mine"


def test_extract_lora_of_an_exact_low_rank_difference(tmp_path):
    base_sd = small_base(1)
    modules = lora_modules({k: TensorSpec.of(v) for k, v in base_sd.items()})
    g = torch.Generator().manual_seed(5)
    tuned = {k: v.clone() for k, v in base_sd.items()}
    for m in modules:
        tuned[m.key] += (torch.randn(m.out_features, 2, generator=g) @ torch.randn(2, m.in_features, generator=g)
                         ).reshape(m.shape) * 0.01
    save_safetensors(tmp_path / "base.safetensors", base_sd)
    save_safetensors(tmp_path / "tuned.safetensors", tuned)
    info = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "l.safetensors",
                        rank=2, conv_rank=2, dtype="fp32")
    assert info["relative_error"] < 1e-6 and info["modules"] == len(modules)
    with open_model(tmp_path / "l.safetensors") as lora:
        for m in modules:
            up = lora.load(f"{m.name}.lora_up.weight").reshape(m.out_features, 2)
            down = lora.load(f"{m.name}.lora_down.weight").reshape(2, -1)
            got = base_sd[m.key] + (up @ down).reshape(m.shape) * float(lora.load(f"{m.name}.alpha")) / 2
            assert torch.allclose(got, tuned[m.key], atol=1e-5)


def test_loras_can_go_to_their_own_folder(tmp_path):
    """The WebUI layout: hyper checkpoint in models/Stable-diffusion, LoRAs in models/Lora."""
    paths, _ = build_collection(tmp_path, torch.tensor([[0.9, -0.4]]), ranks=[3])
    ckpt, lora = tmp_path / "Stable-diffusion", tmp_path / "Lora"
    ckpt.mkdir()
    with pytest.raises(MergeError, match=f"{lora}: LoRA folder does not exist"):
        run_hyper(HyperConfig(models=paths, name="w", out_dir=ckpt, lora_dir=lora, ranks=[3], iterations=1))
    assert os.listdir(ckpt) == []
    lora.mkdir()
    (lora / "w_0-3.safetensors").write_bytes(b"mine")
    with pytest.raises(OutputExists, match="w_0-3.safetensors"):
        run_hyper(HyperConfig(models=paths, name="w", out_dir=ckpt, lora_dir=lora, ranks=[3], iterations=1))
    assert os.listdir(ckpt) == [] and os.listdir(lora) == ["w_0-3.safetensors"]
    (lora / "w_0-3.safetensors").unlink()
    result = run_hyper(HyperConfig(models=paths, name="w", out_dir=ckpt, lora_dir=lora, ranks=[3], iterations=1,
                                   dtype="float32"))
    assert result.lora_paths == [lora / "w_0-3.safetensors"] and result.lora_paths[0].is_file()
    assert sorted(os.listdir(ckpt)) == ["w_hyper.safetensors", "w_multipliers.txt", "w_report.json"]
    assert result.report["per_model"][0]["relative_error_covered"] < 1e-6


# --- thread policy, no model worse off, ranks auto ----------------------------------------------

def test_thread_policy_splits_the_cores_and_restores_torch():
    from merge_core.threads import available_cpus, default_threads, plan_threads, thread_policy
    assert 1 <= default_threads() <= min(4, available_cpus())
    assert plan_threads(4, "cpu", workers=2).intra_op == max(1, min(4, available_cpus()) // 2)
    assert plan_threads(4, "cpu", workers=1, small=True).intra_op == 1
    assert plan_threads(10**6, "cpu").threads == available_cpus()   # never more than the CPUs there are
    before = torch.get_num_threads()
    with thread_policy(None, "cpu", workers=1, small=True) as plan:
        assert torch.get_num_threads() == 1 and plan.intra_op == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with thread_policy(None, "cpu", small=True):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_map_ordered_keeps_the_order_with_workers():
    from merge_core.threads import map_ordered
    assert list(map_ordered(lambda x: x * x, range(20), 3)) == [x * x for x in range(20)]
    assert list(map_ordered(lambda x: x + 1, range(5), 1)) == [1, 2, 3, 4, 5]


def _reference_errors(result, paths, modules, ranks, iterations):
    """The reference algorithm (bench/hyper_reference.py) on the same differences from the hyper model."""
    from bench.hyper_reference import reference_hyper
    from merge_core.lora.keys import layer_deltas
    sources = [open_model(p) for p in paths]
    hyper = open_model(result.hyper_path)
    deltas = [layer_deltas(sources, hyper, m, "cpu") for m in modules]
    lam, factors = reference_hyper([[d.half() for d in layer] for layer in deltas], ranks, iterations)
    err = torch.zeros(len(paths), dtype=torch.float64)
    norm = torch.zeros(len(paths), dtype=torch.float64)
    for i, layer in enumerate(deltas):
        for m, d in enumerate(layer):
            recon = sum(float(lam[k, m]) * (u @ v.T) for k, (u, v) in enumerate(factors[i]))
            err[m] += float((d - recon).double().pow(2).sum())
            norm[m] += float(d.double().pow(2).sum())
    for s in sources + [hyper]:
        s.close()
    return (err / norm).tolist()


def test_no_model_is_traded_away(tmp_path):
    """Five models mix two shared parts, the sixth differs only by a small part of its own, and three
    LoRAs of ranks 3 3 2 (below the parts' rank 4) must serve them all. Least squares over all weights
    gives up the small model (the reference algorithm leaves it at 54 % error); here every model must do
    at least as well as with the reference algorithm, and the mean better."""
    lam = torch.tensor([[1.0, -0.5, 0.3, 0.8, -0.6, 0.0], [0.2, 1.0, -0.7, 0.1, 0.4, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.25]])
    paths, modules = build_collection(tmp_path, lam, ranks=[4, 4, 4], noise=2e-3)
    result = run_hyper(HyperConfig(models=paths, name="fair", out_dir=tmp_path, ranks=[3, 3, 2], iterations=12,
                                   dtype="float32", floor=False))
    ours = [r["relative_error_covered"] for r in result.report["per_model"]]
    reference = _reference_errors(result, paths, modules, [3, 3, 2], 12)
    assert all(o <= r * 1.001 + 1e-6 for o, r in zip(ours, reference)), (ours, reference)
    assert sum(ours) < 0.9 * sum(reference)
    # and the kept rounds never leave a model worse off than their start
    first = result.report["rounds"][0]["relative_error"]
    assert all(o <= f * (1 + 1e-5) + 1e-9 for o, f in zip(ours, first))


def test_ranks_auto_meets_a_budget_and_a_target(tmp_path):
    lam_true = torch.tensor([[1.0, -0.5, 0.3, -0.8], [0.2, 1.0, -0.7, -0.5]])
    paths, _ = build_collection(tmp_path, lam_true, ranks=[6, 3], noise=1e-3)
    budget = 60_000
    by_budget = run_hyper(HyperConfig(models=paths, name="b", out_dir=tmp_path, ranks="auto", budget=budget,
                                      iterations=6, dtype="float16", floor=False))
    auto = by_budget.report["auto_ranks"]
    assert sum(p.stat().st_size for p in by_budget.lora_paths) <= budget and auto["met"]
    assert len(by_budget.lora_paths) <= len(paths) - 1 and auto["ranks"] == by_budget.report["ranks"]
    by_target = run_hyper(HyperConfig(models=paths, name="t", out_dir=tmp_path, ranks="auto", target=0.05,
                                      iterations=6, dtype="float32", floor=False))
    assert by_target.report["mean_relative_error_covered"] <= 0.05 and by_target.report["auto_ranks"]["met"]
    assert len(by_target.lora_paths) <= len(paths) - 1     # never more LoRAs than the models span
    with pytest.raises(MergeError, match="exactly one of budget"):
        run_hyper(HyperConfig(models=paths, name="x", out_dir=tmp_path, ranks="auto"))


def test_cli_ranks_take_spaces_commas_and_auto():
    from merge_core.hyper.cli import parse_ranks
    from merge_core.hyper.pipeline import parse_size
    assert parse_ranks(["64", "64", "32", "32"]) == [64, 64, 32, 32]
    assert parse_ranks(["64,64,32,32"]) == parse_ranks(["64,", "64", "32,32"]) == [64, 64, 32, 32]
    assert parse_ranks(["auto"]) == "auto"
    with pytest.raises(MergeError):
        parse_ranks(["64", "x"])
    assert parse_size("500MB") == 500_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30)


def test_keys_that_only_some_models_have_do_not_stop_a_hyper_merge(tmp_path):
    """A training leftover in one model only (model_ema.decay) is copied into the hyper checkpoint; the
    hyper-merge runs and reconstructs the shared weights."""
    from merge_core.demo import small_sd15_state_dicts
    from merge_core.io import open_model, save_safetensors
    paths = []
    for i, sd in enumerate(small_sd15_state_dicts(2, dtype=torch.float32)):
        if i == 0:
            sd["model_ema.decay"] = torch.tensor(0.9999)
        paths.append(tmp_path / f"m{i}.safetensors")
        save_safetensors(paths[-1], sd)
    result = run_hyper(HyperConfig(models=paths, name="partial", out_dir=tmp_path, ranks=[2], iterations=1))
    with open_model(result.hyper_path) as hyper:
        assert float(hyper.load("model_ema.decay")) == pytest.approx(0.9999, rel=1e-3)
    assert all(r["relative_error_covered"] < 1.0 for r in result.report["per_model"])


def test_a_missing_out_dir_is_created_and_taken_back_on_failure(tmp_path):
    from merge_core.demo import write_demo_models
    paths = write_demo_models(tmp_path / "in")
    out = tmp_path / "new" / "sets"
    run_hyper(HyperConfig(models=paths, name="made", out_dir=out, ranks=[2], iterations=1))
    assert (out / "made_hyper.safetensors").is_file()
    failed = tmp_path / "other" / "sets"
    with pytest.raises(MergeError):
        run_hyper(HyperConfig(models=paths, name="bad", out_dir=failed, ranks=[2], iterations=1,
                              progress=lambda *a: False))
    assert not (tmp_path / "other").exists()


def test_hyper_project_takes_the_set_prefix_or_the_hyper_checkpoints_path(tmp_path):
    from merge_core.demo import write_demo_models
    paths = write_demo_models(tmp_path / "in")
    result = run_hyper(HyperConfig(models=paths, name="proj", out_dir=tmp_path, ranks=[2], iterations=1))
    by_prefix = project_model(tmp_path / "proj", paths[1])
    by_path = project_model(result.hyper_path, paths[1])
    assert by_prefix["lambdas"] == by_path["lambdas"]


def _flat(out, inn, decay, g):
    """A random [out, inn] matrix of full rank with singular values ~ i^-decay, RMS 1."""
    p = min(out, inn)
    s = torch.arange(1, p + 1, dtype=torch.float32) ** -decay
    u = torch.linalg.qr(torch.randn(out, p, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inn, p, generator=g))[0]
    return (u * s) @ v.T * ((out * inn) ** 0.5 / float(s.norm()))


def test_a_broad_case_mean_below_the_reference_and_no_model_below_its_guards(tmp_path, monkeypatch):
    """The `broad` fixture's structure in small: six models mixing four shared parts of full rank with flat
    spectra, a part of each model's own (20 % of the shared energy), noise (50 %); four LoRAs of ranks
    4 2 2 1; some sides wider than the sketch. Asserted: the mean error well below the reference
    algorithm's; no model worse off than the reference way's own result on the cores (the anchor every
    other start is held to); the exact passes ran and left no model worse than the rounds did. Not asserted:
    every model at or below the real reference. Here one model ends 3 % above it (0.668 against 0.647):
    the reference's first LoRA is fitted to the sum of the differences from their average, which is zero up
    to rounding, so its path - and its model-by-model result - hangs on the rounding (docs/hyper.md,
    "Not a guarantee")."""
    import merge_core.hyper.pipeline as pipeline
    base = small_base(2)
    modules = lora_modules({k: TensorSpec.of(v) for k, v in base.items()})
    g = torch.Generator().manual_seed(13)
    coeff = torch.randn(6, 4, generator=g) * torch.tensor([1.0, 0.8, 0.6, 0.5])
    models = [{k: v.clone() for k, v in base.items()} for _ in range(6)]
    for m in modules:
        shared = [_flat(m.out_features, m.in_features, 0.3, g) * 0.02 for _ in range(4)]
        for i, sd in enumerate(models):
            delta = sum(float(coeff[i, j]) * c for j, c in enumerate(shared))
            delta = delta + _flat(m.out_features, m.in_features, 0.5, g) * 0.02 * 0.2 ** 0.5
            delta = delta + torch.randn(delta.shape, generator=g) * 0.02 * 0.5 ** 0.5
            sd[m.key] += delta.reshape(m.shape)
    paths = []
    for i, sd in enumerate(models):
        paths.append(tmp_path / f"model_{i}.safetensors")
        save_safetensors(paths[-1], sd)
    ranks = [4, 2, 2, 1]

    def run(passes):
        monkeypatch.setattr(pipeline, "EXACT_PASSES", passes)
        return run_hyper(HyperConfig(models=paths, name="broad", out_dir=tmp_path, ranks=ranks, iterations=12,
                                     dtype="float32", floor=False, overwrite=True))

    result = run(3)
    ours = [r["relative_error_covered"] for r in result.report["per_model"]]
    reference = _reference_errors(result, paths, modules, ranks, 12)
    anchor = [r for r in result.report["rounds"] if "starts" in r][-1]["starts"]["reference"]
    assert all(o <= a * (1 + 1e-6) for o, a in zip(ours, anchor)), (ours, anchor)
    assert sum(ours) < 0.97 * sum(reference)
    # the exact passes ran (kept or not) and never leave a model worse than the rounds on the cores did
    rounds = result.report["rounds"]
    tried = sum(len(r.get("exact_rejected", [])) + str(r["round"]).startswith("exact") for r in rounds)
    assert tried >= 1
    last_core_round = [r for r in rounds if not str(r["round"]).startswith("exact")][-1]
    assert all(o <= c * (1 + 1e-6) for o, c in zip(ours, last_core_round["relative_error"]))


def test_refit_exact_is_the_weighted_least_squares_truncation():
    """One LoRA, lam fixed: the exact refit is the rank-r truncation of sum_m w lam dW_m / sum_m w lam^2,
    whatever subspace the start spans (here a random one)."""
    from merge_core.hyper import decompose as D
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([10.0, 8.0, 6.0, 4.0, 2.0, 1.0])   # a spectral gap after the 4th, then noise
    deltas = [(torch.randn(60, 6, generator=g) * scale) @ torch.randn(6, 50, generator=g) / 8
              + 0.01 * torch.randn(60, 50, generator=g) for _ in range(3)]
    lam = torch.tensor([[1.0, -0.6, 0.3]])
    weights = torch.tensor([0.5, 2.0, 1.0])
    start = [(torch.randn(60, 4, generator=g), torch.linalg.qr(torch.randn(50, 4, generator=g))[0])]
    (u, v), = D.refit_exact(deltas, lam, weights, start, [4], g, power_iters=6)[0]
    target = sum(float(w * l) * d for w, l, d in zip(weights, lam[0], deltas)) / float((weights * lam[0] ** 2).sum())
    left, s, right = torch.linalg.svd(target)
    best = (left[:, :4] * s[:4]) @ right[:4]
    assert torch.linalg.matrix_norm(u @ v.T - best) < 1e-3 * torch.linalg.matrix_norm(best)
    # and the accumulators it returns are those of the new factors on the full differences
    fit = D.refit_exact(deltas, lam, weights, start, [4], torch.Generator().manual_seed(1), power_iters=6)[1]
    err = D.fit_error(fit, lam)
    direct = torch.tensor([float(torch.linalg.matrix_norm(d - float(l) * best) ** 2) for d, l in zip(deltas, lam[0])])
    assert torch.allclose(err.float(), direct, rtol=1e-3)


def test_factors_kept_in_float16_when_large_give_the_same_set(tmp_path, monkeypatch):
    # Flux-sized factors are kept in float16 (half the memory through the exact passes); forced here on a
    # small collection whose layers are wider than the sketch: the errors stay those of the float32 run
    import merge_core.hyper.pipeline as P
    lam_true = torch.tensor([[1.0, -0.6, 0.2, -0.6], [0.1, 0.5, -0.9, 0.3]])
    paths, _ = build_collection(tmp_path, lam_true, ranks=[2, 1], noise=0.01)
    runs = {}
    for name, limit in (("f32", P.FACTORS_FP32_LIMIT), ("f16", 0)):
        monkeypatch.setattr(P, "FACTORS_FP32_LIMIT", limit)
        runs[name] = run_hyper(HyperConfig(models=paths, name=name, out_dir=tmp_path, ranks=[2, 1], iterations=4,
                                           dtype="float32", floor=False))
    a = [r["relative_error_covered"] for r in runs["f32"].report["per_model"]]
    b = [r["relative_error_covered"] for r in runs["f16"].report["per_model"]]
    assert 0.01 < min(a) and max(a) < 0.9, a  # a fit with something left to refine
    assert any(str(r["round"]).startswith("exact") for r in runs["f16"].report["rounds"]) or \
        runs["f16"].report["rounds"][-1].get("exact_rejected")
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2 * max(a), (a, b)
    from merge_core.lora.format import read_lora
    for path32, path16 in zip(runs["f32"].lora_paths, runs["f16"].lora_paths):
        l32, l16 = read_lora(path32)[0], read_lora(path16)[0]
        for name, (up, down, scale) in l32.items():
            up16, down16, scale16 = l16[name]
            d32, d16 = up @ down * scale, up16 @ down16 * scale16
            rel = float((d32 - d16).norm() / d32.norm().clamp_min(1e-30))
            assert rel < 5e-3, name  # float16 storage: ~1e-3 apart (and not bit-equal: it was taken)
        assert any(not torch.equal(l32[n][0], l16[n][0]) for n in l32)


def test_sketch_per_direction_is_exact_when_each_direction_fits_its_columns():
    """Three models whose differences from their average are mixtures of two direction matrices of rank 3
    and 2: the Gram matrix's eigenvectors recover the directions, each range finder gets r + 16 columns,
    so Q and P span every difference and the cores keep all of its energy (|C_m|^2 = |dW_m|^2)."""
    from merge_core.hyper import decompose as D
    g = torch.Generator().manual_seed(3)
    out, inn = 300, 260
    e1 = torch.randn(out, 3, generator=g) @ torch.randn(3, inn, generator=g)
    e2 = torch.randn(out, 2, generator=g) @ torch.randn(2, inn, generator=g)
    mix = torch.tensor([[1.0, 0.3], [-0.4, 1.0], [-0.6, -1.3]])
    deltas = [float(a) * e1 + float(b) * e2 for a, b in mix]
    sk = D.sketch_directions(deltas, [3, 2], g, power_iters=1)
    assert sk.q is not None and sk.p is not None          # both sides wider than p = (3 + 16) + (2 + 16)
    assert sk.q.shape[1] == sk.p.shape[1] == 37
    core_sq = sk.cores.flatten(1).double().norm(dim=1) ** 2
    assert torch.allclose(core_sq, sk.delta_sq, rtol=1e-5)
    # and the bases are orthonormal
    assert torch.allclose(sk.q.T @ sk.q, torch.eye(37), atol=1e-5)


def test_direction_widths_follow_the_loras_that_start_on_each_direction():
    from merge_core.hyper import decompose as D
    # 4 models span 3 directions: LoRA 3 starts on direction 0 again (as pca_lambdas puts it)
    assert D.direction_widths([64, 64, 32, 32], 3) == [96 + 48, 64 + 32, 32 + 16]
    # 8 models, 4 LoRAs: the directions no LoRA starts on get 8 columns
    assert D.direction_widths([48, 32, 16, 16], 7) == [72, 48, 32, 32, 8, 8, 8]


def test_fit_cores_in_chunks_equals_one_batch(monkeypatch):
    """The rounds sweep CORE_CHUNK layers at a time (on worker threads): per layer the D-step is independent,
    so the factors and accumulators equal those of one batch (small cores: exact SVD, no random start)."""
    from merge_core.hyper import decompose as D
    g = torch.Generator().manual_seed(4)
    cores = torch.randn(10, 3, 12, 11, generator=g)
    lam = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.9, -1.0]])
    weights = torch.tensor([1.0, 2.0, 0.5])
    results = {}
    for chunk in (100, 3):
        monkeypatch.setattr(D, "CORE_CHUNK", chunk)
        group = D.CoreGroup(list(range(10)), cores, [3, 2], torch.zeros(10, 3, dtype=torch.float64))
        first = D.fit_cores(group, lam, weights, workers=2)
        second = D.fit_cores(group, lam, weights, workers=2)      # warm: from the first sweep's factors
        results[chunk] = (first, second, group.factors)
    for a, b in zip(results[100][:2], results[3][:2]):
        assert torch.allclose(a[0], b[0], rtol=1e-5) and torch.allclose(a[1], b[1], rtol=1e-5)
    for (u1, v1), (u2, v2) in zip(results[100][2], results[3][2]):
        assert torch.allclose(u1 @ v1.transpose(-1, -2), u2 @ v2.transpose(-1, -2), atol=1e-5)


def test_an_exact_pass_takes_only_the_layers_that_leave_no_model_worse():
    """Two models, one LoRA, three layers. The pass's refit of layer 0 helps model 0 and hurts model 1 more
    than layer 2's helps it; taking every layer leaves model 1 worse off. The choice takes layers 1 and 2:
    both models end at or below their errors before the pass, the objective lower."""
    from merge_core.hyper import decompose as D
    from merge_core.hyper.pipeline import _objective, _select_layers

    def fit(dd, cross, n):  # one LoRA: <D, D> = dd, <dW_m, D> = cross[m]
        return D.LayerFit(torch.tensor([[dd]], dtype=torch.float64), torch.tensor(cross, dtype=torch.float64)[:, None],
                          torch.tensor(n, dtype=torch.float64))

    n = [[10.0, 10.0], [10.0, 10.0], [10.0, 10.0]]
    old = [fit(1.0, [1.0, 1.0], n[0]), fit(1.0, [1.0, 1.0], n[1]), fit(1.0, [1.0, 1.0], n[2])]
    new = [fit(1.0, [2.5, -0.5], n[0]), fit(1.0, [1.5, 1.2], n[1]), fit(1.0, [1.0, 1.4], n[2])]
    n_total = torch.tensor([30.0, 30.0], dtype=torch.float64)
    lam = torch.tensor([[1.0, 1.0]])
    take, fits, rel, before, (every, every_worse) = _select_layers(old, new, lam, n_total, 2.0)
    assert bool(every_worse[1]) and not bool(every_worse[0])            # all layers: model 1 worse off
    assert take == [False, True, True]
    assert bool((rel <= before).all())
    assert _objective(rel, 2.0) < _objective(before, 2.0)
    # the mix's errors are its accumulators' least squares errors
    dd = sum(f.gram_dd for f in fits)
    cross = sum(f.cross for f in fits)
    lam_ls = cross[:, 0] / dd[0, 0]
    direct = (n_total - 2 * lam_ls * cross[:, 0] + lam_ls ** 2 * dd[0, 0]) / n_total
    assert torch.allclose(rel, direct)


def test_an_unknown_start_is_refused(tmp_path):
    lam_true = torch.tensor([[1.0, -0.6, 0.2]])
    paths, _ = build_collection(tmp_path, lam_true, ranks=[2])
    with pytest.raises(MergeError, match="start must be one of"):
        run_hyper(HyperConfig(models=paths, name="x", out_dir=tmp_path, ranks=[2], start="random"))
    assert not list(tmp_path.glob("x_*"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_release_free_memory_gives_freed_heap_back():
    """256 MB in 64 KB tensors (heap blocks, below glibc's mmap threshold), every 64th kept: the freed
    blocks sit between live ones, so glibc keeps them; release_free_memory (malloc_trim) returns them."""
    from merge_core.memory import release_free_memory

    def anon_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

    blocks = [torch.ones(16 * 1024) for _ in range(4096)]
    kept = blocks[::64]
    del blocks
    held = anon_mb()
    if not release_free_memory():
        pytest.skip("no glibc malloc_trim here")
    assert held - anon_mb() > 100, (held, anon_mb())
    assert len(kept) == 64


def test_gram_matrix_is_accurate_on_large_layers():
    """The squared norms of the differences are every error's denominator and its part outside the sketch.
    One float32 product over a whole SD1.5 conv layer (tens of millions of squares) came out low enough that
    the report said 0.0137 where the files gave 0.0172 (one float32 product here, 3.2 M squares: 1e-4 off);
    summed in blocks of 64 K elements, in float64 across blocks, it matches float64 to 2e-6."""
    from merge_core.hyper import decompose as D
    g = torch.Generator().manual_seed(8)
    deltas = [torch.randn(1280, 2500, generator=g) * 0.02 + 0.001 * m for m in range(3)]
    exact = torch.stack([d.double().reshape(-1) for d in deltas])
    expected = exact @ exact.T
    assert float(((D.gram_matrix(deltas) - expected).abs() / expected.abs().max()).max()) < 2e-6

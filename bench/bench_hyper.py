"""Hyper-merge benchmark: merge_core's decomposition vs the reference algorithm, per-model LoRA
extraction at the same total bytes, and the SVD floor, in one run.

    python bench/bench_hyper.py                    # 4 full-size SD1.5-layout fp16 models, ranks 64 64 64, 6 rounds
    python bench/bench_hyper.py --device cuda
    python bench/bench_hyper.py --fixture broad --shrink 4 --no-svd   # a harder fixture, widths / 4

Fixtures (bench/fixtures.py HYPER_FIXTURES): spectral (below), broad and many (harder: more models,
near-full-rank slowly decaying spectra, parts of each model's own, noise; ranks well below the span).

The default (spectral, full size; files _bench_data/hyper_spectral_{0..3}.safetensors): a shared base
plus, in every covered layer, six shared components with decaying singular spectra (sigma_i ~ 1/i over
256 directions) mixed with per-model coefficients of decaying scale, plus a small full-rank per-model part.
Error = |W - W_hat|^2 / |W - mean|^2 over the 350 LoRA layers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fixtures import DATA, HYPER_FIXTURES, build_hyper_fixture, fixture_ranks  # noqa: E402
from bench.hyper_files import lora_delta, read_multipliers  # noqa: E402
from bench.hyper_reference import reference_hyper  # noqa: E402
from merge_core.hyper.pipeline import HyperConfig, run_hyper  # noqa: E402
from merge_core.io import open_model  # noqa: E402
from merge_core.lora.keys import layer_deltas, lora_modules  # noqa: E402

def main() -> int:
    import resource
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", choices=sorted(HYPER_FIXTURES), default="spectral")
    ap.add_argument("--shrink", type=int, default=1, help="divide every width by this (fixture and ranks)")
    ap.add_argument("--ranks", nargs="+", type=int, help="default: the fixture's (divided by --shrink)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--power", type=float, help="merge_core's objective exponent (default: the library's)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-svd", action="store_true", help="skip the per-model SVD pass (floor, per-model LoRA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loaded", action="store_true",
                    help="instead: the demo's hyper-merge with default threads and with one, on a quiet machine "
                         "and with one core kept busy by another process (the issue's loaded-machine row)")
    ap.add_argument("--repeat", type=int, default=3, help="--loaded: runs per row (the median is reported)")
    ap.add_argument("--out", help="JSON results (default: _bench_data/bench_hyper_FIXTURE.json)")
    args = ap.parse_args()
    if args.loaded:
        return loaded_rows(args.repeat, args.out)
    ranks = args.ranks or fixture_ranks(args.fixture, args.shrink)
    t0 = time.perf_counter()
    paths = build_hyper_fixture(args.fixture, args.shrink)
    print(f"fixtures ready in {time.perf_counter() - t0:.0f} s", flush=True)
    out_dir = DATA / "hyper_out"
    out_dir.mkdir(exist_ok=True)
    dev = torch.device(args.device)

    extra = {} if args.power is None else {"power": args.power}
    t0 = time.perf_counter()
    ours = run_hyper(HyperConfig(models=paths, name="bench", out_dir=out_dir, ranks=ranks,
                                 iterations=args.iterations, device=args.device, dtype="float16", tol=1e-4,
                                 floor=False, overwrite=True, threads=args.threads, **extra))
    ours_s = time.perf_counter() - t0
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report_err = [r["relative_error_covered"] for r in ours.report["per_model"]]
    print(f"merge_core: {ours_s:.1f} s, peak RSS {ours_rss:.0f} MB, errors (its report) "
          f"{['%.4f' % e for e in report_err]}", flush=True)

    # The reference, the per-model baseline and the floor all work on the same differences from the hyper model.
    sources = [open_model(p) for p in paths]
    hyper = open_model(ours.hyper_path)
    modules = lora_modules(sources[0].specs(), "sd1")
    total_rank = sum(ranks)
    per_model_rank = total_rank // len(paths)   # same total LoRA bytes split over the models
    floor = torch.zeros(len(paths), dtype=torch.float64)
    per_model = torch.zeros(len(paths), dtype=torch.float64)
    norms = torch.zeros(len(paths), dtype=torch.float64)
    deltas_fp16 = []
    t0 = time.perf_counter()
    for mod in modules:
        deltas = layer_deltas(sources, hyper, mod, dev)
        deltas_fp16.append([d.half().cpu() for d in deltas])
        for m, d in enumerate(deltas):
            if args.no_svd:
                norms[m] += float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
                continue
            s2 = torch.linalg.svdvals(d).double() ** 2
            norms[m] += float(s2.sum())
            floor[m] += float(s2[total_rank:].sum())
            per_model[m] += float(s2[per_model_rank:].sum())
    svd_s = time.perf_counter() - t0
    print(f"floor + per-model extraction: {svd_s:.0f} s", flush=True)

    t0 = time.perf_counter()
    lam, factors = reference_hyper(deltas_fp16, ranks, args.iterations)
    ref_s = time.perf_counter() - t0
    # reference error, from the original (undeflated) differences
    # ours too, from the files it wrote (kohya's formula, the strengths of the multipliers file): the
    # report's own figures are not taken on trust
    strengths = read_multipliers(ours.multipliers_path)
    loras = [open_model(p) for p in ours.lora_paths]
    ref_sq = torch.zeros(len(paths), dtype=torch.float64)
    ours_sq = torch.zeros(len(paths), dtype=torch.float64)
    for i, mod in enumerate(modules):
        deltas = layer_deltas(sources, hyper, mod, dev)
        ours_d = [lora_delta(lora, mod.name).to(dev) for lora in loras]
        for m, d in enumerate(deltas):
            recon = sum(float(lam[k, m]) * (u @ v.T) for k, (u, v) in enumerate(factors[i]))
            ref_sq[m] += float(torch.linalg.vector_norm(d - recon, dtype=torch.float64) ** 2)
            mine = sum(strengths[paths[m].stem][k] * dk for k, dk in enumerate(ours_d))
            ours_sq[m] += float(torch.linalg.vector_norm(d - mine, dtype=torch.float64) ** 2)
    for lora in loras:
        lora.close()
    ref_err = (ref_sq / norms).tolist()
    ours_err = (ours_sq / norms).tolist()
    print(f"merge_core from its files: {['%.4f' % e for e in ours_err]} (report: {['%.4f' % e for e in report_err]})")
    print(f"reference: {ref_s:.1f} s, errors {['%.4f' % e for e in ref_err]}", flush=True)
    for s in sources:
        s.close()
    hyper.close()

    floor_err = (floor / norms).tolist()
    pm_err = (per_model / norms).tolist()
    rows = [f"fixture {args.fixture}, widths / {args.shrink}, {len(paths)} models, ranks {ranks}, "
            f"{args.iterations} rounds",
            "| model | merge_core | reference (greedy ALS) | ours / reference | per-model LoRA, same bytes | "
            "SVD floor (rank %d) |" % total_rank,
            "|---|---:|---:|---:|---:|---:|"]
    for m, p in enumerate(paths):
        rows.append(f"| {p.stem} | {ours_err[m]:.4f} | {ref_err[m]:.4f} | {ours_err[m] / ref_err[m]:.3f} | "
                    f"{pm_err[m]:.4f} | {floor_err[m]:.4f} |")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows.append(f"| **mean** | **{mean(ours_err):.4f}** | {mean(ref_err):.4f} | {mean(ours_err) / mean(ref_err):.3f} "
                f"| {mean(pm_err):.4f} | {mean(floor_err):.4f} |")
    rows.append(f"| worst model | {max(ours_err):.4f} | {max(ref_err):.4f} | | | |")
    rows.append(f"| time (s) | {ours_s:.1f} | {ref_s:.1f} | {ours_s / ref_s:.3f} | (SVD pass {svd_s:.0f}) | |")
    table = "\n".join(rows)
    print(table)
    print("rounds:", [round(r["mean_relative_error"], 4) for r in ours.report["rounds"]])
    out = Path(args.out) if args.out else DATA / f"bench_hyper_{args.fixture}.json"
    out.write_text(json.dumps({"table": table, "ours": ours.report, "ours_from_files": ours_err, "reference": ref_err,
                               "per_model": pm_err, "floor": floor_err, "peak_rss_mb_ours": ours_rss,
                               "times": {"ours": ours_s, "reference": ref_s, "svd": svd_s}}, indent=2))
    return 0


def loaded_rows(repeat: int, out: str | None) -> int:
    """The demo's hyper-merge (merge_core.demo models, ranks 4 2, 3 rounds, as `python -m merge_core demo`
    runs it) with the library's default threads and with one thread, on the machine as it is and with one
    core kept busy by a spinning process: default threads must not lose to one thread under load."""
    import os
    import shutil
    import statistics
    import subprocess
    import tempfile
    from merge_core.demo import write_demo_models
    from merge_core.threads import resolve_threads
    folder = Path(tempfile.mkdtemp(prefix="bench-hyper-loaded-"))
    paths = write_demo_models(folder)

    def timed(threads):
        times = []
        for i in range(repeat):
            t0 = time.perf_counter()
            run_hyper(HyperConfig(models=paths, name=f"d{i}", out_dir=folder, ranks=[4, 2], iterations=3,
                                  dtype="float16", floor=False, overwrite=True, threads=threads))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = []
    for load in ("quiet", "one core busy"):
        spinner = None
        if load != "quiet":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            default, single = timed(None), timed(1)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        rows.append((load, default, single, os.getloadavg()[0]))
    shutil.rmtree(folder, ignore_errors=True)
    table = ["| machine | default threads (%d) | one thread | default / one | load average after |" % resolve_threads(None),
             "|---|---:|---:|---:|---:|"]
    for load, default, single, avg in rows:
        table.append(f"| {load} | {default:.2f} s | {single:.2f} s | {default / single:.2f} | {avg:.1f} |")
    text = "\n".join(table)
    print(text)
    target = Path(out) if out else DATA / "bench_hyper_loaded.json"
    DATA.mkdir(exist_ok=True)
    target.write_text(json.dumps({"table": text, "rows": rows, "repeat": repeat,
                                  "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merge benchmark: merge_core against the I/O floor and sd-mecha, in one run.

Every measurement runs in a fresh child process (so its peak RSS is its own)
and times only the work, not interpreter start-up or imports. Inputs are read
once before the measurements, so every row sees the same warm page cache.

    python bench/bench_merge.py                      # SD1.5 rows + SDXL memory row
    python bench/bench_merge.py --skip-sdxl --repeat 1
    python bench/bench_merge.py --device cuda        # merge_core rows on the GPU

sd-mecha rows need a venv with sd-mecha 1.1.8 (default .venv-mecha; made by
`python3 -m venv .venv-mecha && .venv-mecha/bin/pip install torch==2.13.0 sd-mecha==1.1.8`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fixtures import DATA, ensure_models  # noqa: E402

CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
mode, args = sys.argv[1], json.loads(sys.argv[2])
out = args["output"]
if mode == "floor":
    t0 = time.perf_counter()
    buf = bytearray(64 << 20); mv = memoryview(buf)
    for p in args["inputs"]:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    left = args["size"]
    while left > 0:
        left -= os.write(fd, mv[:min(left, len(buf))])
    os.fsync(fd); os.close(fd)
    seconds = time.perf_counter() - t0
elif mode == "ours":
    import torch
    from merge_core.engine import merge
    t0 = time.perf_counter()
    merge(args["inputs"], args["method"], output=out, overwrite=True, threads=args["threads"], dtype="fp16",
          device=args["device"], hash_inputs=False, **args.get("kw", {{}}))
    seconds = time.perf_counter() - t0
elif mode == "mecha":
    import torch, sd_mecha
    sd_mecha.set_log_level("WARNING") if hasattr(sd_mecha, "set_log_level") else None
    t0 = time.perf_counter()
    models = [sd_mecha.model(p) for p in args["inputs"]]
    method = args["method"]
    if method == "sma":
        recipe = sd_mecha.n_average(*models)
    elif method == "slerp":
        recipe = sd_mecha.slerp(models[0], models[1], alpha=0.5)
    elif method == "geometric-median":
        recipe = sd_mecha.geometric_median(*models)
    else:  # task-vector methods: the first input is the base
        base, tuned = models[0], models[1:]
        if method == "model-stock":
            recipe = sd_mecha.n_model_stock(base, *tuned)
        elif method == "ties":  # (its add_difference wrapper fails on an unresolved merge space: the method)
            from sd_mecha.extensions.builtin.merge_methods import linear
            deltas = [sd_mecha.subtract(m, base) for m in tuned]
            recipe = linear.add_difference(base, sd_mecha.ties_sum(*deltas, k=0.2, vote_sgn=True), alpha=1.0)
        elif method == "dare":  # sd-mecha's nearest: dropout (n-supermario: drop, mean over the kept, rescale)
            recipe = sd_mecha.dropout(base, *tuned, probability=0.9, alpha=1.0, seed=0)
        elif method == "dare-ties":
            recipe = sd_mecha.add_ties_with_dare(base, *tuned, probability=0.9, k=1.0, vote_sgn=True,
                                                 apply_stock=True, seed=0, alpha=1.0)
    sd_mecha.merge(recipe, output=out, threads=args["threads"], output_dtype=torch.float16,
                   merge_dtype=torch.float32, merge_device="cpu", output_device="cpu")
    seconds = time.perf_counter() - t0
os.unlink(out)
print("RESULT " + json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
'''


def run_child(python: str, mode: str, args: dict) -> dict:
    code = CHILD.format(root=str(ROOT))
    proc = subprocess.run([python, "-c", code, mode, json.dumps(args)], capture_output=True, text=True,
                          env=dict(os.environ, TQDM_DISABLE="1"))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")


def warm(paths) -> None:
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def best_of(repeat: int, python: str, mode: str, args: dict) -> dict:
    runs = [run_child(python, mode, args) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mecha-python", default=str(ROOT / ".venv-mecha" / "bin" / "python"))
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument("--rows", choices=["all", "new", "blocks", "gram"], default="all",
                    help="new: only sma and the issue-5 methods (model stock, geometric median, TIES, DARE, "
                         "DARE-TIES) against sd-mecha's same methods")
    ap.add_argument("--out", default=str(ROOT / "_bench_data" / "bench_merge.json"))
    args = ap.parse_args()
    py = sys.executable
    sd15 = [str(p) for p in ensure_models("sd15")]
    out = str(DATA / "bench_out.safetensors")
    size = os.path.getsize(sd15[0])
    warm(sd15)
    rows = []

    def row(name, python, mode, margs, baseline=None, once=False):
        r = best_of(1 if once else args.repeat, python, mode,
                    dict(margs, output=out, threads=args.threads, device=args.device))
        r["name"] = name
        rows.append(r)
        print(f"{name:34s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
        return r

    if args.rows == "new":
        return new_method_rows(args, py, sd15, row, rows, out)
    if args.rows == "blocks":
        return block_rows(args, py, sd15, row, rows)
    if args.rows == "gram":
        return gram_rows(args, py, sd15, row, rows)
    floor = row("I/O floor (read 3 + write 1)", py, "floor", {"inputs": sd15, "size": size})
    floor2 = row("I/O floor (read 2 + write 1)", py, "floor", {"inputs": sd15[:2], "size": size})
    ours = {}
    for method, inputs, kw in [("sma", sd15, {}), ("wma", sd15, {}), ("ema", sd15, {"alpha": 0.5}),
                               ("slerp", sd15[:2], {"t": 0.5}), ("karcher", sd15, {})]:
        ours[method] = row(f"merge_core {method} ({len(inputs)} models)", py, "ours",
                           {"inputs": inputs, "method": method, "kw": kw})
    mecha = {}
    if Path(args.mecha_python).exists():
        mecha["sma"] = row("sd-mecha 1.1.8 n_average (3 models)", args.mecha_python, "mecha",
                           {"inputs": sd15, "method": "sma"})
        mecha["slerp"] = row("sd-mecha 1.1.8 slerp (2 models)", args.mecha_python, "mecha",
                             {"inputs": sd15[:2], "method": "slerp"})
    sdxl_row = None
    if not args.skip_sdxl:
        sdxl = [str(p) for p in ensure_models("sdxl")]
        sdxl_row = best_of(1, py, "ours", {"inputs": sdxl, "method": "karcher", "output": out,
                                           "threads": args.threads, "device": args.device})
        print(f"{'merge_core karcher SDXL (3 models)':34s} {sdxl_row['seconds']:7.2f} s  peak RSS "
              f"{sdxl_row['peak_rss_mb']:7.0f} MB")

    lines = ["| run | wall s | × I/O floor | × sd-mecha | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    lines.append(f"| I/O floor: read 3 inputs + write 1 output | {floor['seconds']:.2f} | 1.00 | | "
                 f"{floor['peak_rss_mb']:.0f} |")
    lines.append(f"| I/O floor: read 2 inputs + write 1 output | {floor2['seconds']:.2f} | 1.00 | | "
                 f"{floor2['peak_rss_mb']:.0f} |")
    for method, r in ours.items():
        fl = floor2 if method == "slerp" else floor
        vs = mecha.get("sma" if method != "slerp" else "slerp")
        speed = f"{vs['seconds'] / r['seconds']:.1f}× faster" if vs and method in ("sma", "slerp") else ""
        lines.append(f"| merge_core {method} | {r['seconds']:.2f} | {r['seconds'] / fl['seconds']:.2f} | {speed} | "
                     f"{r['peak_rss_mb']:.0f} |")
    for method, r in mecha.items():
        fl = floor2 if method == "slerp" else floor
        lines.append(f"| sd-mecha 1.1.8 {'n_average' if method == 'sma' else 'slerp'} | {r['seconds']:.2f} | "
                     f"{r['seconds'] / fl['seconds']:.2f} | 1.00 | {r['peak_rss_mb']:.0f} |")
    lines.append(f"| karcher / sma | {ours['karcher']['seconds'] / ours['sma']['seconds']:.2f} | | | |")
    if sdxl_row:
        lines.append(f"| merge_core karcher, SDXL, 3 models | {sdxl_row['seconds']:.2f} | | | "
                     f"{sdxl_row['peak_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print()
    print(table)
    Path(args.out).write_text(json.dumps({"rows": rows, "sdxl": sdxl_row, "table": table,
                                          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                                          "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    return 0


# The issue-5 methods on the same 3 x SD1.5 set: the task-vector ones take the first file as the base and the
# other two as fine-tunes (3 inputs read, like sma); the geometric median takes all three.
NEW_METHODS = [
    ("model-stock", {"base": 0}, "n_model_stock"),
    ("geometric-median", {}, "geometric_median"),
    ("ties", {"base": 0, "params": {"density": 0.2}}, "ties_sum(k=0.2, vote_sgn)"),
    ("dare", {"base": 0, "params": {"density": 0.1}}, "dropout(p=0.9) [n-supermario]"),
    ("dare-ties", {"base": 0, "params": {"density": 0.1}}, "add_ties_with_dare(p=0.9, k=1)"),
]


def report(args, file_name: str, rows, table: str) -> int:
    """Print a row set's table and keep it, with the machine, its load and the time, beside --out."""
    print()
    print(table)
    Path(args.out).with_name(file_name).write_text(json.dumps(
        {"rows": rows, "table": table, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
         "load_average": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    return 0


def new_method_rows(args, py, sd15, row, rows, out) -> int:
    sma = row("merge_core sma (3 models)", py, "ours", {"inputs": sd15, "method": "sma"})
    lines = ["| method | merge_core s | MB | sd-mecha 1.1.8 (its method) | s | MB | speed-up | RSS ratio | "
             "× our sma |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    have_mecha = Path(args.mecha_python).exists()
    for method, spec, mecha_name in NEW_METHODS:
        kw = dict(spec.get("params") and {"params": spec["params"]} or {})
        inputs = sd15[1:] if "base" in spec else sd15
        if "base" in spec:
            kw["base"] = sd15[0]
        ours = row(f"merge_core {method}", py, "ours", {"inputs": inputs, "method": method, "kw": kw})
        mecha = (row(f"sd-mecha {mecha_name}", args.mecha_python, "mecha", {"inputs": sd15, "method": method})
                 if have_mecha else None)
        speed = f"{mecha['seconds'] / ours['seconds']:.1f}×" if mecha else ""
        ratio = f"{ours['peak_rss_mb'] / mecha['peak_rss_mb']:.2f}" if mecha else ""
        lines.append(f"| {method} | {ours['seconds']:.2f} | {ours['peak_rss_mb']:.0f} | {mecha_name} | "
                     f"{mecha['seconds'] if mecha else float('nan'):.2f} | "
                     f"{mecha['peak_rss_mb'] if mecha else float('nan'):.0f} | {speed} | {ratio} | "
                     f"{ours['seconds'] / sma['seconds']:.2f} |")
    lines.append(f"| sma (reference) | {sma['seconds']:.2f} | {sma['peak_rss_mb']:.0f} | | | | | | 1.00 |")
    table = "\n".join(lines)
    return report(args, "bench_merge_methods.json", rows, table)


# Block weights keep Karcher on the Gram path (coefficients per key): the same work as a plain Karcher.
KARCHER_BLOCK_ROWS = ["BASE:1, IN*:0.5, M00:1, OUT*:2", "BASE:1, IN00-IN05:2, OUT*:1", "BASE:0.5, OUT*:0.25"]


def block_rows(args, py, sd15, row, rows) -> int:
    """Plain Karcher against block-weighted Karcher (one weight row per model) on the same files, the runs
    interleaved so both see the same machine; the best of `--repeat` each."""
    plain, blocked = [], []
    for _ in range(args.repeat):
        plain.append(row("merge_core karcher (3 models)", py, "ours", {"inputs": sd15, "method": "karcher"}))
        blocked.append(row("merge_core karcher, block weights", py, "ours",
                           {"inputs": sd15, "method": "karcher", "kw": {"blocks": KARCHER_BLOCK_ROWS}}))
    best_plain = min(plain, key=lambda r: r["seconds"])
    best_blocked = min(blocked, key=lambda r: r["seconds"])
    table = "\n".join([
        "| run | wall s (best of %d) | peak RSS MB |" % args.repeat, "|---|---:|---:|",
        f"| merge_core karcher, 3 × SD1.5 | {best_plain['seconds']:.2f} | {best_plain['peak_rss_mb']:.0f} |",
        f"| merge_core karcher, block weights (one row per model) | {best_blocked['seconds']:.2f} | "
        f"{best_blocked['peak_rss_mb']:.0f} |",
        f"| block-weighted / plain | {best_blocked['seconds'] / best_plain['seconds']:.3f} | "
        f"{best_blocked['peak_rss_mb'] / best_plain['peak_rss_mb']:.3f} |"])
    return report(args, "bench_merge_blocks.json", rows, table)


# The Gram-path methods (one Gram pass + one linear pass, reading the inputs twice) against sma (one pass).
# Model stock takes file 0 as its base, so every row reads the same 3 files.
GRAM_ROWS = (("sma", {}), ("model-stock", {"base": 0}), ("geometric-median", {}), ("karcher", {}))


def gram_rows(args, py, sd15, row, rows) -> int:
    """sma, model stock, geometric median and karcher interleaved (each round runs all four, so all see the
    same machine); the best of `--repeat` each, and each as a ratio to the best sma."""
    runs: dict[str, list[dict]] = {m: [] for m, _ in GRAM_ROWS}
    for _ in range(args.repeat):
        for method, spec in GRAM_ROWS:
            inputs, kw = (sd15[1:], {"base": sd15[0]}) if "base" in spec else (sd15, {})
            runs[method].append(row(f"merge_core {method}", py, "ours",
                                    {"inputs": inputs, "method": method, "kw": kw}, once=True))
    best = {m: min(r, key=lambda x: x["seconds"]) for m, r in runs.items()}
    lines = [f"| method | wall s (best of {args.repeat}) | × sma | peak RSS MB | all runs s |",
             "|---|---:|---:|---:|---|"]
    for method, _ in GRAM_ROWS:
        b = best[method]
        lines.append(f"| {method} | {b['seconds']:.2f} | {b['seconds'] / best['sma']['seconds']:.2f} | "
                     f"{max(r['peak_rss_mb'] for r in runs[method]):.0f} | "
                     f"{', '.join('%.2f' % r['seconds'] for r in runs[method])} |")
    table = "\n".join(lines)
    return report(args, "bench_merge_gram.json", rows, table)


if __name__ == "__main__":
    sys.exit(main())

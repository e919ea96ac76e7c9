"""Language-model merge benchmark: merge_core karcher/slerp against mergekit on the same inputs, in one run.

Inputs: three random Llama-shaped models (HF folders: model.safetensors + config.json), a shared random
base plus a per-model change, built locally from a config (no hub) into the git-ignored `_bench_data/lm/`.
Every measured row runs in a fresh child process (wall time of the whole command, peak RSS of that
process from wait4), after the inputs were read once (warm page cache for every row).

    python bench/bench_lm.py                       # ~1 GB bf16 models, mergekit rows if .venv-mergekit exists
    python bench/bench_lm.py --size-mb 300 --skip-curve
    python bench/bench_lm.py --curve-only          # Karcher cost for N = 2, 10, 30, 100 small models

mergekit rows need its own venv (it pulls its own torch):
`python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install mergekit`.
Agreement: both tools also write float32 outputs; every tensor must agree to 1e-4 relative (Frobenius).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "_bench_data" / "lm"


def llama_shape(size_mb: int) -> dict:
    """A Llama config whose bf16 weights are about `size_mb` MB (hidden 2048, vocab 32000, untied)."""
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_mb * 1e6 / 2 - fixed) / per_layer))
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=vocab, tie_word_embeddings=False, torch_dtype="bfloat16")


def small_shape() -> dict:
    return dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=4000, tie_word_embeddings=False, torch_dtype="float16")


def build_models(folder: Path, shape: dict, count: int, dtype: str, spread: float = 0.05) -> list[Path]:
    """`count` HF folders: a shared random base plus `spread` x a per-model random change (like fine-tunes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from merge_core.io import save_safetensors
    tdtype = getattr(torch, dtype)
    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        specs = {k: (tuple(v.shape), k.endswith("norm.weight")) for k, v in LlamaForCausalLM(config).state_dict().items()}
    paths = [folder / f"model_{i + 1}" for i in range(count)]
    if all((p / "model.safetensors").is_file() for p in paths):
        for p in paths:
            config.save_pretrained(p)
        return paths
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.ones(s) if norm else torch.randn(s, generator=gen) * 0.02) for k, (s, norm) in specs.items()}
    for i, p in enumerate(paths):
        g = torch.Generator().manual_seed(1000 + i)
        sd = {k: (v + torch.randn(v.shape, generator=g) * (spread * (0.02 if not specs[k][1] else 1.0))).to(tdtype)
              for k, v in base.items()}
        save_safetensors(p / "model.safetensors", sd)
        config.save_pretrained(p)
        del sd
    return paths


CHILD = r'''
import json, sys, time
sys.path.insert(0, {root!r})
args = json.loads(sys.argv[1])
from merge_core.engine import merge
t0 = time.perf_counter()
merge(args["inputs"], args["method"], output=args["output"], overwrite=True, dtype=args["dtype"],
      hash_inputs=False, threads=args["threads"], **args["kw"])
print("SECONDS", time.perf_counter() - t0)
'''


def measured(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one child process (GNU time's max RSS when available, else wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1"))
    # wait4 gives this child's own rusage (peak RSS in KiB on Linux)
    import threading
    out_chunks, err_chunks = [], []

    def drain(stream, sink):
        sink.append(stream.read())
    threads = [threading.Thread(target=drain, args=(proc.stdout, out_chunks)),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err_chunks[0].decode()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out_chunks[0].decode()}


def ours(inputs, method, output, dtype, threads, kw=None) -> dict:
    args = {"inputs": [str(p) for p in inputs], "method": method, "output": str(output), "dtype": dtype,
            "threads": threads, "kw": kw or {}}
    res = measured([sys.executable, "-c", CHILD.format(root=str(ROOT)), json.dumps(args)])
    res["work_seconds"] = float(res["stdout"].split("SECONDS")[-1])  # the merge alone, without start-up
    return res


def mergekit(mk_bin: Path, inputs, method, output: Path, dtype: str, out_dtype: str, t: float = 0.5) -> dict:
    cfg = {"merge_method": method, "dtype": dtype, "out_dtype": out_dtype,
           "models": [{"model": str(p)} for p in inputs]}
    if method == "slerp":
        cfg["base_model"] = str(inputs[0])
        cfg["parameters"] = {"t": t}
    path = output.parent / f"{output.name}.yml"
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(output, ignore_errors=True)
    return measured([str(mk_bin), str(path), str(output), "--no-copy-tokenizer"])


def warm(paths) -> None:
    buf = bytearray(64 << 20)
    for p in paths:
        for f in sorted(Path(p).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as h:
                while h.readinto(buf):
                    pass


def max_relative_difference(a_dir: Path, b_dir: Path) -> tuple[float, str]:
    """max over tensors of ||a - b|| / ||b|| (float64), for two model folders."""
    from merge_core.io.sources import open_model
    worst, worst_key = 0.0, ""
    with open_model(a_dir) as a, open_model(b_dir) as b:
        assert set(a.keys()) == set(b.keys()), set(a.keys()) ^ set(b.keys())
        for key in a.keys():
            x, y = a.load(key).double(), b.load(key).double()
            rel = float((x - y).norm() / y.norm().clamp_min(1e-30))
            if rel > worst:
                worst, worst_key = rel, key
            a.release(key)
            b.release(key)
    return worst, worst_key


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def worker(*argv) -> str:
    """Run a step that needs torch in a child process: the parent stays small (a child inherits the
    parent's peak RSS across fork + exec, so a large parent would inflate every measured row)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(argv)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {argv[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def run_worker(spec: str) -> None:
    argv = json.loads(spec)
    if argv[0] == "build":
        print(json.dumps([str(p) for p in build_models(Path(argv[1]), argv[2], argv[3], argv[4])]))
    elif argv[0] == "compare":
        print(json.dumps(max_relative_difference(Path(argv[1]), Path(argv[2]))))


def head_to_head(args) -> dict:
    shape = llama_shape(args.size_mb)
    models = [Path(p) for p in json.loads(worker("build", str(DATA / f"llama_{args.size_mb}mb"), shape, 3, "bfloat16"))]
    size = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
    print(f"inputs: 3 Llama-shaped bf16 models, {shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}, vocab {shape['vocab_size']}: {size / 1e9:.2f} GB each", flush=True)
    warm(models)
    out = DATA / "out"
    mk_bin = Path(args.mergekit_bin)
    rows, agree = {}, {}
    plans = [("karcher", models, {}), ("slerp", models[:2], {"t": 0.3})]
    for method, inputs, kw in plans:
        for r in range(args.repeat):
            o = out / f"ours_{method}"
            rm(o)
            res = ours(inputs, method, o, "bf16", args.threads, kw)
            rows.setdefault(f"ours {method}", []).append(res)
            print(f"merge_core {method:8s} {res['seconds']:7.2f} s (merge alone {res['work_seconds']:.2f} s)  peak RSS "
                  f"{res['peak_rss_mb']:7.0f} MB", flush=True)
            if mk_bin.exists():
                m = out / f"mk_{method}"
                res = mergekit(mk_bin, inputs, method, m, "float32", "bfloat16", kw.get("t", 0.5))
                rows.setdefault(f"mergekit {method}", []).append(res)
                print(f"mergekit   {method:8s} {res['seconds']:7.2f} s  peak RSS {res['peak_rss_mb']:7.0f} MB",
                      flush=True)
        if mk_bin.exists() and not args.skip_agreement:
            # Same inputs, float32 outputs, compared tensor by tensor. mergekit runs its iteration on the whole
            # tensors in its `dtype`: in float32 its rounding over millions of elements exceeds tol and moves the
            # Karcher mean (up to ~1e-3), so the definition both share is mergekit in float64 (exact) against
            # ours (Gram matrix in float64, combination in float32). Both mergekit modes are reported.
            o32 = out / f"ours_{method}_fp32"
            rm(o32)
            ours(inputs, method, o32, "fp32", args.threads, kw)
            for mk_dtype in ("float64", "float32"):
                m32 = out / f"mk_{method}_{mk_dtype}"
                mergekit(mk_bin, inputs, method, m32, mk_dtype, "float32", kw.get("t", 0.5))
                worst, key = json.loads(worker("compare", str(o32), str(m32)))
                agree[f"{method} vs mergekit dtype {mk_dtype}"] = {"max_relative_difference": worst, "key": key}
                print(f"agreement {method} vs mergekit (dtype {mk_dtype}): max relative difference {worst:.2e} "
                      f"({key})", flush=True)
                rm(m32)
            rm(o32)
    best = {k: {"seconds": min(r["seconds"] for r in v), "peak_rss_mb": max(r["peak_rss_mb"] for r in v)}
            for k, v in rows.items()}
    return {"input_gb_each": size / 1e9, "shape": shape, "rows": best, "agreement": agree}


def curve(args) -> list[dict]:
    shape = small_shape()
    models = [Path(p) for p in json.loads(worker("build", str(DATA / "small"), shape, max(args.curve), "float16"))]
    each = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
    print(f"curve inputs: {each / 1e6:.1f} MB fp16 Llama-shaped models", flush=True)
    warm(models)
    points = []
    for n in args.curve:
        o = DATA / "out" / f"curve_{n}.safetensors"
        res = min((ours(models[:n], "karcher", o, "fp16", args.threads) for _ in range(args.repeat)),
                  key=lambda r: r["work_seconds"])
        sma = min((ours(models[:n], "sma", o, "fp16", args.threads) for _ in range(args.repeat)),
                  key=lambda r: r["work_seconds"])
        rm(o)
        ns_per_byte = res["work_seconds"] / (n * each) * 1e9
        points.append({"n": n, "seconds": res["work_seconds"], "sma_seconds": sma["work_seconds"],
                       "input_mb": n * each / 1e6, "ns_per_input_byte": ns_per_byte,
                       "sma_ns_per_input_byte": sma["work_seconds"] / (n * each) * 1e9,
                       "peak_rss_mb": res["peak_rss_mb"]})
        print(f"karcher N={n:4d}: {res['work_seconds']:7.2f} s, {n * each / 1e6:8.0f} MB in, "
              f"{ns_per_byte:.2f} ns per input byte (sma {points[-1]['sma_ns_per_input_byte']:.2f}), "
              f"karcher/sma {res['work_seconds'] / sma['work_seconds']:.2f}, peak RSS {res['peak_rss_mb']:.0f} MB",
              flush=True)
    return points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1000, help="size of each bf16 input model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    ap.add_argument("--mergekit-bin", default=str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"))
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--curve-only", action="store_true")
    ap.add_argument("--curve", type=int, nargs="+", default=[2, 10, 30, 100])
    ap.add_argument("--out", default=str(DATA / "bench_lm.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker)
        return 0
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "out").mkdir(exist_ok=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "when": time.strftime("%Y-%m-%d %H:%M")}
    if not args.curve_only:
        result["head_to_head"] = head_to_head(args)
    if not args.skip_curve:
        result["karcher_curve"] = curve(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    h = result.get("head_to_head")
    if h and "mergekit karcher" in h["rows"]:
        for method in ("karcher", "slerp"):
            o, m = h["rows"][f"ours {method}"], h["rows"][f"mergekit {method}"]
            print(f"{method}: {m['seconds'] / o['seconds']:.1f}x faster than mergekit, peak RSS "
                  f"{o['peak_rss_mb'] / m['peak_rss_mb']:.2f}x of mergekit's")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hostile-input classes of the reliability issue, run against a checkout (argv[1]); one JSON verdict per case.

Usage: python bench/hostile_classes.py CHECKOUT > verdicts.jsonl (see docs/reliability.md)."""
import json, os, shutil, signal, struct, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path(sys.argv[1]); PY = sys.executable
env = dict(os.environ, PYTHONPATH=str(ROOT))
sys.path.insert(0, str(ROOT))
import torch
from merge_core.io import save_safetensors
from merge_core.demo import small_sd15_state_dicts

def cli(*args, cwd=None, timeout=300):
    p = subprocess.run([PY, "-m", "merge_core", *map(str, args)], env=env, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return p.returncode, p.stderr.strip(), p.stdout.strip()

def verdict(name, ok, detail):
    print(json.dumps({"case": name, "ok": bool(ok), "detail": detail[-160:]}))

def fresh():
    d = Path(tempfile.mkdtemp()); m = d / "X" / "models"; m.mkdir(parents=True)
    for i, sd in enumerate(small_sd15_state_dicts(2, dtype=torch.float16)):
        save_safetensors(m / f"m{i}.safetensors", sd)
    (m / "notes.txt").write_text("user file")
    return d, m

def listing(d): return sorted(str(p.relative_to(d)) for p in d.rglob("*"))

# 1. folder output = inputs folder with --overwrite
d, m = fresh(); before = listing(d)
rc, err, _ = cli("merge", "--models", m, "--method", "sma", "--output", m, "--overwrite", "-q")
verdict("folder output over the inputs' folder", rc == 1 and listing(d) == before, f"rc={rc} files_kept={listing(d)==before} {err}")
d, m = fresh(); before = listing(d)
rc, err, _ = cli("merge", "--models", m, "--method", "sma", "--output", m.parent, "--overwrite", "-q")
verdict("folder output over a parent of the inputs", rc == 1 and listing(d) == before, f"rc={rc} files_kept={listing(d)==before} {err}")
# 2. header fields
def bad_header(path, header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
d, m = fresh()
cases = {
  "offsets as strings": {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}},
  "offsets as floats": {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},
  "dtype not a string": {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
  "shape 64.9": {"w": {"dtype": "U8", "shape": [64.9], "data_offsets": [0, 64]}},
  "shape 1e30 x 0": {"w": {"dtype": "F32", "shape": [1e30, 0], "data_offsets": [0, 0]}},
}
for name, h in cases.items():
    p = d / "h.safetensors"; bad_header(p, h, b"\0" * 64)
    rc, err, _ = cli("inspect", p, "--no-hash")
    verdict(f"header: {name}", rc == 1 and "Traceback" not in err, f"rc={rc} {err.splitlines()[-1] if err else ''}")
p = d / "h.safetensors"; bad_header(p, b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', b"\0" * 4)
rc, err, _ = cli("inspect", p, "--no-hash"); verdict("header: shape 1e400", rc == 1 and "Traceback" not in err, f"rc={rc} {err.splitlines()[-1] if err else ''}")
bad_header(p, b"[" * 100000)
rc, err, _ = cli("inspect", p, "--no-hash"); verdict("header: 100k nested [", rc == 1 and "Traceback" not in err, f"rc={rc} {err.splitlines()[-1] if err else ''}")
# 3. parameters
d, m = fresh(); ms = sorted(m.glob("*.safetensors"))
for args, name in [(["--method", "karcher", "--karcher-tol", "nan"], "--karcher-tol nan"), (["--method", "karcher", "--karcher-tol", "inf"], "--karcher-tol inf"),
                   (["--method", "sma", "--threads", "-1"], "--threads -1"), (["--method", "sma", "--device", "nonsense"], "--device nonsense"),
                   (["--method", "sma", "--device", "meta"], "--device meta"), (["--method", "weighted", "--multiplier", "nan"], "--multiplier nan")]:
    out = d / "o.safetensors"
    rc, err, _ = cli("merge", "--models", *ms, "--output", out, "-q", *args)
    verdict(f"param {name}", rc == 1 and "Traceback" not in err and not out.exists() and "overflow" not in err, f"rc={rc} written={out.exists()} {err.splitlines()[-1] if err else ''}")
    if out.exists(): out.unlink()
# 4. fp8 inputs
d = Path(tempfile.mkdtemp())
for i, sd in enumerate(small_sd15_state_dicts(2, dtype=torch.float32)):
    save_safetensors(d / f"f{i}.safetensors", {k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v) for k, v in sd.items()})
rc, err, _ = cli("merge", "--models", d / "f0.safetensors", d / "f1.safetensors", "--method", "karcher", "--output", d / "o.safetensors", "-q")
verdict("fp8 inputs", rc == 0, f"rc={rc} {err.splitlines()[-1] if err else ''}")
# 5. 40 inputs with ordinary names
d = Path(tempfile.mkdtemp()); names = []
for i in range(40):
    p = d / f"my_favourite_checkpoint_number_{i:03d}_pruned_fp16.safetensors"; save_safetensors(p, {"model.diffusion_model.x": torch.full((4,), float(i + 1))}); names.append(p)
rc, err, _ = cli("merge", "--models", *names, "--method", "sma", "--output", d / "o.safetensors", "-q")
verdict("40 inputs with ordinary names", rc == 0, f"rc={rc} {err.splitlines()[-1] if err else ''}")
# 6. environment
d, m = fresh(); ms = sorted(m.glob("*.safetensors"))
(d / "x.safetensors").mkdir(); t0 = time.time()
rc, err, _ = cli("merge", "--models", *ms, "--method", "sma", "--output", d / "x.safetensors", "--overwrite", "-q")
verdict("--overwrite where the output is a folder", rc == 1 and "Traceback" not in err, f"rc={rc} {time.time()-t0:.1f}s {err.splitlines()[-1] if err else ''}")
long = d / ("n" * 240 + ".safetensors")
rc, err, _ = cli("merge", "--models", *ms, "--method", "sma", "--output", long, "-q")
verdict("legal 240-character output name", rc == 0 and long.exists(), f"rc={rc} {err.splitlines()[-1] if err else ''}")
# 7. safetensors named .ckpt
shutil.copy(ms[0], d / "renamed.ckpt")
rc, err, out = cli("inspect", d / "renamed.ckpt", "--no-hash")
verdict("safetensors file named .ckpt", rc == 0, f"rc={rc} {(err or out).splitlines()[-1]}")
# 8. signals: SIGTERM / SIGHUP / double Ctrl-C
d = Path(tempfile.mkdtemp()); big = []
for i in range(3):
    g = torch.Generator().manual_seed(i); p = d / f"b{i}.safetensors"
    save_safetensors(p, {f"model.diffusion_model.l{j}.weight": torch.randn(512, 512, generator=g) for j in range(96)}); big.append(p)
for sigs in (("SIGTERM",), ("SIGHUP",), ("SIGINT", "SIGINT")):
    out_dir = Path(tempfile.mkdtemp())
    proc = subprocess.Popen([PY, "-m", "merge_core", "merge", "--models", *map(str, big), "--method", "karcher", "--threads", "1", "--no-hash", "--output", str(out_dir / "m.safetensors")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    end = time.time() + 60
    while time.time() < end and not any(x.name.endswith(".tmp-merge") for x in out_dir.iterdir()): time.sleep(0.005)
    for i, s in enumerate(sigs):
        if i: time.sleep(0.02)
        try: os.kill(proc.pid, getattr(signal, s))
        except ProcessLookupError: pass
    _, err = proc.communicate(timeout=60)
    left = [x.name for x in out_dir.iterdir()]
    verdict(f"signal {'+'.join(sigs)}", not left and "Traceback" not in err, f"rc={proc.returncode} left={left} {err.strip().splitlines()[-1] if err.strip() else ''}")

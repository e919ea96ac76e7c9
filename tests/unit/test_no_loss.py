"""Never lose a file, never leave one behind: folder outputs, races, signals, stale temp files, the
environment (read-only, long names, a folder where a file is asked for), headers of many inputs."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from merge_core.cli import main
from merge_core.engine import merge
from merge_core.errors import MergeError, OutputExists
from merge_core.io import open_model, save_safetensors
from merge_core.io.atomic import TEMP_SUFFIX, sweep_stale

from conftest import TO_K, tiny_sd1

ROOT = Path(__file__).resolve().parents[2]


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((TEMP_SUFFIX, ".tmp-hyper", ".old-merge"))]


@pytest.fixture
def models_dir(tmp_path):
    folder = tmp_path / "X" / "models"
    folder.mkdir(parents=True)
    for i in range(3):
        save_safetensors(folder / f"m{i}.safetensors", tiny_sd1(i))
    (folder / "notes.txt").write_text("the user's own file")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.safetensors").write_bytes(b"not touched")
    return folder


# ---------------------------------------------------------------- folder outputs

@pytest.mark.parametrize("target", ["models", "X", "."])
def test_folder_output_never_replaces_a_folder_holding_the_inputs(models_dir, target, capsys):
    root = models_dir.parent.parent
    out = {"models": models_dir, "X": models_dir.parent, ".": root}[target]
    before = _digests(root)
    rc = main(["merge", "--models", str(models_dir), "--method", "sma", "--output", str(out), "--overwrite", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "holds the input" in err and err.count("\n") == 1
    assert _digests(root) == before and not _leftovers(root)


def test_folder_output_with_the_base_inside_is_refused(tmp_path, write):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    base_dir = tmp_path / "bases"
    base_dir.mkdir()
    save_safetensors(base_dir / "base.safetensors", tiny_sd1(0))
    with pytest.raises(OutputExists, match="holds the input"):
        merge([a, b], "slerp", base=base_dir / "base.safetensors", output=base_dir, overwrite=True)
    assert (base_dir / "base.safetensors").is_file()


def test_overwrite_replaces_only_a_folder_an_earlier_merge_wrote(tmp_path, write):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    out = tmp_path / "merged"
    merge([a, b], "weighted", multiplier=0.25, output=out)
    first = _digests(out)
    merge([a, b], "weighted", multiplier=0.75, output=out, overwrite=True)  # ours: replaced
    assert _digests(out) != first and not _leftovers(tmp_path)
    with open_model(out) as src:
        expected = 0.25 * tiny_sd1(1)[TO_K].float() + 0.75 * tiny_sd1(2)[TO_K].float()
        assert torch.allclose(src.load(TO_K).float(), expected, atol=2e-3)
    (out / "my_notes.txt").write_text("mine")  # now it holds a file the merge did not write
    before = _digests(out)
    with pytest.raises(OutputExists, match="my_notes.txt"):
        merge([a, b], "weighted", output=out, overwrite=True)
    assert _digests(out) == before


def test_overwrite_refuses_a_users_folder_without_our_record(tmp_path, write):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    user = tmp_path / "my_model"
    user.mkdir()
    save_safetensors(user / "model.safetensors", tiny_sd1(5))
    before = _digests(user)
    with pytest.raises(OutputExists, match="did not write"):
        merge([a, b], "sma", output=user, overwrite=True)
    assert _digests(user) == before


def test_a_file_created_at_the_output_during_the_merge_is_never_replaced(tmp_path, write):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    for out in (tmp_path / "late.safetensors", tmp_path / "late_folder"):
        def sneak(done, total, key, out=out):
            if done == 1:
                if out.suffix:
                    out.write_text("created by someone else meanwhile")
                else:
                    out.mkdir()
                    (out / "theirs.txt").write_text("created by someone else meanwhile")
        with pytest.raises(OutputExists, match="created at the output path"):
            merge([a, b], "sma", output=out, progress=sneak)
        theirs = out if out.suffix else out / "theirs.txt"
        assert theirs.read_text() == "created by someone else meanwhile"
        assert not _leftovers(tmp_path)


def test_a_replaced_file_must_still_be_the_one_that_was_allowed(tmp_path, write):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    out = tmp_path / "o.safetensors"
    out.write_text("old")

    def swap(done, total, key):
        if done == 1:
            out.unlink()
            out.write_text("a new file put there meanwhile")
    with pytest.raises(OutputExists, match="changed for another one"):
        merge([a, b], "sma", output=out, overwrite=True, progress=swap)
    assert out.read_text() == "a new file put there meanwhile" and not _leftovers(tmp_path)


def test_two_merges_into_one_folder_one_wins_the_other_fails_cleanly(tmp_path, write):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    out = tmp_path / "shared_out"
    barrier = threading.Barrier(2)
    results = {}

    def run(m):
        def wait_for_other(done, total, key):
            if done == 1:
                barrier.wait(timeout=30)
        try:
            merge([a, b], "weighted", multiplier=m, output=out, progress=wait_for_other, hash_inputs=False)
            results[m] = "ok"
        except MergeError as exc:
            results[m] = str(exc)
        except Exception as exc:  # any other exception is a failure of this test
            results[m] = f"UNHANDLED {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(m,)) for m in (0.2, 0.8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(v == "ok" for v in results.values()) == [False, True], results
    loser = next(v for v in results.values() if v != "ok")
    assert "created at the output path" in loser
    winner = next(m for m, v in results.items() if v == "ok")
    manifest = json.loads((out / ".manifold-merge.json").read_text())
    assert sorted(p.name for p in out.iterdir() if p.name != ".manifold-merge.json") == manifest["files"]
    with open_model(out) as src:  # the folder is wholly the winner's merge, never a mix
        expected = (1 - winner) * tiny_sd1(1)[TO_K].float() + winner * tiny_sd1(2)[TO_K].float()
        assert torch.allclose(src.load(TO_K).float(), expected, atol=2e-3)
    assert not _leftovers(tmp_path)


def test_full_disk_for_a_folder_output_leaves_nothing_and_names_the_users_path(tmp_path, write, monkeypatch):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    out = tmp_path / "folder_out"
    with pytest.raises(MergeError) as info:
        merge([a, b], "sma", output=out)
    assert str(info.value).startswith(f"{out}: not enough free disk space") and ".tmp" not in str(info.value)
    assert not out.exists() and not _leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


# ---------------------------------------------------------------- environment

def test_output_that_is_a_folder_is_refused_before_any_work(tmp_path, write):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    (tmp_path / "x.safetensors").mkdir()
    calls = []
    with pytest.raises(OutputExists, match="is a folder"):
        merge([a, b], "sma", output=tmp_path / "x.safetensors", overwrite=True,
              progress=lambda *args: calls.append(args))
    assert calls == [] and (tmp_path / "x.safetensors").is_dir()


def test_long_output_names_work_up_to_the_file_systems_limit(tmp_path, write, capsys):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    legal = tmp_path / ("n" * (255 - len(".safetensors")) + ".safetensors")  # 255 bytes: the ext4/tmpfs limit
    merge([a, b], "sma", output=legal)
    assert legal.is_file() and not _leftovers(tmp_path)
    too_long = tmp_path / ("n" * 260 + ".safetensors")
    rc = main(["merge", "--models", str(a), str(b), "--method", "sma", "--output", str(too_long), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "the file system allows 255" in err and err.count("\n") == 1


def _mount_read_only(folder: Path) -> bool:
    folder.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                        capture_output=True).returncode == 0
    return ok


def test_read_only_file_system_is_a_one_line_error(tmp_path, write, capsys):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    ro = tmp_path / "ro"
    if not _mount_read_only(ro):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        for out in (ro / "o.safetensors", ro / "folder"):
            rc = main(["merge", "--models", str(a), str(b), "--method", "sma", "--output", str(out), "-q"])
            err = capsys.readouterr().err
            assert rc == 1 and "read-only" in err and err.count("\n") == 1, err
    finally:
        subprocess.run(["umount", str(ro)])


def test_unwritable_folder_is_a_one_line_error(tmp_path, write, capsys, monkeypatch):
    a, b = write("a.safetensors", tiny_sd1(1)), write("b.safetensors", tiny_sd1(2))
    real_open = os.open

    def denied(path, flags, *args, **kw):  # root ignores chmod: deny the creation itself
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)
    monkeypatch.setattr(os, "open", denied)
    rc = main(["merge", "--models", str(a), str(b), "--method", "sma", "--output",
               str(tmp_path / "o.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "permission denied" in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_header_space_is_sized_for_many_inputs_with_long_names(tmp_path):
    sds = []
    paths = []
    for i in range(100):
        sd = {TO_K: torch.full((2, 768), float(i + 1))}
        path = tmp_path / f"a_rather_long_and_descriptive_checkpoint_name_v{i:03d}_final_pruned.safetensors"
        save_safetensors(path, sd)
        sds.append(sd)
        paths.append(path)
    result = merge(paths, "karcher", output=tmp_path / "k.safetensors")
    recipe = json.loads(result.metadata["manifold_merge_recipe"])
    assert len(recipe["inputs"]) == 100 and all(i["sha256"] for i in recipe["inputs"])
    with open_model(tmp_path / "k.safetensors") as src:
        # parallel inputs: the Karcher mean is the mean norm along their common direction
        assert torch.allclose(src.load(TO_K), torch.full((2, 768), 50.5), rtol=1e-5)


# ---------------------------------------------------------------- signals and stale temp files

def _big_models(folder: Path, count: int = 3, mb: int = 96) -> list[Path]:
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        sd = {f"model.diffusion_model.layer{j}.weight": torch.randn(512, 512, generator=g) for j in range(mb)}
        path = folder / f"big{i}.safetensors"
        save_safetensors(path, sd)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return _big_models(tmp_path_factory.mktemp("big"))


def _start_merge(paths, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "merge_core", "merge", "--models", *map(str, paths),
                             "--method", "karcher", "--threads", "1", "--no-hash", "--output", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_temp(folder: Path, proc: subprocess.Popen, timeout: float = 60) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if any(p.name.endswith(TEMP_SUFFIX) for p in folder.iterdir()):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGHUP",), ("SIGINT",), ("SIGINT", "SIGINT"),
                                     ("SIGINT", "SIGTERM", "SIGINT")])
def test_signals_remove_the_temporary_output(tmp_path, big, signals):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.safetensors"
    proc = _start_merge(big, out)
    assert _wait_for_temp(out_dir, proc), proc.communicate()
    for i, name in enumerate(signals):
        if i:
            time.sleep(0.02)  # the next one arrives while the first is being handled
        try:
            os.kill(proc.pid, getattr(signal, name))
        except ProcessLookupError:
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "interrupted: nothing was written"
    assert list(out_dir.iterdir()) == []


def test_a_killed_runs_temp_file_is_removed_by_the_next_run_and_reported(tmp_path, big, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start_merge(big, out_dir / "merged.safetensors")
    assert _wait_for_temp(out_dir, proc)
    os.kill(proc.pid, signal.SIGKILL)  # nothing can clean up after this
    proc.wait()
    stale = [p for p in out_dir.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert len(stale) == 1
    keep = out_dir / ".someone_elses.tmp"  # not ours: never touched
    keep.write_text("x")
    rc = main(["merge", "--models", *map(str, big[:2]), "--method", "sma", "--no-hash",
               "--output", str(out_dir / "next.safetensors")])
    text = capsys.readouterr().out
    assert rc == 0 and f"removed {stale[0].name}" in text and "interrupted earlier run" in text
    assert sorted(p.name for p in out_dir.iterdir()) == [".someone_elses.tmp", "next.safetensors"]


def test_a_live_runs_temp_file_is_left_alone(tmp_path, big):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start_merge(big, out_dir / "merged.safetensors")
    try:
        assert _wait_for_temp(out_dir, proc)
        found = sweep_stale(out_dir)
        assert found and not any(e.removed for e in found) and "may still be going" in found[0].describe()
        assert all(e.path.exists() for e in found)
    finally:
        proc.kill()
        proc.wait()

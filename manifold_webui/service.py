"""What the tab does, without gradio: validate a request, run merge_core, talk to the host.

Every action returns plain Python values (text, rows, HTML) or raises
`MergeError` with a message meant for the user; the UI layer only turns those
into components. Nothing here writes a file that is not complete: the engine
and the hyper pipeline write to hidden temporary files and rename at the end.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from merge_core import registry
from merge_core.plan import OUTPUT_DTYPES
from merge_core.registry import Bound
from merge_core.errors import MergeCancelled, MergeError
from merge_core.inputs import parse_numbers, plain_name

from . import charts
from .hosts import Host

METHOD_LABELS = {m.name: m.label for m in registry.all_methods()}
DTYPES = OUTPUT_DTYPES
NONE = "(none)"
INSPECT_COLUMNS = ("model", "architecture", "dtypes", "MiB", "M params", "hash")
UIProgress = Callable[[float, str], None]


def without_hash(title: str) -> str:
    """A WebUI title without its " [hash]" (A1111 adds it once a file is hashed)."""
    return title.split(" [", 1)[0]


@dataclass
class MergeRequest:
    method: str = "karcher"
    models: list[str] = field(default_factory=list)
    weights: str = ""
    t: float = 0.5
    alpha: float = 0.5
    multiplier: float = 0.5
    karcher_iter: int = 10
    karcher_tol: float = 1e-5
    base: str = NONE
    name: str = ""
    dtype: str = "auto"
    device: str = "host"
    blocks: str = ""       # block weights: one line (one line per model for a per-model parameter)
    overrides: str = ""    # per-key overrides, one PATTERN=VALUE per line
    extra: dict = field(default_factory=dict)  # values of parameters of methods added later, by name
    vae: str = NONE        # bake in this VAE (a name from the VAE folder's list)
    discard: str = ""      # leave out weights whose key matches this regular expression
    drop_ema: bool = False  # leave out EMA weights and other training leftovers
    shared_only: bool = False  # merge models of different architectures on the keys they share
    overwrite: bool = False    # replace an existing file of that name (after a confirmation)

    def params(self) -> dict:
        """The picked method's parameters (only those it has: the others' controls are hidden)."""
        entry = registry.get(self.method)
        weights = parse_numbers(self.weights, "weights")
        if weights is not None and len(weights) != len(self.models):
            raise MergeError(f"{len(weights)} weights for {len(self.models)} models: give one per model, "
                             f"in the order they were picked")
        raw = {"weights": weights, "t": self.t, "alpha": self.alpha, "multiplier": self.multiplier,
               "karcher_iter": self.karcher_iter, "karcher_tol": self.karcher_tol, **(self.extra or {})}
        return {p.name: raw[p.name] for p in entry.params if raw.get(p.name) not in (None, "")}

    def block_args(self) -> dict:
        """`blocks` and `overrides` for the engine, from the two text boxes (empty: none)."""
        from merge_core.blocks import parse_override
        lines = [ln.strip() for ln in (self.blocks or "").splitlines() if ln.strip()]
        out: dict = {}
        if lines:
            param = registry.get(self.method).block_param
            if param is None:
                raise MergeError(f"{registry.get(self.method).label} has no parameter that can vary per block; "
                                 f"clear the block weights")
            if param.per_model:
                out["blocks"] = lines
            elif len(lines) == 1:
                out["blocks"] = lines[0]
            else:
                raise MergeError(f"block weights: {registry.get(self.method).label} takes one line of block "
                                 f"values, got {len(lines)}")
        overrides = [parse_override(ln.strip(), what="override") for ln in (self.overrides or "").splitlines()
                     if ln.strip()]
        if overrides:
            out["overrides"] = overrides
        return out

    def config(self) -> Bound:
        """The method and its parameters, validated exactly as the engine will."""
        return registry.get(self.method).bind(len(self.models), self.params())

    def base_name(self) -> str | None:
        return None if self.base in (None, "", NONE) else self.base


class NeedsConfirmation(MergeError):
    """Saving would replace an existing file: the user confirms by pressing Save again."""


class MergeService:
    """The tab's actions for one host. One job runs at a time; `cancel()` stops it between tensors."""

    def __init__(self, host: Host):
        self.host = host
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self._kept: tuple[str, dict, dict] | None = None  # (request key, state dict, metadata) of the last load

    # ---- lists -------------------------------------------------------------
    def checkpoints(self, refresh: bool = False) -> list[str]:
        if refresh:
            self.host.refresh()
        return self.host.list_checkpoints()

    def vaes(self) -> list[str]:
        return self.host.list_vaes()

    def device(self, choice: str | None = None) -> str:
        choice = choice or self.host.settings().device
        return self.host.default_device() if choice in ("host", "", None) else choice

    # ---- jobs --------------------------------------------------------------
    def cancel(self) -> str:
        self._cancel.set()
        return "Cancelling: the job stops after the tensor it is working on; nothing will be written."

    def _job(self, title: str, ui_progress: UIProgress | None) -> "_Job":
        return _Job(self, title, ui_progress)

    def _paths(self, names: list[str]) -> list[Path]:
        """The files of checkpoints picked by name. Every name from the tab or its HTTP API goes through
        here, and the host only accepts names from its own list (hosts.pick_listed), so nothing outside
        the models folder is read. A lone string (an API caller's) is one name, never its characters."""
        return self.host.checkpoint_paths([names] if isinstance(names, str) else list(names))

    def _inputs(self, req: MergeRequest) -> tuple[list[Path], Path | None]:
        """The files of the picked models and of the base model (None without one)."""
        base = req.base_name()
        return self._paths(req.models), (self._paths([base])[0] if base else None)

    def _engine_args(self, req: MergeRequest) -> dict:
        req.config()
        if req.base_name() and not registry.get(req.method).takes_base:
            labels = [registry.get(m).label for m in registry.base_methods()]
            raise MergeError(f"a base model only applies to {' and '.join(labels)}")
        if req.dtype not in DTYPES:
            raise MergeError(f"unknown output dtype {req.dtype!r}")
        threads = self.host.settings().threads or None
        vae = self.host.vae_path(req.vae) if req.vae not in (None, "", NONE) else None
        return dict(params=req.params(), dtype=req.dtype, device=self.device(req.device), threads=threads,
                    vae=vae, discard=req.discard or None, drop_ema=bool(req.drop_ema), force=bool(req.shared_only),
                    **req.block_args())

    def recipe_preview(self, req: MergeRequest) -> str:
        """The recipe that will go into the file's metadata (hashes are added when the files are read)."""
        if not req.models:
            raise MergeError("pick the models to merge")
        cfg = req.config()
        preview = {
            "tool": "manifold-merge", "method": req.method, "parameters": cfg.recipe_params(),
            "inputs": [{"name": Path(without_hash(n)).stem} for n in req.models],
            "base": {"name": Path(without_hash(req.base_name())).stem} if req.base_name() else None,
            "normalized_weights": [round(c, 6) for c in cfg.reported_weights()] if cfg.reported_weights() else None,
            **({"block_weights": [ln for ln in req.blocks.splitlines() if ln.strip()]} if req.blocks.strip() else {}),
            **({"overrides": [ln for ln in req.overrides.splitlines() if ln.strip()]} if req.overrides.strip() else {}),
            "output_dtype": req.dtype,
            "output": f"{plain_name(req.name)}.safetensors" if req.name.strip() else None,
        }
        return json.dumps(preview, indent=2)

    def auto_name(self, req: MergeRequest) -> str:
        """A1111's style of name for an empty name box, from the recipe: `0.3(A) + 0.7(B)` for a weighted
        sum, `A + 0.5(B - C)` for add difference, `karcher(A, B, C)` otherwise; long lists shortened; never
        the name of an existing file."""
        stems = [Path(without_hash(n)).stem for n in req.models]
        short = [st[:24] for st in stems]
        params = req.params()
        m = params.get("multiplier")
        if req.method == "weighted" and len(short) == 2:
            name = f"{1 - m:g}({short[0]}) + {m:g}({short[1]})"
        elif req.method == "add-difference" and len(short) == 3:
            name = f"{short[0]} + {m:g}({short[1]} - {short[2]})"
        elif req.method == "slerp" and len(short) == 2:
            name = f"slerp {params.get('t', 0.5):g}({short[0]}, {short[1]})"
        else:
            shown_models = short if len(short) <= 4 else short[:3] + [f"+{len(short) - 3} more"]
            name = f"{req.method}({', '.join(shown_models)})"
        name = "".join("_" if c in "/\\:*?\"<>|" else c for c in name).strip(". ")[:150] or req.method
        folder = self.host.checkpoint_dir()
        candidate, n = name, 2
        while (folder / f"{candidate}.safetensors").exists():
            candidate, n = f"{name} ({n})", n + 1
        return candidate

    def _output_path(self, req: MergeRequest, confirmed: bool = False) -> Path:
        name = plain_name(req.name, "output name") if (req.name or "").strip() else self.auto_name(req)
        folder = self.host.checkpoint_dir()
        if not folder.is_dir():
            raise MergeError(f"{folder}: checkpoint folder does not exist")
        path = folder / f"{name}.safetensors"
        if path.exists():
            if not req.overwrite:
                raise MergeError(f"{path.name} already exists in {folder}; pick another name, or tick "
                                 f"“Overwrite an existing file”")
            if not confirmed:
                raise NeedsConfirmation(f"{path.name} already exists in {folder}: press Save again to replace it")
        return path

    def save(self, req: MergeRequest, ui_progress: UIProgress | None = None,
             confirmed: bool = False) -> tuple[str, str]:
        """Merge into the checkpoint folder and refresh the host's list. Returns (message, saved title).
        Replacing an existing file needs `overwrite` and then a second, confirmed Save."""
        from merge_core.engine import merge
        from merge_core.io.safetensors_file import save_safetensors
        args = self._engine_args(req)
        output = self._output_path(req, confirmed)
        args["overwrite"] = output.exists()
        models, base = self._inputs(req)
        with self._job("Manifold Merge: save", ui_progress) as progress:
            if self._kept is not None and self._kept[0] == self._recipe_key(req):
                save_safetensors(output, self._kept[1], self._kept[2], overwrite=args["overwrite"])  # atomic
                how = "from the merge kept in RAM"
            else:
                result = merge(models, req.method, output=output, base=base, progress=progress,
                               names=[p.stem for p in models], **args)
                how = f"in {result.summary['seconds']:.1f} s"
                for note in result.summary.get("stale_temp_files") or ():
                    how += f"; {note}"
        self.host.refresh()
        title = self.host.saved_title(output)
        return f"Saved {output.name} to {output.parent} ({how}).", title

    def run_recipe(self, text: str, name: str = "", ui_progress: UIProgress | None = None) -> tuple[str, str]:
        """Run a pasted recipe (YAML or JSON; docs/recipes.md) into the checkpoint folder. Its inputs must be
        checkpoints of the host's list (by name, or by a path to a listed file); the output is a new file
        there. Returns (message, saved title)."""
        import yaml
        from merge_core.chain import load_recipe, run_recipe
        try:
            data = yaml.safe_load(text or "")
        except yaml.YAMLError as exc:
            raise MergeError(f"the recipe is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise MergeError("paste a recipe: inputs, steps and an output (see docs/recipes.md)")
        folder = self.host.checkpoint_dir()
        recipe = load_recipe(data, base_dir=folder)
        listed = {p.resolve(): n for n, p in zip(self.host.list_checkpoints(),
                                                 self._paths(self.host.list_checkpoints()))}
        for entry in recipe.inputs:
            if entry.path.resolve() not in listed:
                raise MergeError(f"recipe input {entry.name!r} ({entry.path.name}): not a checkpoint in the models "
                                 f"folder ({folder}); use the names the pickers show")
        stem = (name or "").strip() or (recipe.output.name if recipe.output else "")
        output = folder / f"{plain_name(stem, 'output name')}.safetensors"
        if output.exists():
            raise MergeError(f"{output.name} already exists in {folder}; pick another name")
        with self._job("Manifold Merge: recipe", ui_progress) as progress:
            result = run_recipe(recipe, progress, output=output, threads=self.host.settings().threads or None,
                                device=self.device(None))
        self.host.refresh()
        steps = len(recipe.steps) if hasattr(recipe, "steps") else 1
        return (f"Saved {output.name} to {folder} ({steps} step{'s' if steps != 1 else ''}, "
                f"{result.summary['seconds']:.1f} s)."), self.host.saved_title(output)

    def _recipe_key(self, req: MergeRequest) -> str:
        data = asdict(req)
        data.pop("name")
        return json.dumps(data, sort_keys=True)

    def merge_and_load(self, req: MergeRequest, ui_progress: UIProgress | None = None) -> str:
        """Merge in memory and put the result into the running model; no file is written."""
        from merge_core.engine import merge
        if not self.host.can_hot_load:
            raise MergeError(f"{self.host.name} cannot load a merge into a running model; use Save")
        title = plain_name(req.name) if req.name.strip() else f"manifold-{req.method}"
        args = self._engine_args(req)
        models, base = self._inputs(req)
        self._kept = None
        with self._job("Manifold Merge: merge and load", ui_progress) as progress:
            result = merge(models, req.method, output=None, base=base, progress=progress,
                           names=[p.stem for p in models], hash_inputs=False, **args)
            message = self.host.hot_load(result.state_dict, title, req.models[0],
                                         result.metadata["manifold_merge_recipe"])
        if self.host.settings().keep_in_ram:
            self._kept = (self._recipe_key(req), result.state_dict, result.metadata)
            message += "; the weights stay in RAM, so Save writes them without merging again"
        return message + "."

    def block_layout(self, models: list[str]) -> dict:
        """The block editor's layout for the architecture of the first picked checkpoint (headers only)."""
        from merge_core.arch import detect_architecture
        from merge_core.blocks import BlockSpecError, architecture
        from merge_core.io.sources import open_model
        if not models:
            return {"arch": None, "display": "", "blocks": [], "presets": [], "note": "Pick checkpoints first."}
        path = self._paths([models[0]])[0]
        with open_model(path) as src:
            keys = src.keys()
            arch_name = detect_architecture(src.specs())
        try:
            arch = architecture(arch_name)
        except BlockSpecError:
            return {"arch": None, "display": arch_name, "blocks": [], "presets": [],
                    "note": f"{path.name}: no block map for this architecture ({arch_name})."}
        if hasattr(arch, "sized"):
            arch = arch.sized(keys)
        return {"arch": arch.name, "display": arch.display, "blocks": list(arch.blocks),
                "presets": list(arch.presets),
                "note": f"{arch.display} ({len(arch.blocks)} blocks), from {path.name}."}

    def preset_values(self, arch_name: str, preset_name: str) -> list[float]:
        """A preset's value for every block of the list form, in order."""
        from merge_core.blocks import architecture, preset
        arch = architecture(arch_name)
        table = preset(arch, preset_name).table()
        return [float(table.get(b, 0.0)) for b in arch.blocks]

    def row_values(self, arch_name: str, line: str) -> dict[str, float]:
        """The blocks a line of block values sets (list or named form), by block name."""
        from merge_core.blocks import architecture, parse_block_values
        arch = architecture(arch_name)
        table = parse_block_values(arch, line, what="block weights").table()
        return {b: float(table[b]) for b in arch.blocks if b in table}

    def switch_to(self, title: str) -> str:
        if not title:
            raise MergeError("save a merge first")
        return self.host.switch_to(title)

    def hyper(self, models: list[str], ranks_text: str, iterations: int, name: str, dtype: str,
              device: str | None = None, ui_progress: UIProgress | None = None) -> dict:
        """M checkpoints -> hyper checkpoint (checkpoint folder) + LoRAs (LoRA folder) + tags + report."""
        from merge_core.hyper.pipeline import HyperConfig, run_hyper
        if len(models) < 2:
            raise MergeError("pick at least two models for a hyper-merge")
        ranks = parse_numbers(ranks_text, "ranks", int)
        if not ranks:
            raise MergeError("ranks: give one rank per LoRA, e.g. 64 64 32 32")
        lora_dir = self.host.lora_dir()  # run_hyper refuses a missing one
        paths = self._paths(models)
        with self._job("Manifold Merge: hyper-merge", ui_progress) as progress:
            result = run_hyper(HyperConfig(models=paths, name=plain_name(name, "name"),
                                           out_dir=self.host.checkpoint_dir(), lora_dir=lora_dir, ranks=ranks,
                                           iterations=int(iterations), device=self.device(device),
                                           dtype=dtype if dtype != "auto" else "fp16",
                                           threads=self.host.settings().threads or None, progress=progress))
        self.host.refresh()
        report = result.report
        rows = [[r["model"]] + [round(x, 4) for x in r["lambdas"]] +
                [round(r["relative_error_covered"], 4), round(r["relative_error_all_weights"], 4)]
                for r in report["per_model"]]
        headers = ["model"] + [f"λ{k}" for k in range(len(report["ranks"]))] + ["error (LoRA layers)", "error (all)"]
        return {
            "message": (f"Wrote {result.hyper_path.name} to {result.hyper_path.parent} and "
                        f"{len(result.lora_paths)} LoRAs to {lora_dir}; mean error "
                        f"{report['mean_relative_error_covered']:.4f} after {report['iterations_run']} rounds."),
            "multipliers": result.multipliers_path.read_text(),
            "headers": headers, "rows": rows,
            "chart": charts.bar_chart([r["model"] for r in report["per_model"]],
                                      [r["relative_error_covered"] for r in report["per_model"]],
                                      "relative error over the LoRA layers"),
            "report": report,
        }

    def inspect(self, models: list[str], ui_progress: UIProgress | None = None) -> dict:
        """Facts about each model, and their pairwise cosine similarity when two or more are picked."""
        from merge_core.inspect import inspect_model
        from merge_core.similarity import pairwise_cosine
        if not models:
            raise MergeError("pick one or more models to inspect")
        paths = self._paths(models)
        infos = [inspect_model(p) for p in paths]
        rows = [[p.stem, i["architecture"], ", ".join(f"{k} x{v}" for k, v in i["dtypes"].items()),
                 round(i["file_size"] / 2 ** 20, 1), round(i["parameters"] / 1e6, 2), i["short_hash"]]
                for p, i in zip(paths, infos)]
        out = {"headers": list(INSPECT_COLUMNS), "rows": rows,
               "metadata": json.dumps({p.stem: i["metadata"] for p, i in zip(paths, infos)}, indent=2),
               "heatmap": "", "similarity": None}
        if len(paths) >= 2:
            with self._job("Manifold Merge: compare", ui_progress) as progress:
                sim = pairwise_cosine(paths, names=[p.stem for p in paths], progress=progress)
            out["similarity"] = sim
            out["heatmap"] = charts.heatmap(sim["names"], sim["cosine"])
            out["block_heatmap"] = charts.block_table(sim["names"], sim.get("blocks") or {})
        return out


class _Job:
    """One running job, used as the engine's progress callback: it drives the host's progress
    (shared.state) and the UI's bar, and answers Cancel and the host's Interrupt by returning False."""

    def __init__(self, service: MergeService, title: str, ui_progress: UIProgress | None):
        self.service, self.title, self.ui_progress = service, title, ui_progress

    def __enter__(self) -> "_Job":
        if not self.service._busy.acquire(blocking=False):
            raise MergeError("another Manifold Merge job is running; wait for it or cancel it")
        self.service._cancel.clear()
        self.service.host.begin_job(self.title, 0)
        return self

    def __exit__(self, *exc) -> None:
        self.service.host.end_job()
        self.service._busy.release()

    def __call__(self, done: int, total: int, text: str) -> bool | None:
        self.service.host.job_step(done, total, text)
        if self.ui_progress is not None:
            self.ui_progress(done / total if total else 0.0, f"{self.title}: {text}")
        if self.service._cancel.is_set() or self.service.host.interrupted():
            return False
        return None


def tab_words(message: str) -> str:
    """A core message in the tab's words: the CLI's flag names become the tab's control labels."""
    import re
    labels = {"--blocks-file": "Block weights", "--blocks": "Block weights", "--override": "Overrides",
              "--preset": "Block preset", "--base": "Base model", "--vae": "Bake in VAE",
              "--discard": "Discard weights", "--force": "Merge shared keys only",
              "--overwrite": "Overwrite an existing file"}
    for flag in registry.cli_flags():
        method_name, param_name = flag.targets[0]
        label = registry.get(method_name).param(param_name).label or param_name
        for spelling in (flag.flag,) + flag.aliases:
            labels.setdefault(spelling, label)
    pattern = re.compile("|".join(re.escape(f) for f in sorted(labels, key=len, reverse=True)) + r"(?![\w-])")
    return pattern.sub(lambda m: f"“{labels[m.group(0)]}”", message)


def friendly(exc: BaseException) -> str:
    """The message shown in the tab for a failed action."""
    if isinstance(exc, MergeCancelled):
        return f"Cancelled: {exc}"
    if isinstance(exc, MergeError):
        return f"Error: {tab_words(str(exc))}"
    if isinstance(exc, OSError):
        return f"Error: {exc.filename or ''} {exc.strerror or exc}".strip()
    return f"Error: {type(exc).__name__}: {exc}"

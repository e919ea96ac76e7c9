"""Command line: python -m merge_core {merge,inspect,demo,app,hyper,...}."""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import __version__
from . import registry
from .errors import MergeError
from .inputs import parse_numbers
from .plan import OUTPUT_DTYPES
from .io.atomic import describe_os_error


def _floats(text: str) -> list[float]:
    try:
        return parse_numbers(text, "numbers") or []
    except MergeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number_list(values: list[str], flag: str, cast=float) -> list:
    """`--x 0.4 0.6`, `--x 0.4,0.6` and `--x "0.4, 0.6"` are the same list."""
    try:
        return parse_numbers(" ".join(values), flag, cast) or []
    except MergeError as exc:
        raise MergeError(f"{flag}: {exc}") from None


def add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge checkpoints",
                       usage="%(prog)s (--models A B [C ...] --output OUT | INPUT_DIR OUTPUT) [options]",
                       description="Merge checkpoints, given as --models ... --output OUT (default method "
                                   "karcher), or as INPUT_DIR OUTPUT like the SMA/EMA/WMA merger (every "
                                   "*.safetensors in INPUT_DIR, natural order; default method sma). Method "
                                   "parameters are listed per method; a parameter that does not apply to the "
                                   "chosen method is an error.")
    p.add_argument("input_dir", nargs="?", metavar="INPUT_DIR",
                   help="positional form: a folder whose *.safetensors are merged in natural sort order "
                        "(default method sma)")
    p.add_argument("output_file", nargs="?", metavar="OUTPUT", help="positional form: the output")
    p.add_argument("--models", nargs="+",
                   help="checkpoint files, HF-style model folders, or one folder whose *.safetensors are taken "
                        "in natural sort order")
    p.add_argument("--method", default=None, type=str.lower,
                   help=f"one of {', '.join(registry.method_names())} (default karcher with --models, sma in "
                        f"the INPUT_DIR OUTPUT form)")
    p.add_argument("--output", help="output .safetensors file (or a folder name for sharded output)")
    for flag in registry.cli_flags():  # generated from the method registry
        if flag.per_model:
            p.add_argument(flag.flag, *flag.aliases, dest=f"param:{flag.flag}", nargs="+", default=argparse.SUPPRESS,
                           metavar="W", help=f"{flag.help}; spaces or commas")
        else:
            p.add_argument(flag.flag, *flag.aliases, dest=f"param:{flag.flag}", type=float,
                           default=argparse.SUPPRESS, metavar="X", help=flag.help)
    blocks = p.add_argument_group("block weights (see `python -m merge_core blocks ARCH`)")
    blocks.add_argument("--blocks", action="append", metavar="VALUES",
                        help="the method's per-block parameter: a 26-/20-value comma list in the usual order, or "
                             "named entries and ranges ('BASE:0, IN00-IN05:0.2, M00:1, OUT*:0.8'); for karcher "
                             "and wma give it once per model (that model's weight per block)")
    blocks.add_argument("--preset", action="append", metavar="NAME", help="a named block preset (instead of --blocks)")
    blocks.add_argument("--blocks-file", metavar="FILE", help="block values from a YAML/JSON file")
    blocks.add_argument("--override", action="append", default=[], metavar="PATTERN=VALUE",
                        help="per-key value on top of the blocks, for keys matching PATTERN (repeatable)")
    p.add_argument("--base", help="karcher/slerp: merge differences from this base model and add it back")
    edits = p.add_argument_group("what goes into the output (like A1111's Checkpoint Merger)")
    edits.add_argument("--vae", metavar="FILE", help="bake in this VAE (its weights replace the merged VAE)")
    edits.add_argument("--discard", metavar="REGEX", help="leave out the weights whose key matches REGEX")
    edits.add_argument("--drop-ema", action="store_true",
                       help="leave out EMA weights (model_ema.*) and other training leftovers")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (cuda if available)")
    p.add_argument("--dtype", default="auto", choices=OUTPUT_DTYPES,
                   help="output dtype of float tensors (auto: as in the first model; fp8: values beyond the range "
                        "are saturated and counted)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp64"], help="dtype the math runs in")
    p.add_argument("--threads", type=int, help="worker threads (default min(4, CPUs))")
    p.add_argument("--strict", action="store_true", help="refuse keys missing from some models")
    p.add_argument("--force", action="store_true", help="merge different architectures on their common keys")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    p.add_argument("--copy-extra-files", action="store_true",
                   help="copy the first model's non-weight files beside the output (a folder output of model "
                        "folders always gets config.json, generation_config.json and the tokenizer)")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 of the inputs for the recipe")
    p.add_argument("--recipe", metavar="FILE",
                   help="run a recipe (YAML/JSON, or a merge output's embedded recipe): inputs, steps over inputs "
                        "and earlier steps, output; key by key, no intermediate files (docs/recipes.md). Takes "
                        "--output, --overwrite, --threads, --device, --no-hash, --ignore-hashes, --quiet")
    p.add_argument("--ignore-hashes", action="store_true",
                   help="with --recipe: merge even if an input's sha256 differs from the one the recipe records")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_merge)


def method_params_from_args(args, method: str) -> dict:
    """The registry parameters given on the command line, for `method`; others are an error."""
    entry = registry.get(method)
    values = {}
    for flag in registry.cli_flags():
        given = getattr(args, f"param:{flag.flag}", None)
        if given is None:
            continue
        target = next((name for m, name in flag.targets if m == entry.name), None)
        if target is None:
            takes = ", ".join(p.flag for p in entry.params) or "no parameters"
            raise MergeError(f"{flag.flag} does not apply to {entry.name} (it takes {takes})")
        param = entry.param(target)
        values[target] = _number_list(given, flag.flag) if flag.per_model else param.check_scalar(given, flag.flag)
    return values


def block_args(args, method: str):
    """--blocks / --preset / --blocks-file -> what engine.merge takes as `blocks` (None if none given)."""
    from .blocks import load_block_file
    given = [x for x in (args.blocks, args.preset, args.blocks_file) if x]
    if len(given) > 1:
        raise MergeError("give the block weights one way: --blocks, --preset or --blocks-file")
    if not given:
        return None
    per_model = bool(registry.get(method).block_param and registry.get(method).block_param.per_model)
    specs = load_block_file(args.blocks_file) if args.blocks_file else (args.blocks or args.preset)
    if isinstance(specs, (list, tuple)) and not per_model:
        if len(specs) != 1:
            raise MergeError(f"--blocks: {method} takes one block row, got {len(specs)}")
        specs = specs[0]
    return specs


def progress_lines(prefix: str, every: float = 2.0):
    """Progress as plain lines (for logs and pipes, where a bar prints nothing): the label of the current
    step with its count, at most every `every` seconds, and whenever the phase (the label's first word)
    changes; e.g. `hyper-merge: round 3/6, layer 120/350 (45%)`."""
    state = {"last": 0.0, "phase": None}

    def update(done: int, total: int, label: str):
        now = time.monotonic()
        phase = re.match(r"[A-Za-z]*", label or "").group(0)  # "lora_unet_…" -> lora, "round 3/6" -> round
        if now - state["last"] >= every or phase != state["phase"] or done == total:
            state["last"], state["phase"] = now, phase
            share = f" ({100 * done // total}%)" if total else ""
            print(f"    {prefix}: {label[-60:]} [{done}/{total}]{share}", flush=True)

    return update


def progress_bar(quiet: bool):
    """A tqdm bar created on the first key, so errors raised while planning print alone."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm
    state = {}

    def update(done: int, total: int, key: str):
        bar = state.get("bar")
        if bar is None:
            # disable=None: no bar when stderr is not a terminal (logs, pipes)
            bar = state["bar"] = tqdm(total=total, unit="key", dynamic_ncols=True, leave=False, disable=None)
        bar.set_postfix_str(key[-40:], refresh=False)
        bar.update(done - bar.n)

    def close():
        if "bar" in state:
            state["bar"].close()

    return update, close


def merge_form(args) -> tuple[list[str], str, str]:
    """(model arguments, output, method) from either form: `--models ... --output OUT` (default karcher)
    or the SMA/EMA/WMA merger's `INPUT_DIR OUTPUT` (default sma)."""
    positional = [x for x in (args.input_dir, args.output_file) if x is not None]
    if positional and (args.models or args.output):
        raise MergeError("give the inputs one way: --models ... --output OUT, or INPUT_DIR OUTPUT (not both)")
    if positional:
        if len(positional) != 2:
            raise MergeError(f"the positional form is INPUT_DIR OUTPUT; got only {positional[0]!r}")
        if not Path(positional[0]).is_dir():
            raise MergeError(f"{positional[0]}: INPUT_DIR must be a folder of .safetensors files")
        return [positional[0]], positional[1], args.method or "sma"
    if not args.models or not args.output:
        raise MergeError(f"{'--output' if args.models else '--models'} is missing: give --models A B ... "
                         f"--output OUT, or INPUT_DIR OUTPUT")
    return list(args.models), args.output, args.method or "karcher"


def cmd_merge(args) -> int:
    if getattr(args, "recipe", None):
        return cmd_merge_recipe(args)
    if getattr(args, "ignore_hashes", False):
        raise MergeError("--ignore-hashes applies to --recipe only")
    from .engine import merge
    from .io.sources import expand_model_args
    args.models, args.output, args.method = merge_form(args)
    models = expand_model_args(args.models)
    if len(args.models) == 1 and len(models) > 1 and not args.quiet:
        print(f"models from {args.models[0]} (natural order):")
        for i, m in enumerate(models, 1):
            print(f"  {i}. {m.name}")
    params = method_params_from_args(args, args.method)
    blocks = block_args(args, args.method)
    from .blocks import parse_override
    overrides = [parse_override(text) for text in args.override]
    update, close = progress_bar(args.quiet)
    try:
        result = merge(models, args.method, output=args.output, params=params, base=args.base, device=args.device,
                       dtype=args.dtype, precision=args.precision, threads=args.threads, strict=args.strict,
                       force=args.force, overwrite=args.overwrite, copy_extra_files=args.copy_extra_files,
                       progress=update, hash_inputs=not args.no_hash, blocks=blocks, overrides=overrides,
                       vae=args.vae, discard=args.discard, drop_ema=args.drop_ema)
    finally:
        close()
    if not args.quiet:
        print(format_summary(result))
    return 0


RECIPE_ONLY_OPTIONS = ("output", "overwrite", "threads", "device", "no_hash", "ignore_hashes", "quiet", "recipe")


def cmd_merge_recipe(args) -> int:
    """merge --recipe FILE: the recipe names the inputs, steps and parameters; the command line only where
    and how to run it."""
    from .chain import run_recipe
    defaults = {"input_dir": None, "output_file": None, "models": None, "method": None, "blocks": None,
                "preset": None, "blocks_file": None, "override": [], "base": None, "dtype": "auto",
                "precision": "fp32", "strict": False, "force": False, "copy_extra_files": False}
    given = [name for name, default in defaults.items() if getattr(args, name, default) not in (default, None, [])]
    given += [name.split(":", 1)[1] for name in vars(args) if name.startswith("param:")]
    if given:
        flag = given[0] if given[0].startswith("-") else "--" + given[0].replace("_", "-")
        raise MergeError(f"{flag} does not go with --recipe: the recipe names the inputs, methods and their "
                         f"parameters (only {', '.join('--' + o.replace('_', '-') for o in RECIPE_ONLY_OPTIONS[:-1])} "
                         f"apply)")
    update, close = progress_bar(args.quiet)
    try:
        result = run_recipe(args.recipe, progress=update, output=args.output, overwrite=args.overwrite,
                            ignore_hashes=args.ignore_hashes, threads=args.threads, device=args.device,
                            hash_inputs=not args.no_hash)
    finally:
        close()
    for line in result.summary.get("warnings") or ():  # shown even with --quiet
        print(f"warning: {line}", file=sys.stderr)
    if not args.quiet:
        steps = result.summary.get("steps") or []
        print(format_summary(result) if len(steps) <= 1 else format_chain_summary(result))
    return 0


def format_chain_summary(result) -> str:
    s = result.summary
    lines = [f"note: {line}" for line in s.get("stale_temp_files", [])]
    lines.append(f"wrote {result.path} ({s['keys']} tensors: {s['merged']} merged, {s['copied']} copied) in "
                 f"{s['seconds']:.2f} s; architecture {result.architecture}; recipe of {len(s['steps'])} steps "
                 f"({', '.join(s['steps'])})")
    if s["missing_keys"]:
        lines.append(f"{len(s['missing_keys'])} keys not in every model of a step (copied from those that have them)")
    for k, v in list(s["partial_shape_keys"].items()) + list(s["forced_copies"].items()):
        lines.append(f"{k}: {v}")
    if s.get("per_key_values"):
        lines.append(f"block weights / overrides: {s['per_key_values']} step keys merged with their own values")
    if s.get("saturated"):
        lines.append(f"fp8: {sum(s['saturated'].values())} values beyond the range were saturated")
    return "\n".join(lines)


def cmd_recipe(args) -> int:
    from .chain import embedded_recipe, format_recipe, runnable_recipe
    data = embedded_recipe(args.file)
    print(format_recipe(runnable_recipe(data, args.output if args.output else Path(args.file).resolve()),
                        as_json=args.json), end="")
    return 0


def format_summary(result) -> str:
    s = result.summary
    lines = [f"note: {line}" for line in s.get("stale_temp_files", [])]
    lines += [f"wrote {result.path} ({s['keys']} tensors: {s['merged']} merged, {s['copied']} copied) "
             f"in {s['seconds']:.2f} s; architecture {result.architecture}; "
             f"method {result.recipe['method']} {json.dumps(result.recipe['parameters'])}"]
    if s["missing_keys"]:
        lines.append(f"{len(s['missing_keys'])} keys not in every model (copied from the models that have them):")
        lines += [f"  {k}: missing in {', '.join(v)}" for k, v in list(s["missing_keys"].items())[:20]]
        if len(s["missing_keys"]) > 20:
            lines.append(f"  ... and {len(s['missing_keys']) - 20} more")
    for k, v in s["partial_shape_keys"].items():
        lines.append(f"partial merge {k}: {v}")
    for k, v in s["forced_copies"].items():
        lines.append(f"--force: {k}: {v}")
    if s.get("per_key_values"):
        lines.append(f"block weights / overrides: {s['per_key_values']} keys merged with their own values")
    for pattern, count in (s.get("override_matches") or {}).items():
        lines.append(f"override {pattern}: {count} keys")
    for entry in s.get("extra_files") or ():
        lines.append(f"copied {entry['file']} from {entry['from']}" + (f" ({entry['note']})" if entry.get("note") else ""))
    for entry in s.get("extra_files_skipped") or ():
        lines.append(f"not copied: {entry}")
    if s.get("baked_vae"):
        lines.append(f"baked in the VAE {s['baked_vae']['file']} ({s['baked_vae']['keys']} tensors)")
    if s.get("discarded"):
        lines.append(f"discarded {len(s['discarded'])} weights matching the pattern")
    if s.get("dropped_ema"):
        lines.append(f"dropped {len(s['dropped_ema'])} EMA weights")
    if s.get("saturated"):
        total = sum(s["saturated"].values())
        lines.append(f"fp8: {total} values beyond the range were saturated, in {len(s['saturated'])} tensors")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from .inspect import format_inspection, inspect_model
    for path in args.files:
        info = inspect_model(path, with_hash=not args.no_hash)
        print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_blocks(args) -> int:
    from .blocks import architecture, describe
    print(describe(architecture(args.arch)))
    return 0


def cmd_demo(args) -> int:
    from .demo import write_demo_models
    from .engine import merge
    from .inspect import inspect_model
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="manifold-merge-demo-"))
    paths = write_demo_models(folder)
    print(f"demo checkpoints (SD1.5 layout, small) in {folder}:")
    for p in paths:
        info = inspect_model(p)
        print(f"  {p.name}: {info['architecture']}, {info['tensors']} tensors, {info['parameters']:,} parameters")
    runs = [("karcher", paths, {}), ("slerp", paths[:2], {"t": 0.3}), ("sma", paths, {}),
            ("ema", paths, {"alpha": 0.5}), ("wma", paths, {"weights": [3, 2, 1]}),
            ("weighted", paths[:2], {"multiplier": 0.25}), ("add-difference", paths, {"multiplier": 1.0}),
            ("karcher", paths[1:], {"base": paths[0]}), ("slerp", paths[1:], {"base": paths[0], "t": 0.5})]
    sys.stdout.reconfigure(line_buffering=True)  # one line per step, also when piped
    for method, inputs, kw in runs:
        suffix = "-base" if "base" in kw else ""
        out = folder / f"merged_{method}{suffix}.safetensors"
        t0 = time.perf_counter()
        result = merge(inputs, method, output=out, overwrite=True, **kw)
        print(f"  {method + suffix:16s} {len(inputs)} models -> {out.name}: {result.summary['merged']} merged, "
              f"{result.summary['copied']} copied, {time.perf_counter() - t0:.2f} s, "
              f"weights {result.metadata.get('normalized_weights')}")
    from .hyper.pipeline import HyperConfig, run_hyper
    t0 = time.perf_counter()
    print("  hyper-merge      3 models -> one hyper checkpoint + 2 LoRAs ...", flush=True)
    hyper = run_hyper(HyperConfig(models=paths, name="demo", out_dir=folder, ranks=[4, 2], iterations=3,
                                  overwrite=True, progress=progress_lines("hyper-merge")))
    print(f"  hyper-merge      3 models -> {hyper.hyper_path.name} + {len(hyper.lora_paths)} LoRAs, mean error "
          f"{hyper.report['mean_relative_error_covered']:.3f} over the LoRA layers, "
          f"{time.perf_counter() - t0:.2f} s; tags:")
    for line in hyper.multipliers_path.read_text().splitlines():
        print(f"    {line}")
    print("done: every method ran on the demo checkpoints.")
    return 0


def _add_app_arguments(parser) -> None:
    # The app lives in manifold_webui (beside this package); gradio is imported only when it starts.
    try:
        from manifold_webui.app import add_arguments
    except ImportError:
        return
    add_arguments(parser)


def cmd_app(args) -> int:
    try:
        from manifold_webui.app import main
    except ImportError:
        raise MergeError("the app needs the manifold_webui folder of this repository beside merge_core") from None
    return main(args)


class _Parser(argparse.ArgumentParser):
    """One short line for a mistyped command, flag or choice (with "did you mean"), not a usage dump."""

    def error(self, message):
        import difflib
        import re
        hint = ""
        wrong = re.search(r"unrecognized arguments: (\S+)", message)
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if wrong:
            flags = {o for parser in _all_parsers(self) for a in parser._actions for o in a.option_strings}
            close = difflib.get_close_matches(wrong.group(1).split("=")[0], sorted(flags), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
        elif choice:
            options = [c.strip(" '") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1).lower(), options, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            message = f"invalid choice {choice.group(1)!r}"
        self.exit(2, f"error: {message}{hint} (see `{self.prog} --help`)\n")


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m merge_core", description="Manifold Merge: merge SD checkpoints")
    parser.add_argument("--version", action="version", version=f"manifold-merge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_merge_parser(sub)
    p = sub.add_parser("recipe", help="print the recipe a merge output carries, as a file merge --recipe runs",
                       description="Print the recipe embedded in a merge output as YAML (or JSON) that "
                                   "`merge --recipe FILE` runs again; the inputs' sha256 are checked then.")
    p.add_argument("file", help="a .safetensors file written by Manifold Merge")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.add_argument("--output", help="the output path written into the printed recipe (default: FILE itself)")
    p.set_defaults(func=cmd_recipe)
    p = sub.add_parser("inspect", help="architecture, dtypes, size, hash and metadata of checkpoints")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-hash", action="store_true")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("blocks", help="an architecture's blocks (for --blocks) and the presets")
    p.add_argument("arch", help="sd1, sd2, sdxl, sd3 or flux")
    p.set_defaults(func=cmd_blocks)
    p = sub.add_parser("demo", help="build small demo checkpoints and run every method on them")
    p.add_argument("--dir", help="folder for the demo files (default: a new temp folder)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("app", help="the merge tab as a local web app (needs requirements-app.txt)")
    p.set_defaults(func=cmd_app)
    _add_app_arguments(p)
    try:
        from .hyper.cli import add_subcommands
    except ImportError:
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    return parser


def _stop_on_first_signal() -> dict:
    """Ctrl-C (SIGINT), SIGTERM (kill, a service stop) and SIGHUP (terminal closed) all stop a run the
    same way: the first one raises KeyboardInterrupt, the temporary output is removed on the way out, and
    every later one is ignored, so a second Ctrl-C can never cut the cleanup short. Returns the handlers
    to restore."""
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]

    def ignore(signum, frame):  # a Python no-op, not SIG_IGN: a signal already pending must find a handler
        pass

    def handler(signum, frame):
        for name in names:
            signal.signal(getattr(signal, name), ignore)
        raise KeyboardInterrupt
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, handler)
    return previous


def main(argv=None) -> int:
    previous = {}
    interrupted = False
    try:
        previous = _stop_on_first_signal()
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:  # the library turns the expected ones into MergeError; this is the safety net
        print(f"error: {exc.filename or ''}: {describe_os_error(exc)}; nothing was written".replace("error: : ", "error: "),
              file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items() if not interrupted else ():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

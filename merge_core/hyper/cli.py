"""CLI subcommands: hyper, hyper-project, extract-lora."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MergeError


def add_subcommands(sub) -> None:
    p = sub.add_parser("hyper", help="M checkpoints (SD1.x, SD2.x, SDXL, SD3, Flux) -> one hyper checkpoint + K LoRAs "
                       "with per-model strengths")
    p.add_argument("--config", help="YAML with the reference keys: name, models, device, dtype, iterations, ranks")
    p.add_argument("--models", nargs="+")
    p.add_argument("--ranks", nargs="+", help="one rank per LoRA (64 64 32 32 or 64,64,32,32), or auto "
                   "(with --budget or --target): how many LoRAs and which ranks, from the PCA spectrum")
    p.add_argument("--budget", help="--ranks auto: total size of the LoRA files, e.g. 500MB, 1.5GB")
    p.add_argument("--target", type=float, help="--ranks auto: mean relative error to reach, e.g. 0.05")
    p.add_argument("--threads", type=int, help="CPU threads (default: the CPUs available, at most 4)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--name")
    p.add_argument("--out-dir")
    p.add_argument("--lora-dir", help="folder for the LoRA files (default: --out-dir), e.g. the WebUI's models/Lora")
    p.add_argument("--device")
    p.add_argument("--dtype", help="float16 (default), bfloat16 or float32")
    p.add_argument("--tol", type=float, default=1e-3, help="stop when a round improves the error by less")
    p.add_argument("--no-floor", action="store_true", help="skip the per-model SVD floor in the report")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_hyper)
    p = sub.add_parser("hyper-project", help="fit LoRA strengths for a model outside the hyper set")
    p.add_argument("--hyper", required=True, help="the hyper set: DIR/NAME, or its hyper checkpoint DIR/NAME_hyper.safetensors")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_project)
    p = sub.add_parser("extract-lora", help="LoRA from the difference of two checkpoints (SD1.x, SD2.x, SDXL, SD3, "
                       "Flux), in the kohya naming A1111, Forge and ComfyUI load")
    p.add_argument("--base", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--conv-rank", type=int, help="also extract 3x3 convolutions (LoCon) at this rank")
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_extract)


def parse_ranks(values) -> list[int] | str:
    """--ranks 64 64 32 32, --ranks 64,64,32,32, --ranks "64, 64" or --ranks auto."""
    if isinstance(values, str):
        values = [values]
    items = [part for value in values for part in str(value).replace(",", " ").split()]
    if len(items) == 1 and items[0].lower() == "auto":
        return "auto"
    try:
        ranks = [int(x) for x in items]
    except ValueError:
        raise MergeError(f"--ranks: give integers (64 64 32 32 or 64,64,32,32) or auto, got {' '.join(items)}") \
            from None
    if not ranks:
        raise MergeError("--ranks: give at least one rank")
    return ranks


def _config_from(args) -> dict:
    cfg: dict = {}
    if args.config:
        import yaml
        try:
            cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise MergeError(f"{args.config}: cannot read config ({exc})") from None
        if not isinstance(cfg, dict):
            raise MergeError(f"{args.config}: config must be a mapping")
        unknown = set(cfg) - {"name", "models", "device", "dtype", "iterations", "ranks", "out_dir", "tol",
                              "budget", "target", "threads"}
        if unknown:
            raise MergeError(f"{args.config}: unknown keys {sorted(unknown)}")
    for key in ("models", "ranks", "iterations", "name", "device", "dtype", "budget", "target", "threads"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if cfg.get("ranks") is not None:
        cfg["ranks"] = parse_ranks(cfg["ranks"])
    if args.out_dir is not None:
        cfg["out_dir"] = args.out_dir
    if not cfg.get("models"):
        raise MergeError("give --models (or models: in --config)")
    return cfg


def cmd_hyper(args) -> int:
    from ..cli import progress_bar
    from .pipeline import HyperConfig, format_report, run_hyper
    cfg = _config_from(args)
    update, close = progress_bar(False)
    try:
        result = run_hyper(HyperConfig(
            models=cfg["models"], name=cfg.get("name", "hyper"), out_dir=cfg.get("out_dir", "."),
            lora_dir=args.lora_dir,
            ranks=cfg.get("ranks", (64, 64, 32, 32)), iterations=int(cfg.get("iterations", 6)),
            budget=cfg.get("budget"), target=None if cfg.get("target") is None else float(cfg["target"]),
            threads=cfg.get("threads"),
            device=cfg.get("device", "cpu"), dtype=cfg.get("dtype", "float16"), tol=float(cfg.get("tol", args.tol)),
            floor=not args.no_floor, overwrite=args.overwrite, progress=update))
    finally:
        close()
    print(format_report(result.report))
    print(f"\nwrote {result.hyper_path}, {len(result.lora_paths)} LoRAs, {result.multipliers_path.name}, "
          f"{result.report_path.name}\n")
    print(result.multipliers_path.read_text())
    return 0


def cmd_project(args) -> int:
    from .project import project_model
    result = project_model(args.hyper, args.model, args.device)
    print(f"{result['model']}: {result['tags']}")
    print(f"relative reconstruction error over the LoRA layers: {result['relative_error']:.4f}")
    return 0


def cmd_extract(args) -> int:
    from ..lora.extract import extract_lora
    result = extract_lora(args.base, args.model, args.output, args.rank, args.conv_rank, args.device,
                          args.dtype, args.overwrite)
    print(json.dumps(result, indent=2))
    return 0

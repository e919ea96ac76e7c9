"""The method registry: what a merge method is, declared once.

A method is a `Method`: its name, how many models it takes, whether it takes a
base model, its parameters (`Param`: type, default, range, per-model or
scalar, whether it may vary per block, label and help) and its computation:
either `coefficients(gram, values, n)` (every method so far is "a few numbers
from the inputs' Gram matrix, then one weighted sum", see methods.py) or, for
element-wise methods, `elementwise(tensors, base, values, ...)`.

Everything else is generated from the declaration: validation and its
messages (`Method.bind`), the CLI flags (cli.py), the recipe fields, the tab's
controls and the ComfyUI node inputs. Methods live one per file in
`merge_core/method_defs/`; importing this module registers them all. Adding a
method: docs/adding-a-method.md.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import methods as M
from .errors import MergeError

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class Param:
    """One parameter of a method. Values are checked here, for every front end alike."""
    name: str                          # the name in recipes and in the engine's `params`
    default: object = None             # None: optional (the method has a rule for "not given");
                                       # a callable gets the number of models

    kind: type = float                 # float or int
    minimum: float | None = None
    maximum: float | None = None
    min_open: bool = False             # (minimum, ...] instead of [minimum, ...]
    per_model: bool = False            # one value per input model (a list)
    per_block: bool = False            # may vary per block (block weights) and per key (overrides)
    flags: tuple[str, ...] = ()        # CLI spellings; the first is the main one
    label: str = ""
    help: str = ""

    @property
    def flag(self) -> str:
        return self.flags[0] if self.flags else "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        lo = "" if self.minimum is None else f"{'(' if self.min_open else '['}{self.minimum:g}"
        hi = "" if self.maximum is None else f"{self.maximum:g}]"
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"> {self.minimum:g}" if self.min_open else f">= {self.minimum:g}"
        if hi:
            return f"<= {self.maximum:g}"
        return "a finite number"

    def check_scalar(self, value, what: str):
        """One number: finite, of the right type, in range. Returns it converted."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise MergeError(f"{what}: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise MergeError(f"{what} must be {self.range_text()}, got {value}")
        if self.kind is int:
            if value != int(value):
                raise MergeError(f"{what} must be a whole number, got {value}")
            value = int(value)
        else:
            value = float(value)
        low_bad = self.minimum is not None and (value <= self.minimum if self.min_open else value < self.minimum)
        high_bad = self.maximum is not None and value > self.maximum
        if low_bad or high_bad:
            raise MergeError(f"{what} must be {self.range_text()}, got {value:g}")
        return value


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    help: str
    params: tuple[Param, ...] = ()
    min_models: int = 2
    max_models: int = 100
    takes_base: bool = False
    requires_base: bool = False           # task-vector methods (model stock, TIES, DARE): no base, no merge
    # coefficients(gram or None, values, n) -> c with result = sum c_i x_i (with a base: base + sum c_i d_i)
    coefficients: Callable | None = None
    needs_gram: bool = False
    reported: Callable | None = None      # values, n -> the normalised weights shown in metadata (optional)
    check: Callable | None = None         # values, n -> None; cross-parameter checks, raise MergeError
    elementwise: Callable | None = None   # (tensors, base, values, key, out_dtype, compute_dtype, out) -> tensor
    aliases: tuple[str, ...] = ()
    order: float = 100.0                  # where it is listed (CLI choices, the tab's radio, node lists)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def block_param(self) -> Param | None:
        """The parameter `--blocks` sets (the first one that may vary per block)."""
        return next((p for p in self.params if p.per_block), None)

    def count_text(self) -> str:
        if self.min_models == self.max_models:
            return str(self.min_models)
        return f"{self.min_models}-{self.max_models}"

    def bind(self, n_models: int, values: Mapping | None = None, precision: str = "fp32") -> "Bound":
        """Check the model count and every value; fill defaults. Raises MergeError with a one-line message."""
        if not self.min_models <= n_models <= self.max_models:
            raise MergeError(f"method {self.name} takes {self.count_text()} models, got {n_models}")
        if precision not in PRECISIONS:
            raise MergeError(f"unknown precision {precision!r} (fp32 or fp64)")
        values = dict(values or {})
        unknown = sorted(set(values) - {p.name for p in self.params})
        if unknown:
            raise MergeError(f"method {self.name} has no parameter {unknown[0]!r} "
                             f"(its parameters: {', '.join(p.name for p in self.params) or 'none'})")
        checked = {}
        for p in self.params:
            value = values.get(p.name)
            if value is None:
                value = p.default(n_models) if callable(p.default) else p.default
            if value is None:
                checked[p.name] = None
                continue
            if p.per_model:
                value = list(value) if isinstance(value, (list, tuple)) else [value]
                if len(value) != n_models:
                    raise MergeError(f"{p.flag}: {len(value)} values given for {n_models} models "
                                     f"(one per model, in model order)")
                value = [p.check_scalar(v, p.flag) for v in value]
            else:
                value = p.check_scalar(value, p.flag)
            checked[p.name] = value
        if self.check is not None:
            self.check(checked, n_models)
        return Bound(self, n_models, checked, PRECISIONS[precision])


@dataclass(frozen=True)
class Bound:
    """A method with checked values for a number of models: what the engine runs for every key."""
    method: Method
    n_models: int
    values: dict
    compute_dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return self.method.name

    def with_values(self, overrides: Mapping) -> dict:
        """The values for one key: per-block/per-key overrides checked like the rest."""
        if not overrides:
            return self.values
        values = dict(self.values)
        for name, value in overrides.items():
            p = self.method.param(name)
            values[name] = ([p.check_scalar(v, p.flag) for v in value] if p.per_model
                            else p.check_scalar(value, p.flag))
        if self.method.check is not None:
            self.method.check(values, self.n_models)
        return values

    def coefficients(self, gram, values: Mapping | None = None) -> list[float]:
        return list(self.method.coefficients(gram, values or self.values, self.n_models))

    def merge_tensors(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out_dtype: torch.dtype,
                      out: torch.Tensor | None = None, values: Mapping | None = None, key: str = "",
                      saturated: list | None = None) -> torch.Tensor:
        values = values or self.values
        if self.method.elementwise is not None:
            return self.method.elementwise(tensors, base, values, key=key, out_dtype=out_dtype,
                                           compute_dtype=self.compute_dtype, out=out, saturated=saturated)
        gram = M.gram_matrix(tensors, base, self.compute_dtype) if self.method.needs_gram else None
        coeffs = self.coefficients(gram, values)
        tensors = list(tensors)
        if base is not None:
            tensors, coeffs = tensors + [base], M.with_base(coeffs)
        return M.linear_combination(tensors, coeffs, out_dtype, self.compute_dtype, out, saturated)

    def recipe_params(self) -> dict:
        params = {k: v for k, v in self.values.items()}
        params["precision"] = "fp64" if self.compute_dtype == torch.float64 else "fp32"
        return params

    def reported_weights(self) -> list[float] | None:
        if self.method.reported is not None:
            return self.method.reported(self.values, self.n_models)
        if not self.method.needs_gram and self.method.coefficients is not None:
            return self.coefficients(None)
        return None


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(method: Method) -> Method:
    """Add a method (called by each file in method_defs/, or by a test for a method of its own)."""
    for name in (method.name,) + method.aliases:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def unregister(name: str) -> None:
    method = _REGISTRY.pop(name, None)
    if method is not None:
        for alias in method.aliases:
            _ALIASES.pop(alias, None)


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import method_defs
    for info in sorted(pkgutil.iter_modules(method_defs.__path__), key=lambda i: i.name):
        importlib.import_module(f"{method_defs.__name__}.{info.name}")


def all_methods() -> list[Method]:
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda m: m.order)


def method_names() -> list[str]:
    return [m.name for m in all_methods()]


def get(name: str) -> Method:
    """The method called `name` (case-insensitive; aliases allowed); unknown -> MergeError with a suggestion."""
    _load_builtin()
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    import difflib
    close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=1)
    hint = f"; did you mean {_ALIASES.get(close[0], close[0])}?" if close else ""
    raise MergeError(f"unknown method {name!r} (choose from {', '.join(_REGISTRY)}){hint}")


def base_methods() -> list[str]:
    return [m.name for m in all_methods() if m.takes_base]


@dataclass
class FlagSpec:
    """One CLI flag and the (method, param) pairs it sets."""
    flag: str
    aliases: tuple[str, ...]
    kind: type
    per_model: bool
    help: str
    targets: list[tuple[str, str]] = field(default_factory=list)


def cli_flags() -> list[FlagSpec]:
    """Every method parameter's flags, merged where methods share a spelling (e.g. --weights)."""
    flags: dict[str, FlagSpec] = {}
    for method in all_methods():
        for p in method.params:
            spec = flags.get(p.flag)
            if spec is None:
                spec = flags[p.flag] = FlagSpec(p.flag, p.flags[1:], p.kind, p.per_model, "")
            spec.targets.append((method.name, p.name))
            spec.aliases = tuple(dict.fromkeys(spec.aliases + p.flags[1:]))
    for spec in flags.values():
        parts = []
        for method_name, param_name in spec.targets:
            p = get(method_name).param(param_name)
            default = "" if p.default is None or callable(p.default) else f" (default {p.default})"
            parts.append(f"{method_name}: {p.help}{default}")
        spec.help = "; ".join(parts)
    return list(flags.values())

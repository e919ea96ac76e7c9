"""Geometric median of whole tensors (Weiszfeld), on the Gram matrix: the median lies in the inputs' span."""
from .. import methods_sparse as S
from ..errors import MergeError
from ..registry import Method, Param, register


def _merge(tensors, base, values, *, key="", out_dtype=None, compute_dtype=None, out=None, saturated=None):
    return S.geometric_median(tensors, values["weights"], values["median_iter"], values["median_eps"],
                              out_dtype, compute_dtype, out, saturated)


def _check(values, n):
    weights = values["weights"]
    if weights is not None and sum(weights) <= 0:
        raise MergeError(f"geometric-median weights {weights} must not all be 0")


register(Method(
    name="geometric-median", order=85, label="Geometric median",
    help="the point with the least summed distance to the models (whole tensors; Weiszfeld iterations on "
         "N coefficients)",
    params=(
        Param("weights", None, minimum=0.0, per_model=True, per_block=True, flags=("--weights", "--alphas"),
              label="Weights", help="per-model weights >= 0 of the distances (default equal)"),
        Param("median_iter", 100, kind=int, minimum=0, maximum=100000, flags=("--median-iter",),
              label="Iterations", help="Weiszfeld iteration limit"),
        Param("median_eps", 1e-6, minimum=0.0, min_open=True, maximum=1.0, flags=("--median-eps",),
              label="eps", help="smallest distance used in a Weiszfeld weight"),
    ),
    min_models=2, elementwise=_merge, check=_check, aliases=("geometric_median", "geomedian"),
))

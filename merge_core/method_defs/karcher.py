"""Karcher (Frechet) mean: the weighted Riemannian mean of the whole-tensor directions, on the Gram matrix."""
from .. import methods as M
from ..errors import MergeError
from ..registry import Method, Param, register


def _weights(values, n):
    return values["weights"] if values["weights"] is not None else [1.0] * n


def _coefficients(gram, values, n):
    coeffs, _ = M.karcher_coefficients(gram, _weights(values, n), values["karcher_iter"], values["karcher_tol"])
    return coeffs


def _check(values, n):
    total = sum(_weights(values, n))
    if abs(total) < 1e-12:
        raise MergeError(f"karcher weights {_weights(values, n)} sum to {total:g}; they must sum to a non-zero number")


register(Method(
    name="karcher", order=10, label="Karcher mean",
    help="weighted Karcher (Riemannian) mean of 2-100 models: directions averaged on the sphere, "
         "magnitude = weighted mean of the norms",
    params=(
        Param("weights", None, per_model=True, per_block=True, flags=("--weights", "--alphas"),
              label="Weights", help="per-model weights (normalised to sum 1; negatives allowed)"),
        Param("karcher_iter", 10, kind=int, minimum=0, maximum=10000, flags=("--karcher-iter",),
              label="Karcher iterations", help="iteration limit"),
        Param("karcher_tol", 1e-5, minimum=0, min_open=True, maximum=1.0, flags=("--karcher-tol",),
              label="Karcher tolerance", help="stop when the step is shorter (also the zero-norm threshold)"),
    ),
    takes_base=True, needs_gram=True, coefficients=_coefficients, check=_check,
    reported=lambda values, n: M.normalize_weights(_weights(values, n)),
))

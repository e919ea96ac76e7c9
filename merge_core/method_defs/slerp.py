"""SLERP of two whole tensors: the coefficients come from their angle (one Gram pass)."""
from .. import methods as M
from ..registry import Method, Param, register


def _coefficients(gram, values, n):
    return M.slerp_coefficients(gram, values["t"])


register(Method(
    name="slerp", order=20, label="SLERP",
    help="spherical interpolation of two models' whole tensors (t = 0 gives the first)",
    params=(Param("t", 0.5, minimum=0.0, maximum=1.0, per_block=True, flags=("--t",), label="t",
                  help="0 gives the first model, 1 the second"),),
    min_models=2, max_models=2, takes_base=True, needs_gram=True, coefficients=_coefficients,
))

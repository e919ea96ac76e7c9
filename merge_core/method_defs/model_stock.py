"""Model stock (Jang et al. 2024): t from the mean pairwise cosine of the task vectors, on the Gram matrix."""
from .. import methods as M
from .. import methods_sparse as S
from ..registry import Method, Param, register
from .ties import require_base


def _merge(tensors, base, values, *, key="", out_dtype=None, compute_dtype=None, out=None, saturated=None):
    require_base("model-stock", base, key)
    gram = M.gram_matrix(tensors, base, compute_dtype)
    coeffs = M.with_base(S.model_stock_coefficients(gram, values["cos_eps"]))
    return M.linear_combination(list(tensors) + [base], coeffs, out_dtype, compute_dtype, out, saturated)




register(Method(
    name="model-stock", order=80, label="Model stock",
    help="fine-tunes of one base: t*mean(models) + (1-t)*base, t = N cos / (1 + (N-1) cos) from the mean "
         "pairwise cosine of the task vectors (needs --base)",
    params=(Param("cos_eps", 1e-6, minimum=0.0, min_open=True, maximum=1.0, flags=("--cos-eps",),
                  label="cos eps", help="lower clamp of each pair's norm product"),),
    min_models=2, takes_base=True, requires_base=True, elementwise=_merge, aliases=("model_stock", "modelstock"),
))

"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean; streamed in chunks."""
from .. import methods_sparse as S
from ..errors import MergeError
from ..registry import Method, Param, register

DENSITY_HELP = {
    "ties": "fraction of each task vector kept (the largest magnitudes), in (0, 1]",
    "dare": "probability that each task-vector element is kept (the rest dropped, the kept ones scaled by 1/density)",
}


def density(default: float, what: str) -> Param:
    return Param("density", default, minimum=0.0, min_open=True, maximum=1.0, flags=("--density",),
                 label="Density", help=DENSITY_HELP[what])


LAMBDA = Param("lambda", 1.0, minimum=-10.0, maximum=10.0, per_block=True, flags=("--lambda",),
               label="lambda", help="scale of the merged task vector added to the base")
SEED = Param("seed", 0, kind=int, minimum=0, maximum=2 ** 53, flags=("--seed",), label="Seed",
             help="random seed of the drop masks (the same seed gives the same file)")


def require_base(method: str, base, key: str) -> None:
    """These methods merge task vectors (model - base): without a base they have no meaning."""
    if base is None:
        raise MergeError(f"method {method} merges task vectors and needs a base model (--base, or `base:` in a "
                         f"recipe step); no base for key {key!r} (a base without this key, or a partial-shape "
                         f"key, cannot be merged this way)")


def _merge(tensors, base, values, *, key="", out_dtype=None, compute_dtype=None, out=None, saturated=None):
    require_base("ties", base, key)
    return S.sparse_task_merge(tensors, base, lam=values["lambda"], trim_density=values["density"], elect=True,
                               key=key, out_dtype=out_dtype, compute_dtype=compute_dtype, out=out,
                               saturated=saturated)




register(Method(
    name="ties", order=90, label="TIES",
    help="task vectors trimmed to their top density fraction by magnitude, sign elected per element, "
         "disjoint mean, times lambda, added to the base (needs --base)",
    params=(density(0.2, "ties"), LAMBDA),
    min_models=1, takes_base=True, requires_base=True, elementwise=_merge, aliases=("ties-merging",),
))

"""DARE (Yu et al. 2024, "Language Models are Super Mario"): random drop + rescale of each task vector;
plain (mean of the task vectors) and with TIES' sign election and disjoint mean (DARE-TIES)."""
from .. import methods_sparse as S
from ..registry import Method, register
from .ties import LAMBDA, SEED, density, require_base


def _merger(name, elect):
    def merge(tensors, base, values, *, key="", out_dtype=None, compute_dtype=None, out=None, saturated=None):
        require_base(name, base, key)
        return S.sparse_task_merge(tensors, base, lam=values["lambda"], dare_density=values["density"],
                                   elect=elect, seed=values["seed"], key=key, out_dtype=out_dtype,
                                   compute_dtype=compute_dtype, out=out, saturated=saturated)
    return merge


register(Method(
    name="dare", order=95, label="DARE",
    help="each task vector's elements kept with probability density and scaled by 1/density, averaged, times "
         "lambda, added to the base (needs --base; deterministic per seed and key)",
    params=(density(0.1, "dare"), LAMBDA, SEED),
    min_models=1, takes_base=True, requires_base=True, elementwise=_merger("dare", elect=False), aliases=("dare-linear",),
))

register(Method(
    name="dare-ties", order=97, label="DARE-TIES",
    help="DARE's drop and rescale, then TIES' sign election and disjoint mean, times lambda, added to the base "
         "(needs --base)",
    params=(density(0.1, "dare"), LAMBDA, SEED),
    min_models=1, takes_base=True, requires_base=True, elementwise=_merger("dare-ties", elect=True), aliases=("dare_ties",),
))

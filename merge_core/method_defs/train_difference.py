"""supermerger's "train difference": add difference with B - C applied as if trained on A (element-wise)."""
from .. import methods as M
from ..registry import Method, register
from .linear import MULTIPLIER


def _merge(tensors, base, values, *, key="", out_dtype=None, compute_dtype=None, out=None, saturated=None):
    a, b, c = tensors
    return M.train_difference(a, b, c, values["multiplier"], out_dtype, compute_dtype, out, saturated)


register(Method(
    name="train-difference", order=75, label="Train difference",
    help="A + M*(B - C)*1.8*|B - A|/(|B - A| + |B - C|) element-wise: B - C applied as if trained on A "
         "(supermerger's trainDifference)",
    params=(MULTIPLIER,),
    min_models=3, max_models=3, elementwise=_merge, aliases=("train_difference", "traindifference", "train-diff"),
))

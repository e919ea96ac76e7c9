"""A1111's Checkpoint Merger methods: weighted sum and add difference."""
from ..registry import Method, Param, register

MULTIPLIER = Param("multiplier", 0.5, minimum=-10.0, maximum=10.0, per_block=True, flags=("--multiplier", "-m"),
                   label="Multiplier (M)", help="M")

register(Method(
    name="weighted", order=60, label="Weighted sum", help="A*(1-M) + B*M", params=(MULTIPLIER,),
    min_models=2, max_models=2, aliases=("weighted-sum",),
    coefficients=lambda gram, values, n: [1.0 - values["multiplier"], values["multiplier"]],
))

register(Method(
    name="add-difference", order=70, label="Add difference", help="A + M*(B - C)", params=(MULTIPLIER,),
    min_models=3, max_models=3, aliases=("add_difference", "add-diff"),
    coefficients=lambda gram, values, n: [1.0, values["multiplier"], -values["multiplier"]],
))

"""The moving averages of the SMA/EMA/WMA merger: fixed coefficients, one linear pass."""
from .. import methods as M
from ..registry import Method, Param, register

register(Method(
    name="sma", order=30, label="SMA", help="simple moving average: every model weighs 1/N",
    coefficients=lambda gram, values, n: M.sma_coefficients(n),
))

register(Method(
    name="ema", order=40, label="EMA",
    help="exponential moving average in model order: E_k = alpha*M_k + (1-alpha)*E_(k-1)",
    params=(Param("alpha", 0.5, minimum=0.0, min_open=True, maximum=1.0, per_block=True, flags=("--alpha",),
                  label="alpha", help="weight of each newer model, in (0, 1]"),),
    coefficients=lambda gram, values, n: M.ema_coefficients(n, values["alpha"]),
))

register(Method(
    name="wma", order=50, label="WMA", help="weighted moving average (default weights N, N-1, ..., 1: the first weighs most)",
    params=(Param("weights", lambda n: [float(n - i) for i in range(n)], minimum=0.0, per_model=True, per_block=True, flags=("--weights", "--alphas"),
                  label="Weights", help="per-model weights >= 0 (normalised; default N..1)"),),
    coefficients=lambda gram, values, n: M.wma_coefficients(n, values["weights"]),
    check=lambda values, n: M.wma_coefficients(n, values["weights"]) and None,
))

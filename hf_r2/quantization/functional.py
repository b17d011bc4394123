"""Pure quantizer math: forward values and the gradients each paper prescribes.

Every fake quantizer here is written as `encode` (integer codes, scale, zero point) followed by one dequantization
`(codes - zero_point) * scale`. The finalized model stores the same codes and runs the same dequantization, so its
outputs equal the fake-quantized model's bit for bit.

Gradients:

* `round_ste`: straight-through estimator (identity gradient) for the round.
* `round_ewgs`: element-wise gradient scaling (Lee et al., 2021), `g * (1 + delta * sign(g) * (x - round(x)) / levels)`,
  where dividing by `levels` puts `x - round(x)` in the paper's normalized `[0, 1]` domain.
* `grad_scale`: identity forward, gradient times `g` (LSQ's step-size gradient scale, Esser et al., 2020).
"""

from __future__ import annotations

import math

import torch

from hf_r2.utils import check_bits  # noqa: F401  (re-exported from its former home)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundEWGS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, levels):
        x_q = torch.round(x)
        # Normalized-domain residual of the paper: x is in step units here, the paper's x_n in [0, 1] is x / levels.
        ctx.save_for_backward((x - x_q) / levels)
        ctx.delta = float(delta)
        return x_q

    @staticmethod
    def backward(ctx, grad):
        (residual,) = ctx.saved_tensors
        return grad * (1 + ctx.delta * torch.sign(grad) * residual), None, None


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounds to the nearest integer (ties to even) with an identity gradient."""
    return _RoundSTE.apply(x)


def round_ewgs(x: torch.Tensor, delta: float, levels: int) -> torch.Tensor:
    """Rounds `x` (in step units) with EWGS's element-wise gradient scaling.

    Args:
        x (`torch.Tensor`): Values in units of the quantization step.
        delta (`float`): EWGS scaling factor (>= 0); `0` gives the straight-through estimator.
        levels (`int`): Number of steps spanned by the clipping range (`Q_N + Q_P`), mapping `x - round(x)` to the
            paper's normalized domain.
    """
    return _RoundEWGS.apply(x, delta, levels)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Returns `x` unchanged; its gradient is multiplied by `scale`."""
    return _GradScale.apply(x, scale)


def signed_range(bits: int) -> tuple[int, int]:
    """`(Q_N, Q_P)` of a signed `bits`-bit grid: codes in `[-Q_N, Q_P]`."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """`(Q_N, Q_P)` of an unsigned `bits`-bit grid: codes in `[0, Q_P]`."""
    return 0, 2**bits - 1


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float = 0.0) -> torch.Tensor:
    """`(codes - zero_point) * scale`: the one dequantization used by fake-quantized and finalized layers."""
    return (codes.to(scale.dtype) - zero_point) * scale


# ---------------------------------------------------------------------------------------------------------------
# LSQ / EWGS
# ---------------------------------------------------------------------------------------------------------------


def lsq_grad_scale(num_elements: int, q_p: int) -> float:
    """LSQ's step-size gradient scale `g = 1 / sqrt(N * Q_P)` (`Q_P` taken as at least 1)."""
    return 1.0 / math.sqrt(num_elements * max(q_p, 1))


def lsq_init_step(x: torch.Tensor, q_p: int) -> torch.Tensor:
    """LSQ's initial step `2 * mean(|x|) / sqrt(Q_P)` (`Q_P` taken as at least 1)."""
    return 2 * x.detach().abs().mean() / math.sqrt(max(q_p, 1))


def lsq_encode(
    x: torch.Tensor,
    step: torch.Tensor,
    q_n: int,
    q_p: int,
    g: float,
    *,
    eps: float = 1e-8,
    ewgs_delta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ (or EWGS) codes and effective step of `x`; `dequantize(codes, step)` is the fake-quantized value.

    Forward: `codes = round(clip(x / s, -Q_N, Q_P))` with `s = max(|step|, eps)`, so the step stays positive.
    Backward: straight-through round (or EWGS scaling when `ewgs_delta` is given), zero gradient to `x` outside the
    clipping range, and the step's gradient multiplied by `g`.

    Args:
        x (`torch.Tensor`): Values to quantize.
        step (`torch.Tensor`): Learned step size (scalar or broadcastable to `x`).
        q_n (`int`), q_p (`int`): Codes lie in `[-q_n, q_p]`.
        g (`float`): Step-size gradient scale, usually `lsq_grad_scale(N, q_p)`.
        eps (`float`, *optional*, defaults to 1e-8): Smallest step.
        ewgs_delta (`float`, *optional*): If given, use EWGS's element-wise gradient scaling with this delta.

    Returns:
        `(codes, s)`: codes as floats holding integers, and the effective step.
    """
    s = grad_scale(step, g).abs().clamp_min(eps)
    x_n = torch.clamp(x / s, -q_n, q_p)
    codes = round_ste(x_n) if ewgs_delta is None else round_ewgs(x_n, ewgs_delta, q_n + q_p)
    return codes, s


# ---------------------------------------------------------------------------------------------------------------
# PACT / DoReFa
# ---------------------------------------------------------------------------------------------------------------


def pact_encode(
    x: torch.Tensor, alpha: torch.Tensor, bits: int, *, signed: bool = False, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PACT activation codes (Choi et al., 2018): `y = clip(x, 0, alpha)` quantized to `2^bits` levels.

    Unsigned: `codes = round(y * (2^b - 1) / alpha)`, scale `alpha / (2^b - 1)`, zero point 0. The gradient to `alpha`
    is 1 where `x >= alpha` and 0 inside (straight-through round); the gradient to `x` is 1 for `0 <= x < alpha`.
    Signed inputs (an extension, for inputs that are not post-ReLU) use `clip(x, -alpha, alpha)` and `2^b` levels
    spread evenly over `[-alpha, alpha]` (zero point `(2^b - 1) / 2`): `alpha` then gets `+1` above and `-1` below.

    Returns:
        `(codes, scale, zero_point)`.
    """
    levels = 2**bits - 1
    a = alpha.abs().clamp_min(eps)
    if not signed:
        # torch.minimum/maximum route the gradient of clip(x, 0, alpha) to alpha where x >= alpha (PACT's rule).
        y = torch.minimum(torch.relu(x), a)
        # A detached scale keeps alpha's gradient to the clipping path only (straight-through inside the range);
        # letting it flow through the scale as well would give LSQ's gradient instead of PACT's.
        scale = (a / levels).detach()
        return round_ste(y / scale), scale, torch.zeros((), dtype=x.dtype, device=x.device)
    y = torch.maximum(torch.minimum(x, a), -a)
    scale = (2 * a / levels).detach()
    zero_point = torch.full((), levels / 2, dtype=x.dtype, device=x.device)
    return round_ste(y / scale + zero_point), scale, zero_point


def dorefa_weight_encode(
    w: torch.Tensor, bits: int, *, rescale: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoReFa weight codes (Zhou et al., 2016, as used by PACT): `w_q = 2 * q_b(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`.

    `q_b(r) = round((2^b - 1) r) / (2^b - 1)` with a straight-through round; gradients flow through `tanh` and the
    max as in the original. With `rescale`, `w_q` is multiplied by the (detached) `max|w|`, so a pretrained layer
    keeps its output scale; without it, weights lie in `[-1, 1]` as in the paper (for layers followed by a norm).

    Returns:
        `(codes, scale, zero_point)` with codes in `0 .. 2^b - 1`, zero point `(2^b - 1) / 2` and scale
        `2 c / (2^b - 1)` (`c = max|w|` or 1), so that `dequantize` gives `c * w_q`.
    """
    levels = 2**bits - 1
    t = torch.tanh(w)
    r = t / (2 * t.abs().max()) + 0.5
    codes = round_ste(r * levels)
    c = w.detach().abs().max() if rescale else torch.ones((), dtype=w.dtype, device=w.device)
    scale = 2 * c / levels
    zero_point = torch.full((), levels / 2, dtype=w.dtype, device=w.device)
    return codes, scale, zero_point


# ---------------------------------------------------------------------------------------------------------------
# Round-to-nearest PTQ
# ---------------------------------------------------------------------------------------------------------------


def minmax_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, *, symmetric: bool, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point from a range, following torch.ao's MinMaxObserver conventions.

    Symmetric: signed codes in `[-2^(b-1), 2^(b-1) - 1]`, `scale = max(|min|, |max|) / ((q_max - q_min) / 2)`, zero
    point 0. Asymmetric: unsigned codes in `[0, 2^b - 1]`, `scale = (max - min) / (2^b - 1)` over the range extended
    to contain 0, `zero_point = clip(round(-min / scale), 0, 2^b - 1)`.

    Returns:
        `(scale, zero_point, q_min, q_max)`.
    """
    x_min = torch.clamp(x_min, max=0)
    x_max = torch.clamp(x_max, min=0)
    if symmetric:
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = torch.maximum(-x_min, x_max) / ((q_max - q_min) / 2)
        scale = scale.clamp_min(eps)
        return scale, torch.zeros_like(scale), q_min, q_max
    q_min, q_max = 0, 2**bits - 1
    scale = ((x_max - x_min) / (q_max - q_min)).clamp_min(eps)
    zero_point = torch.clamp(torch.round(-x_min / scale), q_min, q_max)
    return scale, zero_point, q_min, q_max


def rtn_encode(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Round-to-nearest codes `clip(round(x / scale) + zero_point, q_min, q_max)`, straight-through round."""
    return torch.clamp(round_ste(x / scale) + zero_point, q_min, q_max)


def channel_minmax(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `w` over everything (per tensor) or per output channel (dim 0), shaped to broadcast."""
    w = w.detach()
    if not per_channel:
        return w.min(), w.max()
    flat = w.reshape(w.shape[0], -1)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return flat.min(dim=1).values.reshape(shape), flat.max(dim=1).values.reshape(shape)


class _AddL2Grad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coefficient):
        ctx.save_for_backward(x)
        ctx.coefficient = float(coefficient)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad + ctx.coefficient * x, None


def add_l2_grad(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Returns `x` unchanged; backward adds `coefficient * x` to its gradient, i.e. the gradient of an L2 term
    `coefficient / 2 * x^2` in the loss, without touching the loss (one term per forward that reaches backward)."""
    return _AddL2Grad.apply(x, coefficient)

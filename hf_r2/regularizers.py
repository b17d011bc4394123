"""The three R² range regularizers of Kundu et al. (section 2) as pure functions of one weight.

Every function returns a scalar `float32` tensor, differentiable with respect to the weight and to its own learnable
parameter (the margin `M` or the temperature `alpha`). The arithmetic is done in `float32` whatever the weight's dtype,
so that `float16` / `bfloat16` weights and large temperatures stay finite.

Multi-dimensional form (`cluster_dim = d > 1`, for vector palettization): the weight is seen as a set of
`d`-dimensional vectors laid out as in `hf_r2.utils.weight_to_vectors` (`d` consecutive output channels at one input
position), and the range is regularized in every coordinate: the loss is the sum over the `d` coordinates of the
scalar loss of that coordinate, each coordinate with its own margin / temperature (a tensor of shape `(d,)`).

Scale-free parametrization (`scale`, what `R2Config(scale_free=True)`, the default, uses): the learnable parameter is
measured in units of the layer's standard deviation `σ` (per coordinate, detached: a constant of each step, so that
the range term never turns into a variance penalty through `∂σ/∂w`). The margin is `M = |m| σ`; the soft-min-max
temperature is `α / σ` and its penalty `σ e^(-α)`. The loss then keeps the units of the weight (its value for `m`,
`α` equals the paper's for `M = m σ`, temperature `α / σ`, penalty `σ e^(-α)`), while `m` and `α` mean the same for
a layer of std 0.01 as for one of std 1. `scale=None` is the paper's eq. 2 / eq. 3 exactly.

These functions are the readable definition of the math. `hf_r2.range_regularizer` registers each of them
(`hf_r2.regularizer_registry`) with its fused kernel and learnable parameter, and `RangeRegularizer` computes the
same values for a whole model at once with those grouped kernels; the tests check the two against each other.
`REGULARIZERS` / `R2_TYPES` read the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hf_r2.regularizer_registry import get_regularizer, regularizer_names
from hf_r2.utils import check_cluster_dim, weight_to_vectors

__all__ = [  # plus `REGULARIZERS` and `R2_TYPES`, read from the registry by the module's `__getattr__`
    "linf",
    "margin",
    "soft_min_max",
    "init_margin",
    "init_alpha",
    "coordinate_std",
    "weight_coordinates",
]


def weight_coordinates(weight: torch.Tensor, cluster_dim: int = 1) -> torch.Tensor:
    """Returns the weight as a `float32` tensor of shape `(N, cluster_dim)`: one column per vector coordinate.

    Raises:
        ValueError: If `cluster_dim` is not a positive integer dividing the output channels.
    """
    return weight_to_vectors(weight, cluster_dim).float()


#: Smallest scale-free unit: a constant layer (std 0) keeps finite values.
MIN_SCALE = 1e-12


def coordinate_std(weight: torch.Tensor, cluster_dim: int = 1) -> torch.Tensor:
    """The detached standard deviation of each coordinate, `(cluster_dim,)` float32: the scale-free unit.

    Population std (`correction=0`), clamped to at least `1e-12` so that a constant (e.g. zero-initialised) layer gives
    finite values instead of a division by zero.
    """
    with torch.no_grad():
        return weight_coordinates(weight, cluster_dim).std(dim=0, correction=0).clamp_min(MIN_SCALE)


def _scale(scale: torch.Tensor | float | None, cluster_dim: int, device: torch.device) -> torch.Tensor:
    if scale is None:
        return torch.ones(cluster_dim, device=device)
    return _per_coordinate(scale, cluster_dim, "scale", device).detach()


def _per_coordinate(param: torch.Tensor | float, cluster_dim: int, what: str, device: torch.device) -> torch.Tensor:
    """Broadcasts a scalar or `(cluster_dim,)` parameter to a `float32` tensor of shape `(cluster_dim,)`."""
    param = torch.as_tensor(param, device=device)
    if param.numel() == 1:
        return param.float().reshape(1).expand(cluster_dim)
    if param.shape != (cluster_dim,):
        raise ValueError(
            f"{what} must be a scalar or have shape ({cluster_dim},) for cluster_dim={cluster_dim}, "
            f"got shape {tuple(param.shape)}."
        )
    return param.float()


def linf(weight: torch.Tensor, cluster_dim: int = 1) -> torch.Tensor:
    """L∞ range regularization (eq. 1): `max |w|`, summed over the `cluster_dim` coordinates.

    Args:
        weight (`torch.Tensor`): A layer weight of shape `(out, ...)`.
        cluster_dim (`int`, *optional*, defaults to 1): Vector dimension `d`; must divide `out`.

    Returns:
        `torch.Tensor`: A scalar `float32` tensor.
    """
    return weight_coordinates(weight, cluster_dim).abs().amax(dim=0).sum()


def margin(
    weight: torch.Tensor, margin: torch.Tensor | float, cluster_dim: int = 1, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Margin range regularization (eq. 2): `|M| + Σ_i max(|w_i| - |M|, 0)`, per coordinate, summed.

    With `scale = σ` the margin is `M = |margin| σ` (scale-free: `margin` in units of the std).

    The hinge is summed (not averaged) over the elements: with a mean, the gradient pulling `M` down (1) would always
    beat the one pushing it up (the fraction of weights outside the margin, < 1), so `M` would collapse to 0 and the
    loss would degenerate into L1.

    Args:
        weight (`torch.Tensor`): A layer weight of shape `(out, ...)`.
        margin (`torch.Tensor` or `float`): The learnable margin `M`: a scalar, or shape `(cluster_dim,)`.
        cluster_dim (`int`, *optional*, defaults to 1): Vector dimension `d`; must divide `out`.
        scale (`torch.Tensor` or `float`, *optional*): Unit of the margin per coordinate (treated as a constant);
            `None` (the paper) is 1. `coordinate_std(weight, cluster_dim)` gives the scale-free form.

    Returns:
        `torch.Tensor`: A scalar `float32` tensor.
    """
    vectors = weight_coordinates(weight, cluster_dim)
    unit = _scale(scale, cluster_dim, vectors.device)
    m = _per_coordinate(margin, cluster_dim, "margin", vectors.device).abs() * unit
    return m.sum() + torch.relu(vectors.abs() - m).sum()


def soft_min_max(
    weight: torch.Tensor, alpha: torch.Tensor | float, cluster_dim: int = 1, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Soft-min-max range regularization (eq. 3): `s_max - s_min + e^(-alpha)`, per coordinate, summed.

    With `scale = σ`: temperature `alpha / σ` and penalty `σ e^(-alpha)` (scale-free: `alpha` in units of `1 / std`).

    `s_max = Σ_i w_i softmax(alpha w)_i` and `s_min = Σ_i w_i softmax(-alpha w)_i`; softmax subtracts the maximum of
    its input, which is eq. 3's `W - W_max` (resp. `W - W_min`), so the exponentials never overflow.

    Args:
        weight (`torch.Tensor`): A layer weight of shape `(out, ...)`.
        alpha (`torch.Tensor` or `float`): The learnable temperature: a scalar, or shape `(cluster_dim,)`.
        cluster_dim (`int`, *optional*, defaults to 1): Vector dimension `d`; must divide `out`.
        scale (`torch.Tensor` or `float`, *optional*): Unit of the weights per coordinate (treated as a constant);
            `None` (the paper) is 1. `coordinate_std(weight, cluster_dim)` gives the scale-free form.

    Returns:
        `torch.Tensor`: A scalar `float32` tensor.
    """
    vectors = weight_coordinates(weight, cluster_dim)
    a = _per_coordinate(alpha, cluster_dim, "alpha", vectors.device)
    unit = _scale(scale, cluster_dim, vectors.device)
    s_max = (torch.softmax(a / unit * vectors, dim=0) * vectors).sum(dim=0)
    s_min = (torch.softmax(-a / unit * vectors, dim=0) * vectors).sum(dim=0)
    return (s_max - s_min + unit * torch.exp(-a)).sum()


def init_margin(weight: torch.Tensor, cluster_dim: int = 1, std_multiple: float = 2.0) -> torch.Tensor:
    """Initial margin of a layer: `std_multiple × std(W)` (the paper uses 2), one per coordinate.

    Returns:
        `torch.Tensor`: A detached `float32` tensor of shape `(cluster_dim,)`.
    """
    if not math.isfinite(std_multiple) or std_multiple < 0:
        raise ValueError(f"std_multiple must be a finite number >= 0, got {std_multiple!r}.")
    with torch.no_grad():
        # correction=0 keeps a one-element weight finite (its std is 0, not NaN).
        return weight_coordinates(weight, cluster_dim).std(dim=0, correction=0) * std_multiple


def init_alpha(weight: torch.Tensor, cluster_dim: int = 1, alpha_init: float = 0.1) -> torch.Tensor:
    """Initial temperature of a layer: `alpha_init` (the paper uses 0.1) for every coordinate.

    Returns:
        `torch.Tensor`: A `float32` tensor of shape `(cluster_dim,)` on the weight's device.
    """
    check_cluster_dim(cluster_dim, weight.shape)
    if not math.isfinite(alpha_init):
        raise ValueError(f"alpha_init must be finite, got {alpha_init!r}.")
    return torch.full((cluster_dim,), float(alpha_init), dtype=torch.float32, device=weight.device)


RegularizerFn = Callable[..., torch.Tensor]


def __getattr__(name: str):
    # `REGULARIZERS` (name -> pure function) and `R2_TYPES` (the names) are read from the registry
    # (`hf_r2.regularizer_registry`) at every access, so that a regularizer registered later appears in them too.
    if name == "REGULARIZERS":
        return {n: get_regularizer(n).loss for n in regularizer_names()}
    if name == "R2_TYPES":
        return tuple(regularizer_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""`RangeRegularizer`: the total R² range loss of a model, with its learnable margins / temperatures.

State-dict layout: the regularizer registers only its own parameters and their optimizer state, never the model.

* `r2_type="margin"`: one parameter `margins` of shape `(n_layers, cluster_dim)` (in units of each coordinate's std
  when `scale_free`, else in weight units),
* `r2_type="soft_min_max"`: one parameter `alphas` of shape `(n_layers, cluster_dim)` (in units of 1 / std when
  `scale_free`),
* for both, the state of the parameters' own Adam: `<name>_exp_avg`, `<name>_exp_avg_sq` (same shape) and
  `param_steps` (a 0-dim int64 count),
* `r2_type="linf"`: nothing (an empty state dict).

Row `i` belongs to `layer_names[i]`.

Why the margins and temperatures have their own optimizer (`RangeRegularizer.step_parameters`), not the model's: the
margin's gradient `1 - #weights outside` grows with the layer size, and the temperature's is of the order of the
weights' variance; with the model's SGD at the paper's settings (lr 0.1-1.0) the first sent the margin above every
weight in one step (the hinge then idle for hundreds of steps) and the second left α where it started. Adam's
update is about `lr` per step whatever the gradient's size, so a margin moves by ~`lr` std per step and α by ~`lr`
per step, under any model optimizer and learning rate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from hf_r2 import regularizers as R
from hf_r2.regularizer_registry import (
    DEFAULT_PARAMETER_LEARNING_RATE,
    LearnableParameter,
    RegularizerSpec,
    get_regularizer,
    register_regularizer,
)
from hf_r2.sharding import DenseGrad, DTensor, gather_flat_shards, is_flat_shard
from hf_r2.utils import check_cluster_dim, select_modules

__all__ = [
    "DEFAULT_PARAMETER_LEARNING_RATE",
    "R2Config",
    "R2_OPTION_NAMES",
    "RangeRegularizer",
    "SUPPORTED_LAYER_TYPES",
    "check_r2_options",
    "layer_weight",
]

logger = logging.getLogger(__name__)


def _transposed_layer_types() -> tuple[type[nn.Module], ...]:
    try:  # GPT-2 style models use transformers' Conv1D: a Linear whose weight is stored as (in, out).
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but the math does not need it
        return ()
    return (Conv1D,)


_TRANSPOSED_LAYER_TYPES = _transposed_layer_types()

#: Layer types whose weight is regularized by default (`nn.MultiheadAttention`: its packed `in_proj_weight`; its
#: `out_proj` is an `nn.Linear` of its own).
SUPPORTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Embedding,
    nn.MultiheadAttention,
    *_TRANSPOSED_LAYER_TYPES,
)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight a range regularizer sees for one supported layer, output channels first.

    `Conv1D` (GPT-2) stores `(in, out)` and is transposed; `nn.MultiheadAttention` gives its packed query/key/value
    projection `in_proj_weight` of shape `(3 * embed_dim, embed_dim)`.

    Raises:
        ValueError: For an `nn.MultiheadAttention` with separate query/key/value weights (`kdim` or `vdim` differing
            from `embed_dim`), which has no single projection weight.
    """
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:
            raise ValueError(
                "nn.MultiheadAttention with kdim/vdim != embed_dim keeps separate q/k/v projection weights, which R² "
                "does not regularize; exclude the module (its out_proj stays regularized)."
            )
        return module.in_proj_weight
    if isinstance(module, _TRANSPOSED_LAYER_TYPES):
        return module.weight.t()
    return module.weight


def _parameter(module: nn.Module) -> nn.Parameter:
    """The parameter behind `layer_weight(module)` (untransposed), to test identity and `requires_grad`."""
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


#: Default initial temperature: scale-free (units of 1 / std) and the paper's absolute one.
DEFAULT_ALPHA_INIT = {True: 4.0, False: 0.1}
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-12  # the gradients are small (r2_weight x std-sized), the usual 1e-8 would damp them


@dataclass
class R2Config:
    """Configuration of R² range regularization (Kundu et al., section 2)."""

    r2_type: str = field(metadata={"help": "Range regularizer: a registered name (hf_r2.regularizer_registry)."})
    cluster_dim: int = field(
        default=1,
        metadata={
            "help": "Vector dimension d: regularize the range of each of the d coordinates of the d-dimensional "
            "vectors that vector palettization clusters (d consecutive output channels). Must divide the output "
            "channels of every targeted layer."
        },
    )
    margin_init_std: float = field(
        default=2.0, metadata={"help": "r2_type='margin': initial margin in multiples of std(W) (the paper uses 2.0)."}
    )
    alpha_init: float | None = field(
        default=None,
        metadata={
            "help": "r2_type='soft_min_max': initial temperature alpha, also its floor when scale-free. Default: "
            f"{DEFAULT_ALPHA_INIT[True]} in units of 1/std(W) when scale-free (the default), else "
            f"{DEFAULT_ALPHA_INIT[False]} (the paper's)."
        },
    )
    scale_free: bool = field(
        default=True,
        metadata={
            "help": "Measure the margin in units of each layer's std (M = m std(W)) and the soft-min-max temperature "
            "in units of 1/std (softmax(alpha w / std), penalty std e^-alpha), std detached. Then one setting fits "
            "layers of any scale, and soft-min-max acts on the range: with the paper's absolute units alpha settles "
            "near -ln(2 Var W), where the soft range of a layer of std 0.04 is ~0.02 whatever its true range (a "
            "variance penalty). False: the paper's eq. 2 / eq. 3 exactly."
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the regularizer's own Adam on its margins / temperatures "
            "(RangeRegularizer.step_parameters; not in the model's optimizer, so any model optimizer and learning "
            "rate work: under the paper's SGD at lr 0.1 a margin in the model's optimizer jumped above every weight "
            "in one step). Each margin moves by about this many std(W) per step, each alpha by about this much. "
            "Constant (no schedule). Default (None): the regularizer's registered default, "
            f"{DEFAULT_PARAMETER_LEARNING_RATE} for margin and soft_min_max."
        },
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Layers to regularize: module names (suffix match, e.g. 'query value'), or a single regular "
            "expression matched in full (e.g. '.*attention.*'). Default: the weight of every nn.Linear, "
            "nn.Conv1d, nn.Conv2d, nn.Embedding and transformers Conv1D, first and last layers included."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Layers not to regularize; same syntax as target_modules."}
    )

    def __post_init__(self) -> None:
        spec = get_regularizer(self.r2_type)  # an unknown type raises, naming the registered ones
        options = check_r2_options({name: getattr(self, name) for name in R2_OPTION_NAMES})
        for name, value in options.items():
            setattr(self, name, value)
        if self.learning_rate is None:
            self.learning_rate = spec.default_learning_rate


#: The `R2Config` fields besides `r2_type`: the options every regularizer is configured with (`R2TrainingArguments`
#: declares one `--r2_<name>` flag per entry).
R2_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(R2Config) if f.name != "r2_type")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_r2_options(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Validates R² options (the `R2Config` fields besides `r2_type`) and returns them with `alpha_init` resolved.

    Shared by `R2Config` and `R2TrainingArguments` (which names them `r2_<name>`: pass `prefix="r2_"` so that an
    error names the flag).

    Args:
        options (`dict`): Option name (without prefix) -> value; missing names are not checked.
        prefix (`str`, *optional*): Prefix of the names in error messages.

    Raises:
        ValueError: Naming the first bad option, its value and what is allowed.
    """
    out = dict(options)
    if "cluster_dim" in out:
        dim = out["cluster_dim"]
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"{prefix}cluster_dim must be an integer >= 1, got {dim!r}.")
    if "margin_init_std" in out and not (_is_number(out["margin_init_std"]) and out["margin_init_std"] > 0):
        raise ValueError(f"{prefix}margin_init_std must be a finite number > 0, got {out['margin_init_std']!r}.")
    scale_free = out.get("scale_free", True)
    if not isinstance(scale_free, bool):
        raise ValueError(f"{prefix}scale_free must be True or False, got {scale_free!r}.")
    if "alpha_init" in out:
        if out["alpha_init"] is None:
            out["alpha_init"] = DEFAULT_ALPHA_INIT[scale_free]
        # alpha <= 0 turns the soft max into a soft min (and back): the loss would widen the range.
        if not (_is_number(out["alpha_init"]) and out["alpha_init"] > 0):
            raise ValueError(f"{prefix}alpha_init must be a finite number > 0, got {out['alpha_init']!r}.")
    rate = out.get("learning_rate")
    if rate is not None and not (_is_number(rate) and rate >= 0):
        raise ValueError(f"{prefix}learning_rate must be None or a finite number >= 0, got {rate!r}.")
    for name in ("target_modules", "exclude_modules"):
        value = out.get(name)
        if value is None or isinstance(value, str):
            continue
        value = list(value)
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError(
                f"{prefix}{name} must be None, a regex string or a non-empty list of names, got {value!r}."
            )
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Fused losses.
#
# Autograd through the plain formulas of `hf_r2.regularizers` records ~10 nodes per layer and keeps weight-sized
# intermediates (|W|, softmax probabilities, ...) alive until backward: on a 366-layer MobileBERT that costs 4-60% of
# a CPU training step and thousands of kernel launches on a GPU. Here each regularizer is ONE autograd node for all
# layers. Layers of the same shape, dtype and device are stacked into chunks of at most `_CHUNK_ELEMENTS` elements
# and reduced with a handful of batched ops per chunk. No weight-sized float32 intermediate outlives the forward
# except soft_min_max's gradient; the gradients are the closed forms:
#
# * linf: `sign(w)` on the extreme element only, as a sparse tensor: autograd adds it into the dense task gradient in
#   place, touching one element, where a dense zero-filled gradient would cost two full passes over every weight;
# * margin: `sign(w)` outside the margin, zero inside, its direction kept from the forward as int8 (dense: measured
#   faster than a sparse gradient with ~5% of non-zeros at the 2·std init, whose `nonzero` and index arithmetic cost
#   more than they save);
# * soft_min_max: dense (every weight has a softmax share), computed in the forward where the exponentials are at hand.
#
# Layout of a chunk: `(layers, d, K)` float32, `[l, c, k]` = coordinate `c` of vector `k` of `weight_to_vectors`
# (vector `k = g * rest + p` holds output channels `g*d .. g*d+d-1` at input position `p`).
# ---------------------------------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per stacked chunk: temporaries stay in cache, few ops per chunk


def _chunks(weights: tuple[torch.Tensor, ...]) -> list[list[int]]:
    """Groups layer indices by (shape, dtype, device) and splits every group into chunks of bounded size."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
    chunks = []
    for idx in groups.values():
        per = max(1, _CHUNK_ELEMENTS // max(1, weights[idx[0]].numel()))
        chunks += [idx[j : j + per] for j in range(0, len(idx), per)]
    return chunks


def _stack(ws: list[torch.Tensor], d: int) -> torch.Tensor:
    """Returns the chunk in the `(layers, d, K)` float32 layout (may be a view of the weight: do not modify it)."""
    out = ws[0].shape[0]
    if d == 1:
        if len(ws) == 1 and ws[0].dtype == torch.float32 and ws[0].is_contiguous():
            return ws[0].reshape(1, 1, -1)  # a big single layer (embeddings): no copy
        stacked = torch.stack([w.reshape(-1) for w in ws])
    else:
        stacked = torch.stack([w.reshape(out // d, d, -1).transpose(0, 1) for w in ws])
    return stacked.float().reshape(len(ws), d, -1)


def _stack_with_squares(ws: list[torch.Tensor], d: int) -> torch.Tensor:
    """Returns `(2, layers, d, K)` float32: `[0]` is the `_stack` layout of the weights, `[1]` their squares."""
    out = ws[0].shape[0]
    basis = torch.empty(2, len(ws), d, ws[0].numel() // d, device=ws[0].device)
    for j, w in enumerate(ws):
        if d == 1:
            basis[0, j, 0].view(w.shape).copy_(w)
        else:
            basis[0, j].view(d, out // d, -1).copy_(w.reshape(out // d, d, -1).transpose(0, 1))
    torch.mul(basis[0], basis[0], out=basis[1])
    return basis


def _unstack(grad: torch.Tensor, ws: list[torch.Tensor], d: int) -> tuple[torch.Tensor, ...]:
    """Inverse layout of `_stack` for a gradient: one tensor per weight, in the weight's shape and dtype."""
    shape = ws[0].shape
    if d > 1:
        grad = grad.reshape(len(ws), d, shape[0] // d, -1).transpose(1, 2)
    return grad.reshape(len(ws), *shape).to(ws[0].dtype).unbind(0)


def _weight_index(l_c_k: torch.Tensor, shape: torch.Size, d: int) -> torch.Tensor:
    """Maps chunk positions `(n, 3)` = (layer, coordinate, vector) to weight indices `(len(shape), n)`."""
    c, k = l_c_k[:, 1], l_c_k[:, 2]
    if d == 1:
        flat = k
    else:
        rest = shape.numel() // shape[0]
        flat = (torch.div(k, rest, rounding_mode="floor") * d + c) * rest + k % rest
    index = []
    for size in reversed(shape[1:]):
        index.append(flat % size)
        flat = torch.div(flat, size, rounding_mode="floor")
    index.append(flat)
    return torch.stack(index[::-1])


def _scatter_layers(values: list[torch.Tensor], chunks: list[list[int]], n: int, device: torch.device) -> torch.Tensor:
    """Reassembles per-chunk rows into layer order."""
    out = torch.empty(n, *values[0].shape[1:], dtype=values[0].dtype, device=device) if values else torch.zeros(0)
    for idx, v in zip(chunks, values, strict=True):
        out[torch.tensor(idx, device=device)] = v.to(device)
    return out


def _unit(chunk: torch.Tensor, scale_free: bool) -> torch.Tensor:
    """`(layers, d)` float32: the detached std of every coordinate when scale-free (as `R.coordinate_std`), else 1.

    Two vectorized passes (mean, then the dot product of the centred values with themselves) instead of `torch.std`,
    whose Welford reduction is not vectorized on CPU: 15x faster on a 1M-element chunk, and it was two thirds of the
    margin loss's time on a full MobileBERT.
    """
    if not scale_free:
        return torch.ones(chunk.shape[:2], device=chunk.device)
    chunk = chunk.detach()
    centred = chunk - chunk.mean(dim=2, keepdim=True)
    return torch.linalg.vecdot(centred, centred).div_(chunk.shape[2]).sqrt_().clamp_min_(R.MIN_SCALE)


_ABS_MAX_BLOCK = 1024


def _abs_max(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`max |x|` over dim 2 and its (first) position, like `chunk.abs().max(dim=2)` but 2-3x faster on CPU.

    Reductions that return indices are not vectorized on CPU, `amax` / `amin` are: take them per block of up to
    `_ABS_MAX_BLOCK` elements, then search for the index only inside the winning block.
    """
    n, d, k = chunk.shape
    block = math.gcd(k, _ABS_MAX_BLOCK)
    if block < 64:
        return chunk.abs().max(dim=2)
    blocks = chunk.reshape(n, d, k // block, block)
    peak, which = torch.maximum(blocks.amax(dim=3), blocks.amin(dim=3).neg_()).max(dim=2)
    winner = blocks.gather(2, which[:, :, None, None].expand(n, d, 1, block)).squeeze(2)
    return peak, which * block + winner.abs_().argmax(dim=2)


class _LinfLosses(torch.autograd.Function):
    """Per-layer `Σ_c max |w_c|`. Gradient: `sign(w)` on the extreme element (the first one if there are ties)."""

    @staticmethod
    def forward(ctx, d: int, *weights: torch.Tensor) -> torch.Tensor:
        chunks = _chunks(weights)
        losses, positions = [], []
        for idx in chunks:
            peak, where = _abs_max(_stack([weights[i] for i in idx], d))
            losses.append(peak.sum(dim=1))
            positions.append(where)
        ctx.d, ctx.chunks, ctx.positions = d, chunks, positions
        ctx.save_for_backward(*weights)
        device = weights[0].device if weights else torch.device("cpu")
        return _scatter_layers(losses, chunks, len(weights), device)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weights, d = ctx.saved_tensors, ctx.d
        grads: list[torch.Tensor | None] = [None] * (len(weights) + 1)
        for idx, where in zip(ctx.chunks, ctx.positions, strict=True):
            ws = [weights[i] for i in idx]
            n_layers = len(idx)
            layer = torch.arange(n_layers, device=where.device)[:, None].expand(-1, d)
            coord = torch.arange(d, device=where.device)[None, :].expand(n_layers, -1)
            positions = torch.stack([layer.reshape(-1), coord.reshape(-1), where.reshape(-1)], dim=1)
            index = _weight_index(positions, ws[0].shape, d)
            g = grad_out[torch.tensor(idx, device=grad_out.device)].to(where.device)
            for j, (i, w) in enumerate(zip(idx, ws, strict=True)):
                if not ctx.needs_input_grad[i + 1]:
                    continue
                sl = index[:, j * d : (j + 1) * d]
                values = (w[tuple(sl)].sign() * g[j]).to(w.dtype)
                grads[i + 1] = torch.sparse_coo_tensor(sl, values, w.shape, check_invariants=False)
        return tuple(grads)


class _MarginLosses(torch.autograd.Function):
    """Per-layer `Σ_c |M_c| + Σ_i max(|w_ic| - |M_c|, 0)`, with `M_c = |m_c| σ_c` when scale-free (else `σ_c = 1`).

    Gradients: `sign(w)` on the weights outside the margin (zero inside), `sign(m_c) σ_c (1 - #outside_c)` for the
    margin parameter (`σ`, the detached std of the coordinate, is a constant of the step). The forward, which has
    `max(|w| - M, 0)` at hand, keeps the weight gradient's direction as `int8` (a quarter of a float32 gradient); the
    backward only scales it, instead of stacking and comparing the weights again.
    """

    @staticmethod
    def forward(
        ctx, d: int, with_grad: bool, scale_free: bool, margins: torch.Tensor, *weights: torch.Tensor
    ) -> torch.Tensor:
        chunks = _chunks(weights)
        losses, outside, directions, units = [], [], [], []
        for idx in chunks:
            chunk = _stack([weights[i] for i in idx], d)
            unit = _unit(chunk, scale_free)
            m = margins.detach()[idx].to(device=chunk.device, dtype=torch.float32).abs() * unit
            excess = chunk.abs().sub_(m[:, :, None]).clamp_min_(0)
            losses.append(m.sum(dim=1) + excess.sum(dim=(1, 2)))
            units.append(unit)
            # sign(excess) is 1 outside the margin, 0 inside: its sum counts the outliers (cheaper than count_nonzero),
            # and copysign turns it into the hinge's derivative sign(w) [|w| > M].
            outside.append(excess.sign_().sum(dim=2))
            needed = with_grad and any(ctx.needs_input_grad[i + 4] for i in idx)
            directions.append(excess.copysign_(chunk).to(torch.int8) if needed else None)
        ctx.d, ctx.chunks, ctx.directions = d, chunks, directions
        ctx.outside = _scatter_layers(outside, chunks, len(weights), margins.device)
        ctx.units = _scatter_layers(units, chunks, len(weights), margins.device)
        ctx.save_for_backward(margins, *weights)
        return _scatter_layers(losses, chunks, len(weights), margins.device)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        margins, *weights = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None, None, None, None] + [None] * len(weights)
        if ctx.needs_input_grad[3]:
            slope = margins.sign() * ctx.units * (1 - ctx.outside.float())
            grads[3] = (grad_out[:, None] * slope).to(margins.dtype)
        for idx, direction in zip(ctx.chunks, ctx.directions, strict=True):
            if direction is None:
                continue
            g = grad_out[torch.tensor(idx, device=grad_out.device)].to(direction.device)
            hinge = direction * g[:, None, None]  # int8 x float32 -> float32
            for i, grad in zip(idx, _unstack(hinge, [weights[i] for i in idx], ctx.d), strict=True):
                grads[i + 4] = grad if ctx.needs_input_grad[i + 4] else None
        return tuple(grads)


# soft_min_max: `exp(αw)` itself, without softmax's shift by the maximum and its normalization pass, and
# `exp(-αw) = 1 / exp(αw)` (a reciprocal instead of a second exponential), as long as both sums stay below
# `_UNSHIFTED_MAX_SUM` (every `|αw| < ~41`: the usual case, α starts at 0.1). Within that bound no exponential
# underflows or overflows, the ratio of the two sums stays below 1e36, and neither needs a shift. Beyond it (large α
# late in training) the chunk falls back to the two shifted softmaxes.
_UNSHIFTED_MAX_SUM = 1e18
# `exp(x) = exp2(x log2 e)`: torch's exp2 is several times faster than its exp on CPU (vectorized; measured 0.20 ms
# against 0.71 ms per 1M float32, timed side by side), with the same float32 accuracy.
_LOG2_E = 1.0 / math.log(2.0)


class _SoftMinMaxLosses(torch.autograd.Function):
    """Per-layer `Σ_c s_max,c - s_min,c + e^(-α_c)` with `s_max = Σ w softmax(α w)`, `s_min = Σ w softmax(-α w)`.

    Scale-free (`scale_free=True`): `α` stands for the temperature `α / σ_c` in everything below, the penalty is
    `σ_c e^(-α_c)`, and `∂/∂α` is divided by `σ_c` (`σ_c`, the detached std of the coordinate, is a step constant).

    With `p = softmax(α w) = e / Z`, `q = softmax(-α w) = r / R`: `ds_max/dw_i = p_i (1 + α (w_i - s_max))`,
    `ds_min/dw_i = q_i (1 - α (w_i - s_min))`, `ds_max/dα = Σ p_i w_i² - s_max²`, `ds_min/dα = -(Σ q_i w_i² - s_min²)`.

    `e = exp(αw)`, `r = 1 / e` unshifted while `Z, R <= _UNSHIFTED_MAX_SUM`, else `e = softmax(αw)`,
    `r = softmax(-αw)` (which subtract their maximum: no overflow for any α). The moments `Σ e w, Σ e w², Σ r w,
    Σ r w²` are one batched matrix product of the rows `(e, r)` by the rows `(w, w²)`.

    The loss of a layer depends on nothing but its weight and α, so the forward, which has `e` and `r` at hand, also
    computes `Z ∂loss/∂w` (one float32 tensor per chunk: together the size of the gradient itself); the backward only
    scales it by the incoming gradient over `Z`, instead of recomputing the exponentials.
    """

    @staticmethod
    def forward(
        ctx, d: int, with_grad: bool, scale_free: bool, alphas: torch.Tensor, *weights: torch.Tensor
    ) -> torch.Tensor:
        chunks = _chunks(weights)
        losses, stats, grads, scales = [], [], [], []
        for idx in chunks:
            basis = _stack_with_squares([weights[i] for i in idx], d)  # (2, layers, d, K): w, w²
            chunk = basis[0]
            n, k = chunk.shape[0] * d, chunk.shape[2]
            unit = _unit(chunk, scale_free)
            penalty = unit * torch.exp(-alphas.detach()[idx].to(device=chunk.device, dtype=torch.float32))
            a = alphas.detach()[idx].to(device=chunk.device, dtype=torch.float32) / unit  # the temperature
            aw = chunk * a[:, :, None]
            exps = torch.empty_like(basis)  # (2, layers, d, K): e, r
            e, r = exps.unbind(0)
            torch.exp2(torch.mul(chunk, (a * _LOG2_E)[:, :, None], out=e), out=e)
            torch.reciprocal(e, out=r)
            sums = exps.sum(dim=3).permute(1, 2, 0)  # (layers, d, 2): Z, R
            if not bool(sums.max() <= _UNSHIFTED_MAX_SUM):  # some |αw| too large (or NaN): shifted softmaxes
                e.copy_(torch.softmax(aw, dim=2))
                r.copy_(torch.softmax(-aw, dim=2))
                sums = exps.sum(dim=3).permute(1, 2, 0)
            # One batched product (e, r) × (w, w²)ᵀ for the four moments; both operands are BLAS-strided views.
            moments = torch.bmm(exps.view(2, n, k).transpose(0, 1), basis.view(2, n, k).permute(1, 2, 0))
            moments = moments.view(-1, d, 2, 2) / sums[:, :, :, None]  # [[s_max, Σ p w²], [s_min, Σ q w²]]
            s_max, m2_max, s_min, m2_min = moments.flatten(2).unbind(2)
            losses.append((s_max - s_min + penalty).sum(dim=1))
            stats.append(torch.stack([s_max, s_min, m2_max, m2_min, unit], dim=1))
            if with_grad and any(ctx.needs_input_grad[i + 4] for i in idx):
                # Z (p (1 + α (w - s_max)) - q (1 - α (w - s_min))) with p = e / Z, q = r / R, ρ = Z / R:
                # αw (e + ρ r) + (1 - α s_max) e - ρ (1 + α s_min) r.
                z, rho = sums[:, :, 0], sums[:, :, 0] / sums[:, :, 1]
                grad = torch.addcmul(e, r, rho[:, :, None]).mul_(aw)
                grad.addcmul_(e, (1 - a * s_max)[:, :, None])
                grads.append(grad.addcmul_(r, (-rho * (1 + a * s_min))[:, :, None]))
                scales.append(z.reciprocal()[:, :, None])
            else:
                grads.append(None)
                scales.append(None)
        ctx.d, ctx.chunks, ctx.grads, ctx.scales = d, chunks, grads, scales
        ctx.stats = _scatter_layers(stats, chunks, len(weights), alphas.device)  # (n_layers, 5, d)
        ctx.save_for_backward(alphas, *weights)
        return _scatter_layers(losses, chunks, len(weights), alphas.device)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        alphas, *weights = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None, None, None, None] + [None] * len(weights)
        if ctx.needs_input_grad[3]:
            s_max, s_min, m2_max, m2_min, unit = ctx.stats.unbind(1)
            d_alpha = ((m2_max - s_max**2) + (m2_min - s_min**2)) / unit - unit * torch.exp(-alphas.float())
            grads[3] = (grad_out[:, None] * d_alpha).to(alphas.dtype)
        for idx, local, scale in zip(ctx.chunks, ctx.grads, ctx.scales, strict=True):
            if local is None:
                continue
            ws = [weights[i] for i in idx]
            g = grad_out[torch.tensor(idx, device=grad_out.device)].to(local.device)[:, None, None] * scale
            # Not in place: a second backward through a retained graph must see the same cached gradient.
            for i, grad in zip(idx, _unstack(local * g, ws, ctx.d), strict=True):
                grads[i + 4] = grad if ctx.needs_input_grad[i + 4] else None
        return tuple(grads)


# ---------------------------------------------------------------------------------------------------------------------
# The paper's three regularizers, each one registered spec: its pure function (`hf_r2.regularizers`), its fused kernel
# above, and its learnable parameter. A new regularizer registers itself the same way (docs/adding-a-method.md).
# ---------------------------------------------------------------------------------------------------------------------


def _init_margins(weights: list[torch.Tensor], config: R2Config) -> torch.Tensor:
    if config.scale_free:  # in units of each coordinate's std: the init is the multiple itself
        init = torch.full((len(weights), config.cluster_dim), float(config.margin_init_std))
        return init.to(weights[0].device) if weights else init
    return torch.stack([R.init_margin(w, config.cluster_dim, config.margin_init_std) for w in weights])


def _init_alphas(weights: list[torch.Tensor], config: R2Config) -> torch.Tensor:
    return torch.stack([R.init_alpha(w, config.cluster_dim, config.alpha_init) for w in weights])


def _alpha_floor(config: R2Config) -> float | None:
    # The loss's own pull on α is towards softness (see `RangeRegularizer.step_parameters`): scale-free α only grows.
    return config.alpha_init if config.scale_free else None


register_regularizer(
    RegularizerSpec(
        name="linf",
        loss=R.linf,
        description="max |w|, eq. 1",
        fused=lambda weights, param, config: _LinfLosses.apply(config.cluster_dim, *weights),
        sparse_gradient=True,
    )
)
register_regularizer(
    RegularizerSpec(
        name="margin",
        loss=R.margin,
        description="learnable margin per layer, eq. 2",
        fused=lambda weights, param, config: _MarginLosses.apply(
            config.cluster_dim, torch.is_grad_enabled(), config.scale_free, param, *weights
        ),
        parameter=LearnableParameter(name="margins", init=_init_margins, std_exponent=1),
        sparse_gradient=True,
        options=("margin_init_std", "scale_free"),
        pulls_bulk=True,
    )
)
register_regularizer(
    RegularizerSpec(
        name="soft_min_max",
        loss=R.soft_min_max,
        description="learnable temperature per layer, eq. 3",
        fused=lambda weights, param, config: _SoftMinMaxLosses.apply(
            config.cluster_dim, torch.is_grad_enabled(), config.scale_free, param, *weights
        ),
        parameter=LearnableParameter(name="alphas", init=_init_alphas, std_exponent=-1, floor=_alpha_floor),
        options=("alpha_init", "scale_free"),
        pulls_bulk=True,
    )
)


def _looped_losses(spec: RegularizerSpec, weights: list[torch.Tensor], param, config: R2Config) -> torch.Tensor:
    """The per-layer losses through the spec's pure function, one layer at a time (for a spec without a kernel)."""
    d = config.cluster_dim
    if not weights:
        return torch.zeros(0)
    losses = []
    for i, weight in enumerate(weights):
        if param is None:
            losses.append(spec.loss(weight, cluster_dim=d))
        else:
            scale = R.coordinate_std(weight, d) if config.scale_free else None
            losses.append(spec.loss(weight, param[i], cluster_dim=d, scale=scale))
    device = param.device if param is not None else weights[0].device
    return torch.stack([loss.to(device=device, dtype=torch.float32).reshape(()) for loss in losses])


def _densify_grad(param: torch.Tensor) -> None:
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


def _trainable_and_untied(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Drops layers whose weight cannot move (frozen) and second users of a tied weight, saying so.

    A frozen weight's range term is a constant that only shifts the logged loss; a tied weight (GPT-2's `lm_head` and
    `transformer.wte`) is one tensor and is counted once, under its first module name.

    Raises:
        ValueError: If every selected layer is frozen.
    """
    kept: dict[str, nn.Module] = {}
    owner: dict[int, str] = {}
    frozen: list[str] = []
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is None:
            raise ValueError(
                f"{name!r} is an nn.MultiheadAttention with kdim/vdim != embed_dim: its separate q/k/v projection "
                f"weights are not regularized. Exclude it alone with the regex exclude_modules={name!r} (a name in a "
                "list would exclude its out_proj too)."
            )
        param = _parameter(module)
        if not param.requires_grad:
            frozen.append(name)
        elif id(param) in owner:
            logger.info(
                "R²: %s shares its weight with %s (tied); regularized once, as %s.",
                name,
                owner[id(param)],
                owner[id(param)],
            )
        else:
            owner[id(param)] = name
            kept[name] = module
    if frozen:
        shown = ", ".join(frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
        logger.warning("R²: %d frozen layer(s) skipped (requires_grad=False): %s.", len(frozen), shown)
    if not kept:
        raise ValueError(
            f"R² range regularization has nothing to train: all {len(frozen)} selected layers are frozen "
            "(requires_grad=False). Unfreeze them or set r2_type='none'."
        )
    return kept


class RangeRegularizer(nn.Module):
    """Computes `Σ_layers R(W_layer)` for one registered R² regularizer over the targeted layers of a model.

    The model is not registered as a submodule: the regularizer keeps references to the targeted modules and reads
    `module.weight` at every call, so it follows `model.to(...)` and DDP wrapping (which keeps the modules).

    Args:
        model (`nn.Module`): The model whose weights are regularized.
        config (`R2Config`): Which regularizer and which layers.

    Example:
        ```python
        reg = RangeRegularizer(model, R2Config(r2_type="margin"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # any optimizer, the model's only
        loss = task_loss + 0.01 * reg()
        loss.backward()
        optimizer.step()
        reg.step_parameters()  # the margins' / temperatures' own Adam
        optimizer.zero_grad()
        reg.zero_grad()
        ```
    """

    def __init__(self, model: nn.Module, config: R2Config) -> None:
        super().__init__()
        self.config = config
        self.spec: RegularizerSpec = get_regularizer(config.r2_type)
        modules = select_modules(
            model,
            SUPPORTED_LAYER_TYPES,
            config.target_modules,
            config.exclude_modules,
            what="R² range regularization",
        )
        modules = _trainable_and_untied(modules)
        self.layer_names: list[str] = list(modules)
        # A plain list: nn.Module.__setattr__ would register a ModuleList and put the model into our state dict.
        self._layers: list[nn.Module] = list(modules.values())
        flattened = [name for name, layer in modules.items() if is_flat_shard(_parameter(layer))]
        if flattened:
            raise ValueError(
                f"{flattened[0]!r} (and {len(flattened) - 1} more) hold flattened FSDP1 pieces: build the "
                "RangeRegularizer before wrapping the model in FullyShardedDataParallel (it records each weight's "
                "shape to gather the pieces; R2Trainer does)."
            )
        # Whole shapes, to put FSDP1 (`use_orig_params=True`) pieces back together (see `hf_r2.sharding`).
        self._param_shapes: list[tuple[int, ...]] = [tuple(_parameter(layer).shape) for layer in self._layers]
        weights = self.weights()
        for name, w in zip(self.layer_names, weights, strict=True):
            check_cluster_dim(config.cluster_dim, w.shape, name=f"{name}.weight")

        # linf / margin backpropagate sparse gradients, which autograd adds into the dense task gradient in place. A
        # weight that gets no task gradient in a step (an unused layer, a separate `reg().backward()`) would be left
        # with a sparse `.grad` that optimizers reject: densify it right after accumulation.
        self._hook_handles = []
        if self.spec.sparse_gradient:
            for layer in self._layers:
                if not (isinstance(layer, nn.Embedding) and layer.sparse):
                    self._hook_handles.append(_parameter(layer).register_post_accumulate_grad_hook(_densify_grad))

        if self.spec.parameter is not None:
            init = self.spec.parameter.init(weights, config)
            expected = (len(weights), config.cluster_dim)
            if tuple(init.shape) != expected:
                raise ValueError(
                    f"The init of r2_type={config.r2_type!r}'s parameter {self.spec.parameter.name!r} returned shape "
                    f"{tuple(init.shape)}, expected {expected} (n_layers, cluster_dim)."
                )
            setattr(self, self.spec.parameter.name, nn.Parameter(init.detach().float()))
        param = self._own_parameter()
        if param is not None:  # the state of the parameter's own Adam (see the module docstring)
            self.register_buffer(f"{self._own_name()}_exp_avg", torch.zeros_like(param.detach()))
            self.register_buffer(f"{self._own_name()}_exp_avg_sq", torch.zeros_like(param.detach()))
            self.register_buffer("param_steps", torch.zeros((), dtype=torch.int64, device=param.device))

    def _own_name(self) -> str | None:
        return None if self.spec.parameter is None else self.spec.parameter.name

    def _own_parameter(self) -> nn.Parameter | None:
        name = self._own_name()
        return None if name is None else getattr(self, name)

    def units(self) -> torch.Tensor:
        """`(n_layers, cluster_dim)` float32: the detached std of every coordinate of every layer (the scale-free
        unit, as `hf_r2.regularizers.coordinate_std`)."""
        d = self.config.cluster_dim
        return torch.stack([R.coordinate_std(w, d) for w in self.weights()])

    @torch.no_grad()
    def step_parameters(self, lr: float | None = None) -> None:
        """One Adam step of the margins / temperatures on their accumulated `.grad` (then left for you to clear).

        Call it after each backward, next to the model's optimizer step (`R2Trainer` does). Adam moves each parameter
        by about `lr` per step whatever its gradient's size, so neither the layer size (the margin's gradient counts
        the weights outside it) nor the model's optimizer and learning rate set the pace. Scale-free, that is `lr` std
        for a margin and `lr` for α; with `scale_free=False` the step is converted to the same pace (`× std` for a
        margin, `÷ std` for α). Scale-free α is kept at or above `alpha_init`: the loss's own pull on α is towards
        softness (`∂/∂α = (Var_p w + Var_q w)/σ - σ e^(-α)` is positive on a Gaussian bulk), which would turn the
        range penalty into a variance penalty; α only grows, when outliers make the top of the distribution sparse.

        Args:
            lr (`float`, *optional*): Learning rate; defaults to `config.learning_rate`.
        """
        param = self._own_parameter()
        if param is None or param.grad is None:
            return
        lr = self.config.learning_rate if lr is None else float(lr)
        name = self._own_name()
        exp_avg, exp_avg_sq = getattr(self, f"{name}_exp_avg"), getattr(self, f"{name}_exp_avg_sq")
        grad = param.grad.detach().to(exp_avg.dtype)
        self.param_steps += 1
        steps = int(self.param_steps)
        beta1, beta2 = _ADAM_BETAS
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = (exp_avg / (1 - beta1**steps)) / ((exp_avg_sq / (1 - beta2**steps)).sqrt_().add_(_ADAM_EPS))
        exponent = self.spec.parameter.std_exponent
        if not self.config.scale_free and exponent:
            update = update * self.units().to(update.device) ** exponent
        param.sub_(lr * update.to(param.dtype))
        floor = None if self.spec.parameter.floor is None else self.spec.parameter.floor(self.config)
        if floor is not None:
            param.clamp_(min=floor)

    def decoupled_step(self, rate: float) -> torch.Tensor:
        """Moves the weights against the range loss's gradient, outside of any optimizer (like AdamW's weight decay).

        Under Adam every weight moves by about the learning rate per step whatever its gradient, so a loss term cannot
        pull a pretrained outlier of 8 in within a short fine-tune at lr 1e-4. This step can: for each layer, the
        weight with the largest regularizer gradient moves by `rate × (max(W) - min(W))`, the others in proportion to
        their gradient (L∞: the extreme element; margin: every weight outside the margin, by the same amount;
        soft-min-max: the extremes, by their softmax share). The margins / temperatures get their gradient in
        `.grad` (added), for `step_parameters`.

        Args:
            rate (`float`): Fraction of each layer's range by which its most-pulled weight moves (>= 0).

        Returns:
            `torch.Tensor`: The per-layer range losses before the step, detached, shape `(n_layers,)`.
        """
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}.")
        weights = [_parameter(layer) for layer in self._layers]
        if any(isinstance(w, DTensor) or is_flat_shard(w) for w in weights):
            raise NotImplementedError(
                "decoupled_step does not support FSDP-sharded weights (the range of a shard is not the layer's); "
                "use r2_mode='loss' with FSDP."
            )
        trained = [w for w in weights if w.requires_grad]
        own = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():
            losses = self.layer_losses()
            total = losses.sum()
            if not torch.isfinite(total):
                self._raise_non_finite(losses)
            grads = torch.autograd.grad(total, trained + own, allow_unused=True)
        with torch.no_grad():
            for weight, grad in zip(trained, grads[: len(trained)], strict=True):
                if grad is None:
                    continue
                grad = grad.to_dense() if grad.is_sparse else grad
                peak = grad.abs().amax().float()
                span = (weight.amax() - weight.amin()).float()
                # peak == 0 (nothing outside a margin): grad is 0 too, and the step is 0 without a host sync.
                weight.sub_(grad * (rate * span / peak.clamp_min(torch.finfo(torch.float32).tiny)).to(weight.dtype))
            for param, grad in zip(own, grads[len(trained) :], strict=True):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad + grad
        return losses.detach()

    def weights(self) -> list[torch.Tensor]:
        """The targeted weights (output channels first), in `layer_names` order, whole even when sharded.

        A sharded weight is gathered differentiably (a collective: every rank calls this with the same model), so the
        range loss and its gradients are those of one process: FSDP2's DTensor with `full_tensor()`, FSDP1's flat
        pieces with one all-gather for all of them (`hf_r2.sharding`). The gathered or FSDP-viewed weights get a
        dense gradient (the L∞ / margin one is sparse, which neither path accepts).
        """
        params = [_parameter(layer) for layer in self._layers]
        pieces = [i for i, param in enumerate(params) if is_flat_shard(param)]
        wholes = gather_flat_shards([params[i] for i in pieces], [self._param_shapes[i] for i in pieces])
        weights = list(params)
        for i, whole in zip(pieces, wholes, strict=True):
            weights[i] = whole
        wholes_at = set(pieces)
        for i, weight in enumerate(weights):
            if isinstance(weight, DTensor):
                weights[i] = DenseGrad.apply(weight.full_tensor())
            elif i not in wholes_at and not isinstance(weight, nn.Parameter) and weight.grad_fn is not None:
                weights[i] = DenseGrad.apply(weight)  # e.g. FSDP1's whole view of its flat parameter in the forward
            if isinstance(self._layers[i], _TRANSPOSED_LAYER_TYPES):
                weights[i] = weights[i].t()
        return weights

    def layer_losses(self) -> torch.Tensor:
        """The differentiable per-layer losses, a `float32` tensor of shape `(n_layers,)`."""
        weights = self.weights()
        param = self._own_parameter()
        if self.spec.fused is not None:
            return self.spec.fused(weights, param, self.config)
        return _looped_losses(self.spec, weights, param, self.config)

    def forward(self) -> torch.Tensor:
        """Returns the total range loss, a differentiable scalar `float32` tensor.

        Raises:
            ValueError: If the loss is not finite, naming the first offending layer.
        """
        losses = self.layer_losses()
        total = losses.sum()
        if not torch.isfinite(total):
            self._raise_non_finite(losses)
        return total

    def _raise_non_finite(self, losses: torch.Tensor) -> None:
        values = losses.detach().cpu().tolist()
        bad = [(n, v) for n, v in zip(self.layer_names, values, strict=True) if not math.isfinite(v)]
        name, value = bad[0] if bad else ("<sum>", float("nan"))
        raise ValueError(
            f"R² {self.config.r2_type} range loss is not finite ({value}) for layer {name!r}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: its weight (or the regularizer's own "
            "parameter) holds NaN/inf."
        )

    def per_layer_losses(self) -> dict[str, float]:
        """The per-layer range losses as Python floats, by layer name (for debugging and tests)."""
        with torch.no_grad():
            values = self.layer_losses().cpu().tolist()
        return dict(zip(self.layer_names, values, strict=True))

    def remove_hooks(self) -> None:
        """Removes the gradient hooks this regularizer put on the model's weights (call when done with it)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"r2_type={config.r2_type!r}, cluster_dim={config.cluster_dim}, scale_free={config.scale_free}, "
            f"n_layers={len(self.layer_names)}"
        )

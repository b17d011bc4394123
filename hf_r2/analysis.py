"""Per-layer weight statistics: the weight range and standard deviation of the paper's Table 6.

`weight_ranges` measures, for every selected layer, `max(W) - min(W)`, `std(W)`, `min(W)` and `max(W)`;
`format_weight_range_table` renders one or two such measurements (with and without R²) side by side as a markdown or
plain-text table. The default selection is the range regularizer's: the weights of every `nn.Linear`, `nn.Conv1d`,
`nn.Conv2d`, `nn.Embedding`, transformers `Conv1D` (subclasses included, so palettization and quantization
wrappers count too) and the packed `in_proj_weight` of `nn.MultiheadAttention`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_r2.range_regularizer import SUPPORTED_LAYER_TYPES
from hf_r2.sharding import whole_weight
from hf_r2.utils import ModulePattern, select_modules

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LayerWeightStats",
    "measured_weight",
    "weight_stats",
    "weight_ranges",
    "max_weight_range",
    "format_weight_range_table",
]

#: The range regularizer's default layer types, so that the table shows exactly the regularized layers.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = SUPPORTED_LAYER_TYPES


@dataclass(frozen=True)
class LayerWeightStats:
    """Statistics of one layer's weight.

    Attributes:
        name (`str`): Module name in the model.
        range (`float`): `max(W) - min(W)`.
        std (`float`): Population standard deviation of the weight elements (`ddof=0`).
        min (`float`): Smallest weight element.
        max (`float`): Largest weight element.
        numel (`int`): Number of weight elements.
    """

    name: str
    range: float
    std: float
    min: float
    max: float
    numel: int


@torch.no_grad()
def _stats(name: str, weight: torch.Tensor) -> LayerWeightStats:
    # float64 so that the std of a large low-precision weight does not drift with summation order.
    w = weight.detach().to(torch.float64).reshape(-1)
    if w.numel() == 0:
        raise ValueError(f"Layer {name!r} has an empty weight; its range is undefined.")
    lo, hi = torch.aminmax(w)
    std = w.std(correction=0)
    return LayerWeightStats(
        name=name, range=(hi - lo).item(), std=std.item(), min=lo.item(), max=hi.item(), numel=w.numel()
    )


def measured_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight tensor whose range a layer is measured (and regularized) by: `in_proj_weight` for
    `nn.MultiheadAttention`, `weight` otherwise, gathered whole when FSDP2 or FSDP1 shards it (a collective then: call
    on every rank; an FSDP1 weight comes back flattened); `None` when the module has no such tensor."""
    weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return whole_weight(weight)


def weight_stats(modules: Mapping[str, nn.Module]) -> dict[str, LayerWeightStats]:
    """Computes `LayerWeightStats` for already selected modules.

    Args:
        modules (`Mapping[str, nn.Module]`): Module name -> module; every module must have a tensor `weight`.

    Returns:
        `dict[str, LayerWeightStats]`: In the order of `modules`.

    Raises:
        ValueError: If a module has no tensor `weight` or an empty one.
    """
    out: dict[str, LayerWeightStats] = {}
    for name, module in modules.items():
        weight = measured_weight(module)
        if weight is None:
            raise ValueError(f"Module {name!r} ({type(module).__name__}) has no weight tensor to measure.")
        out[name] = _stats(name, weight)
    return out


def weight_ranges(
    model: nn.Module,
    target_modules: ModulePattern = None,
    exclude_modules: ModulePattern = None,
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
) -> dict[str, LayerWeightStats]:
    """Per-layer weight range (`max - min`), std, min and max of a model (the paper's Table 6).

    Args:
        model (`nn.Module`): The model to measure.
        target_modules (`str` or `list[str]`, *optional*): Layers to measure, with the syntax of
            `hf_r2.utils.select_modules` (names with suffix match, or one regex). Defaults to every layer of
            `layer_types`.
        exclude_modules (`str` or `list[str]`, *optional*): Layers to skip, same syntax.
        layer_types (`tuple[type]`, *optional*): Layer types considered; defaults to the regularizer's
            (`hf_r2.range_regularizer.SUPPORTED_LAYER_TYPES`).

    Returns:
        `dict[str, LayerWeightStats]`: Module name -> statistics, in `named_modules` order.

    Example:
        >>> stats = weight_ranges(model)
        >>> print(format_weight_range_table(stats))
    """
    modules = select_modules(model, layer_types, target_modules, exclude_modules, what="weight_ranges")
    return weight_stats(modules)


@torch.no_grad()
def max_weight_range(modules: Mapping[str, nn.Module]) -> float:
    """Largest `max(W) - min(W)` over `modules` (cheap: no std), e.g. for logging during training."""
    ranges = [torch.aminmax(measured_weight(m).detach().reshape(-1)) for m in modules.values()]
    if not ranges:
        raise ValueError("max_weight_range needs at least one module.")
    return max((hi.double() - lo.double()).item() for lo, hi in ranges)


def _fmt(value: float, precision: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{precision}f}"


def format_weight_range_table(
    stats: Mapping[str, LayerWeightStats],
    baseline: Mapping[str, LayerWeightStats] | None = None,
    labels: Sequence[str] = ("w/ R²", "w/o R²"),
    style: str = "markdown",
    precision: int = 2,
) -> str:
    """Renders weight ranges and stds as a table; with `baseline`, side by side as in the paper's Table 6.

    Args:
        stats (`Mapping[str, LayerWeightStats]`): Output of `weight_ranges`, e.g. for the model trained with R².
        baseline (`Mapping[str, LayerWeightStats]`, *optional*): A second measurement of the same layers, e.g. the
            model trained without R². Must cover exactly the same layer names.
        labels (`Sequence[str]`, *optional*, defaults to `("w/ R²", "w/o R²")`): Column labels of `stats` and
            `baseline`.
        style (`str`, *optional*, defaults to `"markdown"`): `"markdown"` (a GitHub table) or `"plain"` (aligned
            columns).
        precision (`int`, *optional*, defaults to 2): Decimals printed (the paper uses 2).

    Returns:
        `str`: The table, one line per layer after the header, ending without a newline.

    Raises:
        ValueError: On an unknown `style`, fewer labels than measurements, a negative `precision`, an empty `stats`,
            or layer names that differ between `stats` and `baseline`.
    """
    if style not in ("markdown", "plain"):
        raise ValueError(f"style must be one of 'markdown', 'plain', got {style!r}.")
    if not isinstance(precision, int) or precision < 0:
        raise ValueError(f"precision must be a non-negative integer, got {precision!r}.")
    if not stats:
        raise ValueError("stats is empty: there is no layer to tabulate.")
    tables = [stats] if baseline is None else [stats, baseline]
    labels = list(labels)
    if len(labels) < len(tables):
        raise ValueError(f"labels needs {len(tables)} entries for {len(tables)} measurements, got {labels!r}.")
    if baseline is not None and list(stats) != list(baseline):
        only_a = [n for n in stats if n not in baseline]
        only_b = [n for n in baseline if n not in stats]
        raise ValueError(
            f"stats and baseline must cover the same layers in the same order; only in stats: {only_a}, "
            f"only in baseline: {only_b}."
        )

    if baseline is None:
        header = ["Layer", "Weight range", "Weight std"]
    else:
        header = ["Layer"]
        header += [f"Weight range ({lab})" for lab in labels[:2]] + [f"Weight std ({lab})" for lab in labels[:2]]
    rows = []
    for name in stats:
        ranges = [_fmt(t[name].range, precision) for t in tables]
        stds = [_fmt(t[name].std, precision) for t in tables]
        rows.append([name, *ranges, *stds])

    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(r) for r in rows])

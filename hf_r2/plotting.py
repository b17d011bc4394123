"""Per-layer weight histograms, as in the paper's Figure 2, for model cards and reports.

The figure has one panel per layer; when reference weights are given (e.g. the same layers without R², or before the
run), both distributions are overlaid on shared bins so the narrower range of the regularized weights is visible.
Rendering uses matplotlib's Agg backend (no display needed) and the file is written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from hf_r2.analysis import DEFAULT_LAYER_TYPES, measured_weight
from hf_r2.utils import atomic_path

#: The weight-range table's (and the regularizer's) layer types, so the figure picks among the measured layers.
HISTOGRAM_TYPES: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES


def pick_histogram_layers(model: nn.Module, max_layers: int = 4) -> list[str]:
    """Chooses up to `max_layers` layers spread over the depth: the first and the last always, then evenly spaced ones.

    The paper's Figure 2 shows the first convolution, two inner layers and the final linear layer of ResNet-18; this
    generalizes that choice to any model. Only the layers the weight-range table measures are candidates
    (`hf_r2.analysis.DEFAULT_LAYER_TYPES`: Linear, Conv1d/2d, Embedding, transformers Conv1D, and the hf_r2 wrappers
    that subclass them).

    Args:
        model (`nn.Module`): The model.
        max_layers (`int`, *optional*, defaults to 4): How many layers to pick at most (>= 1).

    Returns:
        `list[str]`: Module names, in model order.
    """
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers!r}.")
    names = [name for name, module in model.named_modules() if name and isinstance(module, HISTOGRAM_TYPES)]
    if len(names) <= max_layers:
        return names
    if max_layers == 1:
        return [names[0]]
    # Evenly spaced indices including both ends; rounding can repeat an index only when len(names) < max_layers.
    picks = sorted({round(i * (len(names) - 1) / (max_layers - 1)) for i in range(max_layers)})
    return [names[i] for i in picks]


def layer_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of the `weight` of each named module (for histograms taken before training)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or measured_weight(modules[n]) is None]
    if missing:
        raise ValueError(f"No weight tensor at module(s) {missing} of {type(model).__name__}.")
    return {n: measured_weight(modules[n]).detach().float().cpu().clone() for n in names}


def plot_weight_histograms(
    weights: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    label: str = "with R²",
    reference_label: str = "without R²",
    bins: int = 80,
    title: str | None = None,
) -> Path:
    """Draws one histogram panel per layer and writes the figure (PNG, or any format matplotlib infers from `path`).

    Args:
        weights (`Mapping[str, torch.Tensor]`): Layer name to weight tensor.
        path (`str` or `os.PathLike`): Output file; written atomically (temporary file, then rename).
        reference (`Mapping[str, torch.Tensor]`, *optional*): Weights to overlay, by the same layer names (layers
            missing from it are drawn alone).
        label (`str`, *optional*, defaults to `"with R²"`): Legend entry of `weights`.
        reference_label (`str`, *optional*, defaults to `"without R²"`): Legend entry of `reference`.
        bins (`int`, *optional*, defaults to 80): Histogram bins per panel, shared by both distributions.
        title (`str`, *optional*): Figure title.

    Returns:
        `Path`: The written file.
    """
    if not weights:
        raise ValueError("plot_weight_histograms needs at least one layer.")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}.")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # Figure without pyplot: no global state, safe in threads and tests

    n = len(weights)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, weight) in zip(axes.flat, weights.items(), strict=False):
        values = weight.detach().float().cpu().reshape(-1).numpy()
        ref = None if reference is None or name not in reference else reference[name]
        ref_values = None if ref is None else ref.detach().float().cpu().reshape(-1).numpy()
        lo, hi = float(values.min()), float(values.max())
        if ref_values is not None:
            lo, hi = min(lo, float(ref_values.min())), max(hi, float(ref_values.max()))
        if hi <= lo:  # a constant layer (e.g. all weights on one centroid) still gets a visible bar
            lo, hi = lo - 0.5, hi + 0.5
        if ref_values is not None:
            ax.hist(ref_values, bins=bins, range=(lo, hi), alpha=0.55, color="tab:gray", label=reference_label)
        ax.hist(values, bins=bins, range=(lo, hi), alpha=0.65, color="tab:blue", label=label)
        ax.set_title(name, fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.set_yscale("log")
        if ref_values is not None:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    return path

"""Result tables, seed statistics and report files for compression experiments (the paper's Tables 5 and 6).

Reusable by any script that compares table rows (e.g. one per R² type) over compression columns and seeds:
`mean_std` and `paired_difference` (the statistics), `accuracy_table` / `difference_table` / `range_table` (GitHub
markdown or aligned plain text), `write_histograms` (Figure 2), `machine_description` and `write_text_atomic`.
The QNLI miniature of the paper (`examples/paper_miniature/`) and the vision demo (`hf_r2.demo_vision`) use them.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_r2.utils import atomic_path

#: Labels of the table rows (keys: `--r2_type` names, plus baselines that are not R²).
ROW_LABELS = {
    "none": "none (w/o R²)",
    "clip": "clipping (w/o R²)",
    "linf": "R_Linf",
    "margin": "R_M (margin)",
    "soft_min_max": "R_SMM (soft-min-max)",
}

# Two-sided 95 % quantiles of Student's t distribution, t_{0.975}(df), df = 1..30 (beyond: the normal 1.96 would
# understate the interval by < 4 %, so the df = 30 value is used as a safe upper bound).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """Student's t quantile for a two-sided 95 % interval with `df` degrees of freedom (`df >= 1`)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}.")
    return _T975[min(df, len(_T975)) - 1]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value) of per-seed results."""
    if not values:
        raise ValueError("mean_std needs at least one value.")
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(treated: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Mean of the per-seed differences `treated - baseline` and the half-width of its 95 % t interval.

    Seeds pair the two rows (same head initialisation, data order and k-means seed), so the seed-to-seed variation they
    share cancels. With one pair the half-width is `inf` (no interval can be given).

    Returns:
        `(mean difference, half-width)`: the interval is `mean ± half-width`.
    """
    if len(treated) != len(baseline) or not treated:
        raise ValueError(
            f"paired_difference needs two non-empty lists of equal length, got {len(treated)} and {len(baseline)}."
        )
    diffs = [float(a) - float(b) for a, b in zip(treated, baseline, strict=True)]
    mean, std = mean_std(diffs)
    if len(diffs) == 1:
        return mean, math.inf
    return mean, t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))


def format_cell(values: Sequence[float] | None, scale: float = 100.0, precision: int = 1) -> str:
    """`"72.3 ± 1.2"` (mean ± std) for several seeds, `"72.3"` for one, `"–"` for a cell that was not run."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    text = f"{mean * scale:.{precision}f}"
    return f"{text} ± {std * scale:.{precision}f}" if len(values) > 1 else text


def format_difference(
    treated: Sequence[float] | None, baseline: Sequence[float] | None, scale: float = 100.0, precision: int = 1
) -> str:
    """`"+1.2 [-0.3, +2.7]"`: the paired mean difference with its 95 % interval; a `*` marks an interval that excludes
    0. `"–"` where either cell is missing or the seeds do not pair (fewer than 2 common seeds)."""
    if not treated or not baseline or len(treated) != len(baseline) or len(treated) < 2:
        return "–"
    mean, half = paired_difference(treated, baseline)
    low, high = (mean - half) * scale, (mean + half) * scale
    star = "*" if low > 0 or high < 0 else ""
    return f"{mean * scale:+.{precision}f} [{low:+.{precision}f}, {high:+.{precision}f}]{star}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], style: str = "markdown") -> str:
    """Renders a table as GitHub markdown or as aligned plain text."""
    if style not in ("markdown", "plain"):
        raise ValueError(f"style must be 'markdown' or 'plain', got {style!r}.")
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row needs one cell per header column.")
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def render(row):
        cells = [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([str(row[0]).ljust(widths[0]), *cells])

    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(r) for r in rows])


def accuracy_table(
    accuracy: Mapping[str, Mapping[str, Sequence[float]]],
    rows: Sequence[str],
    columns: Sequence[str],
    style: str = "markdown",
) -> str:
    """The Table 5-style accuracy table: one row per R² type, one column per compression, mean ± std over seeds."""
    body = [[ROW_LABELS.get(r, r)] + [format_cell(accuracy.get(r, {}).get(c)) for c in columns] for r in rows]
    return format_table(["R²", *columns], body, style)


def difference_table(
    accuracy: Mapping[str, Mapping[str, Sequence[float]]],
    rows: Sequence[str],
    columns: Sequence[str],
    baseline: str = "none",
    style: str = "markdown",
) -> str:
    """Per row other than `baseline`: the paired difference to `baseline` in each column, with its 95 % interval."""
    body = [
        [ROW_LABELS.get(r, r)]
        + [format_difference(accuracy.get(r, {}).get(c), accuracy.get(baseline, {}).get(c)) for c in columns]
        for r in rows
        if r != baseline
    ]
    return format_table([f"Δ vs {ROW_LABELS.get(baseline, baseline)}", *columns], body, style)


def range_table(
    stats: Mapping[str, Mapping[str, Any]], rows: Sequence[str], style: str = "markdown", precision: int = 2
) -> str:
    """The Table 6-style table: per layer, the weight range of every row, then the weight std of every row.

    Args:
        stats: `{row: {layer: LayerWeightStats or its dict}}` (`hf_r2.analysis.weight_ranges` of each model).
        rows: The rows to show, as columns here.
    """

    def get(stat, key):
        return stat[key] if isinstance(stat, Mapping) else getattr(stat, key)

    layers = list(stats[rows[0]])
    header = ["Layer"] + [f"range {r}" for r in rows] + [f"std {r}" for r in rows]
    body = []
    for layer in layers:
        ranges = [f"{get(stats[r][layer], 'range'):.{precision}f}" for r in rows]
        stds = [f"{get(stats[r][layer], 'std'):.{precision + 2}f}" for r in rows]
        body.append([layer, *ranges, *stds])
    mean_range = [f"{sum(get(s, 'range') for s in stats[r].values()) / len(stats[r]):.{precision}f}" for r in rows]
    mean_std_ = [f"{sum(get(s, 'std') for s in stats[r].values()) / len(stats[r]):.{precision + 2}f}" for r in rows]
    widest = [f"{max(get(s, 'range') for s in stats[r].values()):.{precision}f}" for r in rows]
    body.append(["(mean over layers)", *mean_range, *mean_std_])
    body.append(["(widest layer)", *widest, *[""] * len(rows)])
    return format_table(header, body, style)


def stats_to_json(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`{row: {layer: LayerWeightStats}}` as plain dicts (for `results.json`)."""
    return {
        row: {name: (dict(s) if isinstance(s, Mapping) else asdict(s)) for name, s in layers.items()}
        for row, layers in stats.items()
    }


def check_finite_accuracies(accuracy: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
    """Raises if any measured accuracy is not a finite number in [0, 1] (a broken stage must not look like data)."""
    for row, cols in accuracy.items():
        for col, values in cols.items():
            bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
            if bad:
                raise RuntimeError(f"Accuracy of row {row!r}, column {col!r} is not a number in [0, 1]: {bad}.")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def machine_description() -> str:
    """One line naming the CPU (and GPU), the core count and the library versions (for reports)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


@torch.no_grad()
def batch_accuracy(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], autocast_dtype=None) -> float:
    """Accuracy of a `...ForSequenceClassification` / `...ForImageClassification` over pre-collated `batches`.

    Args:
        model (`nn.Module`): The model; evaluated in eval mode, its mode restored afterwards.
        batches: Dicts of model inputs with a `labels` entry, on the model's device.
        autocast_dtype (`torch.dtype`, *optional*): Run under `torch.autocast` with this dtype (e.g. bfloat16).
    """
    was_training = model.training
    model.eval()
    correct = count = 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            labels = batch["labels"].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(**inputs).logits
            correct += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batch_accuracy got no examples.")
    return correct / count


def histogram_layers(stats: Mapping[str, Any], max_layers: int = 4) -> list[str]:
    """First layer, the widest-range layer of the baseline, a middle layer and the last layer (Figure 2's choice)."""

    def range_of(stat):
        return stat["range"] if isinstance(stat, Mapping) else stat.range

    names = list(stats)
    widest = max(names, key=lambda n: range_of(stats[n]))
    picks = {names[0], widest, names[len(names) // 2], names[-1]}
    return [n for n in names if n in picks][:max_layers]


def write_histograms(
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    output_dir: Path,
    prefix: str = "weight_histograms",
    baseline: str = "none",
) -> list[Path]:
    """One Figure 2-style file per row: its per-layer weight histograms over those of the `baseline` row.

    Args:
        weights: `{row: {layer: weight tensor}}` (`hf_r2.plotting.layer_weights` of each row's model).
    """
    from hf_r2.plotting import plot_weight_histograms

    reference = weights[baseline]
    paths = []
    for row, layers in weights.items():
        if row == baseline:
            continue
        paths.append(
            plot_weight_histograms(
                layers,
                Path(output_dir) / f"{prefix}_{row}.png",
                reference=reference,
                label=f"with {ROW_LABELS.get(row, row)}",
                reference_label=ROW_LABELS.get(baseline, baseline),
                title=f"Weight distributions after training: {ROW_LABELS.get(row, row)} vs. "
                f"{ROW_LABELS.get(baseline, baseline)}",
            )
        )
    return paths

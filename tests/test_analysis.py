"""Tests of `hf_r2.analysis`: per-layer weight statistics against a slow reference, and the Table-6 rendering."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_r2.analysis import LayerWeightStats, format_weight_range_table, max_weight_range, weight_ranges, weight_stats


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 6)
        self.conv1d = nn.Conv1d(6, 4, 3)
        self.conv2d = nn.Conv2d(3, 4, (2, 3))
        self.norm = nn.LayerNorm(4)  # not a regularized layer type
        self.block = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
        with torch.no_grad():
            self.block[2].weight[0, 0] = 30.0  # an outlier, larger than any N(0, 1) embedding entry


def slow_stats(weight: torch.Tensor) -> tuple[float, float, float, float]:
    """Reference: plain Python over the elements (min, max, range, population std)."""
    values = [float(v) for v in weight.detach().reshape(-1).tolist()]
    lo, hi = values[0], values[0]
    for v in values:
        lo, hi = min(lo, v), max(hi, v)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return lo, hi, hi - lo, std


def test_weight_ranges_match_slow_reference():
    model = Toy()
    stats = weight_ranges(model)
    assert list(stats) == ["embed", "conv1d", "conv2d", "block.0", "block.2"]  # named_modules order, no LayerNorm
    for name, row in stats.items():
        weight = model.get_submodule(name).weight
        lo, hi, rng, std = slow_stats(weight)
        assert (row.name, row.numel) == (name, weight.numel())
        assert row.min == pytest.approx(lo, abs=1e-7) and row.max == pytest.approx(hi, abs=1e-7)
        assert row.range == pytest.approx(rng, rel=1e-6)
        assert row.std == pytest.approx(std, rel=1e-6)
    assert stats["block.2"].max == pytest.approx(30.0)
    modules = {n: model.get_submodule(n) for n in stats}
    assert max_weight_range(modules) == pytest.approx(max(r.range for r in stats.values()), rel=1e-7)
    assert max_weight_range(modules) == pytest.approx(stats["block.2"].range, rel=1e-7)


def test_selection_and_low_precision():
    model = Toy()
    assert list(weight_ranges(model, target_modules=["block.0", "conv2d"])) == ["conv2d", "block.0"]
    assert list(weight_ranges(model, target_modules=r"block\..*")) == ["block.0", "block.2"]
    assert "embed" not in weight_ranges(model, exclude_modules=["embed"])
    with pytest.raises(ValueError, match="nope"):
        weight_ranges(model, target_modules=["nope"])

    half = weight_ranges(Toy().to(torch.bfloat16))
    for name, row in half.items():
        _, _, rng, std = slow_stats(model.get_submodule(name).weight.to(torch.bfloat16).float())
        assert row.range == pytest.approx(rng, rel=1e-6) and row.std == pytest.approx(std, rel=1e-5)


def test_weight_stats_rejects_modules_without_weight():
    with pytest.raises(ValueError, match="'act'.*ReLU"):
        weight_stats({"act": nn.ReLU()})


def row(name, rng, std):
    return LayerWeightStats(name=name, range=rng, std=std, min=-rng / 2, max=rng / 2, numel=10)


def test_table_side_by_side_markdown():
    with_r2 = {"conv1": row("conv1", 0.63, 0.11), "fc": row("fc", 0.604, 0.0749)}
    without = {"conv1": row("conv1", 1.86, 0.13), "fc": row("fc", 0.99, 0.07)}
    table = format_weight_range_table(with_r2, without)
    assert table.splitlines() == [
        "| Layer | Weight range (w/ R²) | Weight range (w/o R²) | Weight std (w/ R²) | Weight std (w/o R²) |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| conv1 | 0.63 | 1.86 | 0.11 | 0.13 |",
        "| fc | 0.60 | 0.99 | 0.07 | 0.07 |",
    ]


def test_table_single_plain_and_labels():
    stats = {"a.long.name": row("a.long.name", 1.23456, 0.5), "b": row("b", 10.0, 2.0)}
    table = format_weight_range_table(stats, style="plain", precision=3)
    assert table.splitlines() == [
        "Layer        Weight range  Weight std",
        "-----------  ------------  ----------",
        "a.long.name         1.235       0.500",
        "b                  10.000       2.000",
    ]
    two = format_weight_range_table(stats, stats, labels=("margin", "none"))
    assert "Weight range (margin)" in two and "Weight std (none)" in two


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"style": "html"}, "'html'"),
        ({"precision": -1}, "-1"),
        ({"baseline": {"other": row("other", 1.0, 1.0)}}, "only in stats: \\['x'\\]"),
        ({"baseline": {"x": row("x", 1, 1)}, "labels": ("one",)}, "labels needs 2"),
    ],
)
def test_table_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        format_weight_range_table({"x": row("x", 1.0, 0.1)}, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        format_weight_range_table({})

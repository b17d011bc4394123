"""The main job (`python -m hf_r2.demo`) and the vision demo, in their `--quick` modes, plus their pure helpers."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from hf_r2 import demo


def _check_outputs(out, payload, n_seeds):
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == list(demo.R2_ROWS)
    assert results["columns"][0] == "FP32" and len(results["columns"]) > 1
    for row in results["rows"]:
        for column in results["columns"]:
            values = results["accuracy"][row][column]
            assert values, f"no accuracy for {row} / {column}"
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (row, column, values)
        # The headline column ran every seed, so its noise is visible.
        assert len(results["accuracy"][row]["FP32"]) == n_seeds
        layers = results["weight_stats"][row]
        assert layers and all(math.isfinite(s["range"]) and s["range"] >= 0 for s in layers.values())
    assert results == json.loads(json.dumps(payload))  # what main returns is what it wrote

    report = (out / "report.md").read_text()
    label_lines = [ln for ln in report.splitlines() if ln.startswith("| " + demo.ROW_LABELS["none"])]
    assert len(label_lines) == 1
    for row in results["rows"]:
        line = next(ln for ln in report.splitlines() if ln.startswith("| " + demo.ROW_LABELS[row] + " |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == len(results["columns"])
        for cell in cells:  # "72.3 ± 1.2" or "72.3": a number in every cell
            assert math.isfinite(float(cell.split("±")[0]))
    for name in results["figures"]:
        path = out / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in report
    assert len(results["figures"]) == len(demo.R2_ROWS) - 1


@pytest.mark.slow
def test_text_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    payload = demo.main(["--quick", "--output_dir", str(out), "--seeds", "0", "1", "--threads", "1"])
    _check_outputs(out, payload, n_seeds=2)
    printed = capsys.readouterr().out
    assert "Table 5" in printed and "Table 6" in printed
    assert set(payload["columns"]) >= {"FP32", "DKM 1-bit", "DKM 2-bit"}
    assert any(c.startswith("PTQ W2") for c in payload["columns"])
    assert any(c.startswith("PTQ W4") for c in payload["columns"])


@pytest.mark.slow
def test_vision_demo_quick(tmp_path):
    from hf_r2 import demo_vision

    out = tmp_path / "vision"
    payload = demo_vision.main(["--quick", "--output_dir", str(out), "--seeds", "0", "--threads", "1"])
    _check_outputs(out, payload, n_seeds=1)
    assert set(payload["columns"]) >= {"PTQ W2", "PTQ W4", "LSQ W2A2", "DKM 1-bit", "DKM 2-bit", "DKM 4-bit"}


def test_mean_spread_matches_reference():
    values = [0.71, 0.735, 0.69]
    mean, spread = demo.mean_spread(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert spread == pytest.approx((max(values) - min(values)) / 2)
    assert demo.mean_spread([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        demo.mean_spread([])


def test_format_cell_and_accuracy_table():
    assert demo.format_cell([0.7, 0.74]) == "72.0 ± 2.0"
    assert demo.format_cell([0.7]) == "70.0"
    assert demo.format_cell(None) == "–"
    acc = {"none": {"FP32": [0.8, 0.82], "DKM 1-bit": [0.6]}, "linf": {"FP32": [0.81, 0.81]}}
    table = demo.accuracy_table(acc, ["none", "linf"], ["FP32", "DKM 1-bit"]).splitlines()
    assert table[0] == "| R² | FP32 | DKM 1-bit |"
    assert table[2] == f"| {demo.ROW_LABELS['none']} | 81.0 ± 1.0 | 60.0 |"
    assert table[3] == f"| {demo.ROW_LABELS['linf']} | 81.0 ± 0.0 | – |"
    plain = demo.accuracy_table(acc, ["none", "linf"], ["FP32", "DKM 1-bit"], style="plain").splitlines()
    assert len({len(line) for line in plain[:2]}) == 1  # header and rule aligned
    with pytest.raises(ValueError, match="style"):
        demo.format_table(["a"], [["1"]], style="html")


def test_check_finite_accuracies_rejects_broken_stage():
    demo.check_finite_accuracies({"none": {"FP32": [0.5, 1.0]}})
    with pytest.raises(RuntimeError, match="DKM 1-bit"):
        demo.check_finite_accuracies({"none": {"DKM 1-bit": [float("nan")]}})


def test_demo_arguments_validation():
    with pytest.raises(ValueError, match="r2_types"):
        demo.DemoArguments(r2_types=["none", "l2"])
    with pytest.raises(ValueError, match="'none'"):
        demo.DemoArguments(r2_types=["linf"])
    with pytest.raises(ValueError, match="dkm_bits"):
        demo.DemoArguments(dkm_bits=[0])
    with pytest.raises(ValueError, match="r2_weight_margin"):
        demo.DemoArguments(r2_weight_margin=float("nan"))
    with pytest.raises(ValueError, match="seeds"):
        demo.DemoArguments(seeds=[1, 1])
    with pytest.raises(ValueError, match="threads must be >= 1.*got 0"):
        demo.DemoArguments(threads=0)
    quick = demo.DemoArguments(quick=True)
    assert quick.train_samples == 48 and quick.max_steps > 0 and quick.dkm_steps <= 2
    assert demo.DemoArguments().r2_weight("none") == 0.0


def test_default_data_dir_is_the_vendored_copy():
    path = demo.default_data_dir()
    assert (path / "train.jsonl").is_file() and (path / "validation.jsonl").is_file()


def test_vision_demo_arguments_validation():
    from hf_r2.demo_vision import VisionDemoArguments

    with pytest.raises(ValueError, match="dataset must be one of"):
        VisionDemoArguments(dataset="cifar")
    with pytest.raises(ValueError, match="threads must be >= 1.*got -2"):
        VisionDemoArguments(threads=-2)

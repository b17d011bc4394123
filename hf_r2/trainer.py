"""`R2TrainingArguments` and `R2Trainer`: R² range regularization inside the Hugging Face `Trainer`.

Design (see `docs/trainer.md`):

* The `RangeRegularizer` is owned by the trainer, never registered on the model: the model's state dict stays the
  model's, so every `save_pretrained` / `save_model` / `push_to_hub` writes a checkpoint that `from_pretrained` loads
  with no unexpected keys, and DDP never sees the regularizer's parameters.
* Its learnable margins / temperatures are not in the model's optimizer: they get their own Adam
  (`RangeRegularizer.step_parameters`, after every optimizer step), so that neither the model's optimizer (SGD at
  lr 0.1-1 sent the margins above every weight in one step) nor its learning rate sets their pace. Their values and
  Adam state are written next to every checkpoint as `r2_regularizer.safetensors` and loaded on resume, which
  therefore continues exactly.
* `r2_mode="decoupled"` applies the range gradient outside the optimizer, after each of its steps (as AdamW decouples
  weight decay): under Adam a loss term moves every weight by about the learning rate per step, too little to pull a
  pretrained outlier in within a fine-tune.
* Under DDP every process adds the same range term (the weights are identical on every process), and DDP averages the
  gradients, so the term keeps its weight for any number of processes. Its gradient with respect to the
  regularizer's own parameters is computed identically on every process, so they stay in sync without communication.
* `model_accepts_loss_kwargs = False`: transformers 5.x otherwise treats the loss of heads that accept `**kwargs` but
  ignore `num_items_in_batch` (BERT, ViT, ...) as already normalized, skipping the division by the accumulation steps
  and multiplying by the number of processes; the task loss and the range term would then change weight with both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modelcard import TrainingSummary
from transformers.trainer import TRAINER_STATE_NAME  # written last into a checkpoint folder by the Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from hf_r2.analysis import max_weight_range
from hf_r2.range_regularizer import (
    DEFAULT_PARAMETER_LEARNING_RATE,
    R2_OPTION_NAMES,
    SUPPORTED_LAYER_TYPES,
    R2Config,
    RangeRegularizer,
    check_r2_options,
)
from hf_r2.regularizer_registry import get_regularizer, regularizer_names
from hf_r2.utils import (
    LiveChoices,
    atomic_path,
    check_module_regex,
    is_module_regex,
    public_source_name,
    select_modules,
)

__all__ = [
    "R2_MODES",
    "R2_TYPE_CHOICES",
    "R2_STATE_NAME",
    "R2TrainingArguments",
    "R2Trainer",
    "check_resume_checkpoint",
    "check_steps_trained",
    "evaluate_model",
    "checkpoint_global_step",
    "checkpoint_problem",
    "get_last_complete_checkpoint",
    "resolve_resume_checkpoint",
]

logger = logging.get_logger(__name__)

#: Allowed values of `--r2_type`: `"none"` trains without R² (a plain `Trainer` with the loss-scale fix), then every
#: registered regularizer (a live view of `hf_r2.regularizer_registry`: one registered later is accepted too).
R2_TYPE_CHOICES: Sequence[str] = LiveChoices(regularizer_names, "none")
#: Allowed values of `--r2_mode`.
R2_MODES: tuple[str, ...] = ("loss", "decoupled")
#: File holding the regularizer's parameters inside a checkpoint folder.
R2_STATE_NAME = "r2_regularizer.safetensors"
#: Tags of every card of an R²-trained model (the publish folder's card, `hf_r2.hub.TAGS`, has the same).
R2_CARD_TAGS = ("hf_r2", "range-regularization")

#: Model weight files one of which every complete checkpoint holds (as `Trainer._load_from_checkpoint` looks for).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why `checkpoint_dir` is not a complete `Trainer` checkpoint, or `None` if it is one.

    A complete checkpoint holds a `trainer_state.json` that parses (the Trainer writes it after every other file, so
    a save killed before it ends lacks it or holds a truncated one) and the model weights (sharded, adapter or FSDP
    layouts included). hf_r2 writes its own `r2_regularizer.safetensors` atomically before the Trainer's files, so it
    is present in every complete checkpoint of an R² run with learnable regularizer parameters.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return "it does not exist" if not folder.exists() else "it is not a folder"
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"it has no {TRAINER_STATE_NAME}, which the Trainer writes last: the save that wrote it was interrupted"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its {TRAINER_STATE_NAME} is truncated or unreadable: the save that wrote it was interrupted"
    has_weights = any((folder / name).is_file() for name in _WEIGHT_FILES) or any(
        entry.is_dir() or entry.name.startswith("pytorch_model_fsdp") for entry in folder.iterdir()
    )
    if not has_weights:
        return f"it holds no model weights ({', '.join(_WEIGHT_FILES[:2])}, ...)"
    return None


def checkpoint_global_step(checkpoint_dir: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint was saved at (`global_step` of its `trainer_state.json`)."""
    state = json.loads((Path(checkpoint_dir) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    return int(state.get("global_step", 0))


def get_last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-<step>` folder of `output_dir`, or `None`.

    Like `transformers.trainer_utils.get_last_checkpoint`, but a checkpoint a killed save left incomplete (see
    `checkpoint_problem`) is skipped with a warning naming it, instead of being chosen and failing the resume.
    """
    if not os.path.isdir(output_dir):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        (int(m.group(1)), entry.path)
        for entry in os.scandir(output_dir)
        if (m := pattern.match(entry.name)) and entry.is_dir()
    )
    for _, path in reversed(steps):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(
            f"Skipping the incomplete checkpoint {path}: {problem}. Resuming from an earlier one, if any; the "
            "incomplete folder is left as it is (delete it once you no longer need it)."
        )
    return None


def check_resume_checkpoint(checkpoint_dir: str | os.PathLike, r2_type: str) -> int:
    """Checks, before anything is loaded, that a run with `r2_type` can resume from `checkpoint_dir`.

    Returns:
        `int`: The step the checkpoint was saved at.

    Raises:
        ValueError: If the checkpoint is incomplete (naming the folder and what is missing), or if it holds the
            learnable parameters of another R² regularizer than `r2_type`'s (its optimizer state has a parameter
            group for them, so loading it would fail inside torch).
    """
    problem = checkpoint_problem(checkpoint_dir)
    if problem is not None:
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: {problem}. Resume from an earlier complete checkpoint "
            "(--resume_from_checkpoint <output_dir>/checkpoint-<step>), or let the example scripts pick the last "
            "complete one by not passing --resume_from_checkpoint."
        )
    path = Path(checkpoint_dir) / R2_STATE_NAME
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            saved_type = (f.metadata() or {}).get("r2_type")
        if saved_type != r2_type:
            raise ValueError(
                f"{checkpoint_dir} was trained with r2_type={saved_type!r}: it holds that regularizer's learnable "
                f"parameters ({R2_STATE_NAME}) and their optimizer state, so it cannot be resumed with "
                f"r2_type={r2_type!r}. Resume with --r2_type {saved_type}, or start a new run from its weights "
                f"(--model_name_or_path {checkpoint_dir} with a new --output_dir)."
            )
    return checkpoint_global_step(checkpoint_dir)


def resolve_resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint an example script resumes from, checked before the data and model are loaded.

    `--resume_from_checkpoint` when given; otherwise, as transformers' example scripts do, the last complete
    checkpoint in `--output_dir`, announced with a warning (visible at the default verbosity) that says how to start
    fresh instead. `None` without `--do_train` or without a checkpoint.

    Raises:
        ValueError: If the checkpoint cannot be resumed (`check_resume_checkpoint`), or if it already reached
            `--max_steps`: the run would train nothing and report the old model as its result.
    """
    if not args.do_train:
        return None
    checkpoint = args.resume_from_checkpoint
    found = checkpoint is None
    if found:
        checkpoint = get_last_complete_checkpoint(args.output_dir)
        if checkpoint is None:
            return None
    step = check_resume_checkpoint(checkpoint, getattr(args, "r2_type", "none"))
    if args.max_steps > 0 and step >= args.max_steps:
        raise ValueError(
            f"{checkpoint} was saved at step {step}, which already reaches --max_steps {args.max_steps}: resuming "
            "would train 0 steps and report the old model as this run's result. To start fresh, give a new "
            f"--output_dir{' (or delete the checkpoint-* folders in it)' if found else ''}; to continue training, "
            f"raise --max_steps above {step}."
        )
    if found:
        logger.warning(
            f"--output_dir {args.output_dir} holds {Path(checkpoint).name} (step {step}) of an earlier run: resuming "
            "from it, so only the steps after it are trained. To start fresh instead, give a new --output_dir (or "
            "delete the checkpoint-* folders in it; transformers 5 has no --overwrite_output_dir)."
        )
    return checkpoint


def check_steps_trained(trainer: Trainer, checkpoint: str | None) -> int:
    """After `trainer.train(resume_from_checkpoint=checkpoint)`: the steps this run trained, refusing 0.

    Raises:
        ValueError: If the run trained no step (the checkpoint had already reached the end of training): its model
            is the old one, which the example scripts would otherwise save and publish as this run's result.
    """
    start = checkpoint_global_step(checkpoint) if checkpoint else 0
    trained = trainer.state.global_step - start
    if trained <= 0:
        where = f": {checkpoint} (step {start}) had already reached the end of training" if checkpoint else ""
        raise ValueError(
            f"This run trained 0 steps{where} (--max_steps {trainer.args.max_steps}, --num_train_epochs "
            f"{trainer.args.num_train_epochs}). Nothing was saved or published. Give a new --output_dir to start "
            "fresh, or raise --max_steps / --num_train_epochs to continue."
        )
    return trained


def _normalize_module_pattern(value: Any, name: str) -> str | list[str] | None:
    """Turns a CLI value into the `select_modules` syntax: a list of names, or one regex string.

    `HfArgumentParser` always yields a list; a single entry containing regex syntax is taken as a regex.
    """
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise ValueError(f"{name} must not be an empty string.")
        return value
    value = list(value)
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be None, a regex string or a non-empty list of module names, got {value!r}.")
    if len(value) == 1 and is_module_regex(value[0]):
        return check_module_regex(value[0], name)
    return value


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: Module-name components that wrappers insert (FSDP1 units, activation checkpointing).
_WRAPPER_NAME_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _modules_by_unwrapped_name(model: nn.Module) -> dict[str, nn.Module]:
    """`model.named_modules()` under the names of the unwrapped model: FSDP1 wraps submodules in place, so a layer
    `a.b` becomes `_fsdp_wrapped_module.a._fsdp_wrapped_module.b`. A wrapper and the module it wraps get the same
    name; the wrapped one (listed after it) is kept."""
    modules = {}
    for name, module in model.named_modules():
        modules[".".join(part for part in name.split(".") if part not in _WRAPPER_NAME_PARTS)] = module
    return modules


class _RegularizerStep(TrainerCallback):
    """After every optimizer step: the decoupled range step (`r2_mode="decoupled"`), then one step of the
    regularizer's own Adam on its margins / temperatures, then their gradients are cleared.

    The Trainer clears gradients with `model.zero_grad()`, which does not reach parameters living outside the model;
    without the clearing, the margins' and temperatures' gradients would accumulate over the whole run (and a resumed
    run, starting from zero, would diverge from an uninterrupted one).
    """

    def __init__(self, trainer: R2Trainer) -> None:
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # Here rather than in __init__: another Trainer built in between (`evaluate_model`) resets the shared
        # gradient-accumulation settings.
        if self._trainer.r2_regularizer is not None and self._trainer._is_fsdp1():
            self._trainer._sync_every_micro_batch()

    def on_train_end(self, args, state, control, **kwargs):
        self._trainer._end_sync_every_micro_batch()

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer
        reg = trainer.r2_regularizer
        if reg is None:
            return
        if getattr(args, "r2_mode", "loss") == "decoupled":
            losses = reg.decoupled_step(trainer.r2_weight * trainer._schedule_factor())
            trainer._record_r2_loss(losses.sum())
        reg.step_parameters(getattr(args, "r2_learning_rate", None))
        reg.zero_grad(set_to_none=True)


#: CLI types of the `R2Config` options whose Python type `HfArgumentParser` cannot parse (`str | list[str] | None`):
#: on the command line a module pattern is one or more names, or one regex (see `_normalize_module_pattern`).
_CLI_OPTION_TYPES = {"target_modules": list[str] | None, "exclude_modules": list[str] | None}


def _with_r2_config_options(cls: type) -> type:
    """Declares one `r2_<name>` field per `R2Config` option (`R2_OPTION_NAMES`), with its default and help.

    `R2TrainingArguments` thereby holds an `R2Config`'s options under the flag names `--r2_<name>` without repeating
    them: an option added to `R2Config` becomes a flag. Applied before `@dataclass`, so the fields are ordinary
    dataclass fields that `HfArgumentParser` lists.
    """
    hints = typing.get_type_hints(R2Config)
    config_fields = {f.name: f for f in dataclasses.fields(R2Config)}
    annotations = cls.__dict__.get("__annotations__", {})
    for name in R2_OPTION_NAMES:
        option = config_fields[name]
        annotations[f"r2_{name}"] = _CLI_OPTION_TYPES.get(name, hints[name])
        setattr(cls, f"r2_{name}", field(default=option.default, metadata=dict(option.metadata)))
    cls.__annotations__ = annotations
    return cls


@dataclass
@_with_r2_config_options
class R2TrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the R² range-regularization options (all prefixed `r2_`).

    Parsed from the command line by `HfArgumentParser` like any other argument (`--r2_type soft_min_max
    --r2_weight 0.01`), and validated in `__post_init__` also when built in Python.

    The options of the regularizer are those of `R2Config`, each as `r2_<name>` (`--r2_cluster_dim`,
    `--r2_margin_init_std`, `--r2_alpha_init`, `--r2_scale_free`, `--r2_learning_rate`, `--r2_target_modules`,
    `--r2_exclude_modules`), declared from `R2Config` itself; `to_r2_config()` builds the `R2Config`.

    When R² is on and `ddp_find_unused_parameters` is not set, it defaults to `False`: with `True`, DDP marks the
    weights of layers unused in the forward pass as ready before the range term's backward reaches them, and the first
    backward of a multi-process run fails ("Expected to mark a variable ready only once"). With `False` every
    regularized weight is expected to get a gradient, which the range term guarantees.
    """

    r2_type: str = field(
        default="none",
        metadata={
            "help": "R² range regularizer added to the training loss, a registered name (hf_r2.regularizer_registry): "
            + ", ".join(f"'{name}' ({get_regularizer(name).description})" for name in regularizer_names())
            + ", or 'none' (plain training).",
            "choices": R2_TYPE_CHOICES,
        },
    )
    r2_mode: Literal["loss", "decoupled"] = field(
        default="loss",
        metadata={
            "help": "How the range regularizer acts. 'loss' (the paper): r2_weight x range loss is added to the "
            "training loss and goes through the optimizer. 'decoupled': after every optimizer step, each layer's "
            "weights move against the range loss's gradient by themselves, the most-pulled weight by r2_weight x the "
            "layer's range (max - min) x the learning-rate schedule's current factor (like AdamW's decoupled weight "
            "decay). Use 'decoupled' to remove a pretrained model's outliers in an Adam fine-tune: under Adam a loss "
            "term moves each weight by about the learning rate per step (75 steps at 1e-4 move an outlier of 8.5 by "
            "< 0.01). Recommended: --r2_mode decoupled --r2_type linf --r2_weight 0.05 (see docs/regularizers.md)."
        },
    )
    r2_weight: float = field(
        default=0.01,
        metadata={
            "help": "r2_mode='loss': weight of the range loss in the training loss (the paper uses 0.01), >= 0. "
            "r2_mode='decoupled': fraction of each layer's range by which its most-pulled weight moves per step "
            "(at the peak of the learning-rate schedule), in [0, 1]."
        },
    )

    def __post_init__(self) -> None:
        self._validate_r2()
        if self.r2_type != "none" and self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        elif self.r2_type != "none" and self.ddp_find_unused_parameters:
            logger.warning(
                "ddp_find_unused_parameters=True with R²: a multi-process run fails on its first backward if a "
                "regularized layer is not used in the forward pass; False is the safe setting."
            )
        super().__post_init__()

    def _validate_r2(self) -> None:
        if self.r2_type not in R2_TYPE_CHOICES:
            raise ValueError(f"Unknown r2_type {self.r2_type!r}; allowed: {list(R2_TYPE_CHOICES)}.")
        if self.r2_mode not in R2_MODES:
            raise ValueError(f"Unknown r2_mode {self.r2_mode!r}; allowed: {list(R2_MODES)}.")
        if not _is_finite_number(self.r2_weight) or self.r2_weight < 0:
            raise ValueError(f"r2_weight must be a finite number >= 0, got {self.r2_weight!r}.")
        if self.r2_mode == "decoupled" and self.r2_weight > 1:
            raise ValueError(
                f"With r2_mode='decoupled', r2_weight is the fraction of a layer's range its most-pulled weight moves "
                f"per step and must be in [0, 1], got {self.r2_weight!r} (recommended: 0.05)."
            )
        pulls_bulk = self.r2_type != "none" and get_regularizer(self.r2_type).pulls_bulk
        if self.r2_mode == "decoupled" and pulls_bulk and self.r2_weight > 0.005:
            logger.warning(
                f"r2_mode='decoupled' with r2_type={self.r2_type!r} and r2_weight={self.r2_weight}: this type pulls "
                "the tails of every layer's bulk, not only its outliers, at every step (measured on MiniLM with "
                "soft_min_max at 0.05: chance accuracy). To remove outliers use r2_type='linf' (see "
                "docs/regularizers.md)."
            )
        self.r2_target_modules = _normalize_module_pattern(self.r2_target_modules, "r2_target_modules")
        self.r2_exclude_modules = _normalize_module_pattern(self.r2_exclude_modules, "r2_exclude_modules")
        # The options' own checks are R2Config's (also with r2_type='none': a bad flag is an error either way).
        options = check_r2_options({name: getattr(self, f"r2_{name}") for name in R2_OPTION_NAMES}, prefix="r2_")
        for name, value in options.items():
            setattr(self, f"r2_{name}", value)

    def resolved_r2_learning_rate(self) -> float:
        """The learning rate of the regularizer's own Adam: `r2_learning_rate`, or the regularizer's default."""
        if self.r2_learning_rate is not None:
            return float(self.r2_learning_rate)
        if self.r2_type == "none":
            return DEFAULT_PARAMETER_LEARNING_RATE
        return get_regularizer(self.r2_type).default_learning_rate

    def to_r2_config(self) -> R2Config:
        """The `R2Config` these arguments describe (its options are the `r2_<name>` fields).

        Raises:
            ValueError: If `r2_type` is `"none"` (there is nothing to configure).
        """
        if self.r2_type == "none":
            raise ValueError(f"r2_type='none' has no R2Config; choose one of {regularizer_names()}.")
        options = {name: getattr(self, f"r2_{name}") for name in R2_OPTION_NAMES}
        return R2Config(r2_type=self.r2_type, **{**options, "learning_rate": self.resolved_r2_learning_rate()})


class R2Trainer(Trainer):
    """A `transformers.Trainer` that adds `r2_weight × range loss` to the training loss (`r2_mode="loss"`), or applies
    the range gradient after every optimizer step (`r2_mode="decoupled"`, see `R2TrainingArguments.r2_mode`).

    Logged at every logging step next to `loss` (which includes the weighted range term): `r2_loss` (the unweighted
    range loss, averaged over the micro-batches and processes since the last log), `task_loss` (`loss - r2_weight ×
    r2_loss`) and `max_weight_range` (the largest `max(W) - min(W)` over the regularized layers; over the default
    layers when `r2_type="none"`).

    Args:
        model: The model, as for `Trainer`.
        args (`R2TrainingArguments`, *optional*): Training arguments; a plain `TrainingArguments` trains without R².
        *trainer_args: Passed on to `Trainer`.
        r2_regularizer (`RangeRegularizer`, *optional*): A regularizer built on `model` by the caller; by default one
            is built from `args` when `args.r2_type != "none"`.
        **trainer_kwargs: Passed on to `Trainer` (`train_dataset`, `data_collator`, `callbacks`, ...).

    Example:
        ```python
        args = R2TrainingArguments(output_dir="out", r2_type="soft_min_max", r2_weight=0.01, learning_rate=2e-5)
        trainer = R2Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
        trainer.train()
        trainer.save_model()  # a plain model: from_pretrained loads it with no unexpected keys
        ```
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args,
        r2_regularizer: RangeRegularizer | None = None,
        **trainer_kwargs,
    ) -> None:
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # See the module docstring: makes the loss a per-micro-batch mean that `training_step` divides by the
        # accumulation steps, identical for any number of processes and accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._r2_given = r2_regularizer
        self.r2_regularizer: RangeRegularizer | None = None
        self._setup_r2()
        self.add_callback(_RegularizerStep(self))

    # ---- set-up ----

    @property
    def r2_weight(self) -> float:
        """The weight of the range loss in the training loss (`args.r2_weight`, 0.01 for plain `TrainingArguments`)."""
        return float(getattr(self.args, "r2_weight", 0.01))

    def _setup_r2(self) -> None:
        args_type = getattr(self.args, "r2_type", "none")
        reg = self._r2_given
        if reg is not None:
            if not isinstance(reg, RangeRegularizer):
                raise TypeError(f"r2_regularizer must be a RangeRegularizer, got {type(reg).__name__}.")
            if args_type not in ("none", reg.config.r2_type):
                raise ValueError(
                    f"args.r2_type={args_type!r} contradicts the given r2_regularizer of type "
                    f"{reg.config.r2_type!r}; set r2_type to {reg.config.r2_type!r} or 'none'."
                )
        elif args_type != "none" and self.model is not None:
            reg = RangeRegularizer(self.model, self.args.to_r2_config())
        problem = self._sharding_engine_problem()
        if reg is not None and problem is not None:
            raise ValueError(
                f"R² (r2_type={reg.config.r2_type!r}) is not supported under {problem}, so the range loss would be "
                "silently wrong. Use FSDP2 (fsdp_config={'version': 2}), FSDP1 with use_orig_params=True and "
                "FULL_SHARD / SHARD_GRAD_OP, DDP (`accelerate launch --multi_gpu` or torchrun), or r2_type='none'."
            )
        if reg is not None and self.is_fsdp_enabled and self._r2_decoupled():
            raise ValueError(
                "r2_mode='decoupled' is not supported under FSDP (its step moves the weights in place, and the range "
                "of a shard is not the layer's); use r2_mode='loss' (the default) with FSDP, or DDP."
            )
        self._warn_if_fsdp_requested_but_not_applied()
        if reg is not None:
            param = next(self.model.parameters(), None)
            if param is not None:
                reg.to(param.device)
        self.r2_regularizer = reg
        self._r2_sum = None
        self._r2_count = 0
        self._range_layer_names = self._select_range_layer_names()

    def _is_fsdp1(self) -> bool:
        return self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2

    def _sharding_engine_problem(self) -> str | None:
        """The engine configuration R² refuses (named, with the reason), if one is on.

        FSDP2 keeps each weight a DTensor, and FSDP1 with `use_orig_params=True` each weight a 1-D piece: the
        regularizer gathers both whole (`hf_r2.sharding`). FSDP1 without `use_orig_params` flattens the weights of
        several layers into one FlatParameter, hybrid sharding shards within a subgroup only, and DeepSpeed ZeRO-3
        partitions weights behind its own API (not implemented: no GPU to test it on).
        """
        if self.is_deepspeed_enabled:
            return "DeepSpeed: ZeRO partitions the weights behind its own API, which hf_r2 does not gather"
        if not self._is_fsdp1():
            return None
        plugin = self.accelerator.state.fsdp_plugin
        if not getattr(plugin, "use_orig_params", False):
            return (
                "FSDP1 with use_orig_params=False: its FlatParameters mix the weights of several layers (set "
                "fsdp_config={'use_orig_params': True})"
            )
        strategy = getattr(plugin, "sharding_strategy", None)
        strategy = getattr(strategy, "name", str(strategy))
        if "HYBRID" in strategy:
            return f"FSDP1 with sharding_strategy={strategy}: it shards weights within a subgroup of the processes"
        return None

    def _sync_every_micro_batch(self) -> None:
        """FSDP1: reduce-scatter after every micro-batch (Accelerate's `sync_each_batch`), also when accumulating.

        Under FSDP1's `no_sync` a weight's gradient is held whole while the weight is a 1-D piece, and R²'s gradient
        (which arrives on the piece) cannot be added to it. Synchronizing every micro-batch costs one reduce-scatter
        per micro-batch and keeps the sharded gradient memory; the sum is the same.
        """
        kwargs = self.accelerator.gradient_state.plugin_kwargs
        if self.args.gradient_accumulation_steps > 1 and not kwargs.get("sync_each_batch", False):
            logger.info("R² under FSDP1 with gradient accumulation: synchronizing gradients after every micro-batch.")
            kwargs["sync_each_batch"] = True
            self._restore_sync_each_batch = True  # the setting is shared by every Trainer of the process

    def _end_sync_every_micro_batch(self) -> None:
        if getattr(self, "_restore_sync_each_batch", False):
            self.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = False
            self._restore_sync_each_batch = False

    def _warn_if_fsdp_requested_but_not_applied(self) -> None:
        """Accelerate applies FSDP only on accelerators: on CPU it keeps DDP and drops the FSDP plugin silently."""
        requested = bool(getattr(self.args, "fsdp", None)) or (
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        )
        if requested and not self.is_fsdp_enabled:
            logger.warning(
                "FSDP was requested (--fsdp / ACCELERATE_USE_FSDP) but is NOT applied: Accelerate runs FSDP on "
                f"accelerators only and fell back to {self.accelerator.state.distributed_type.value} on this "
                f"{self.args.device.type} machine. Each process holds the whole model (R² is exact either way)."
            )

    def _select_range_layer_names(self) -> list[str]:
        if self.r2_regularizer is not None:
            return list(self.r2_regularizer.layer_names)
        if self.model is None:
            return []
        try:
            modules = select_modules(
                self.model,
                SUPPORTED_LAYER_TYPES,
                getattr(self.args, "r2_target_modules", None),
                getattr(self.args, "r2_exclude_modules", None),
                what="max_weight_range logging",
            )
        except ValueError:  # A model without any supported layer: nothing to log.
            return []
        return list(modules)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if not hasattr(self, "_r2_given"):  # called from Trainer.__init__: `_setup_r2` runs right after it
            return model
        if self._r2_given is not None:
            raise ValueError("A given r2_regularizer is tied to one model and cannot be used with model_init.")
        # The regularizer must read the weights of the fresh model, not of the one it was built on.
        self.model = model
        self._setup_r2()
        return model

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's decayed parameters minus the quantizers' own (LSQ/EWGS step sizes, PACT clipping levels).

        Like the regularizer's margins and temperatures, they are not weights: decay would pull a step size or a
        clipping level towards 0 (and PACT's alpha already has its own L2 penalty, `PACTConfig.alpha_l2`).
        """
        from hf_r2.quantization import quantizer_parameter_names

        names = super().get_decay_parameter_names(model)
        quantizer_params = set(quantizer_parameter_names(model))
        return [n for n in names if n not in quantizer_params]

    # ---- loss and logging ----

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors `Trainer.training_step`: when True, the Trainer does not divide the loss by the accumulation steps.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Task loss from `Trainer.compute_loss`, plus `r2_weight × range loss` when the model is training.

        In evaluation and prediction (`model.training` is False) the loss is the task loss alone.
        """
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.r2_regularizer is None or not model.training:
            return result
        if self._r2_decoupled():  # the range step happens after the optimizer step (`_RegularizerStep`)
            return result
        loss, outputs = result if return_outputs else (result, None)
        range_loss = self.r2_regularizer()
        self._record_r2_loss(range_loss)
        term = self.r2_weight * range_loss
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # The task loss is already normalized over the whole accumulated batch: give the range term the same
            # share per micro-batch so that it sums to r2_weight × range loss per optimizer step.
            term = term / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        loss = loss + term.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _r2_decoupled(self) -> bool:
        return getattr(self.args, "r2_mode", "loss") == "decoupled"

    def _record_r2_loss(self, range_loss: torch.Tensor) -> None:
        detached = range_loss.detach().float()
        self._r2_sum = detached if self._r2_sum is None else self._r2_sum + detached
        self._r2_count += 1

    def _schedule_factor(self) -> float:
        """The learning-rate schedule's current factor: the model's current learning rate over `args.learning_rate`."""
        base = float(self.args.learning_rate)
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is None or base <= 0:
            return 1.0
        return float(scheduler.get_last_lr()[0]) / base

    def _reduce_r2_stats(self) -> tuple[float, int]:
        device = self.args.device
        total = (
            self._r2_sum.to(device, torch.float64)
            if self._r2_sum is not None
            else torch.zeros((), device=device, dtype=torch.float64)
        )
        stats = torch.stack(
            [total.reshape(()), torch.tensor(float(self._r2_count), device=device, dtype=torch.float64)]
        )
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        self._r2_sum, self._r2_count = None, 0
        return stats[0].item(), int(stats[1].item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `r2_loss`, `task_loss` and `max_weight_range` to the training logs (those holding `loss`)."""
        if "loss" in logs:
            if self.r2_regularizer is not None:
                # Every process reaches this collective: the Trainer logs training losses on all of them.
                total, count = self._reduce_r2_stats()
                if count:
                    r2_loss = total / count
                    logs["r2_loss"] = r2_loss
                    in_loss = 0.0 if self._r2_decoupled() else self.r2_weight
                    logs["task_loss"] = logs["loss"] - in_loss * r2_loss
            if self._range_layer_names:
                modules = _modules_by_unwrapped_name(self.model)
                logs["max_weight_range"] = max_weight_range({n: modules[n] for n in self._range_layer_names})
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, refusing an incomplete or incompatible checkpoint before anything is loaded.

        `resume_from_checkpoint=True` resumes from the last *complete* checkpoint of `output_dir`
        (`get_last_complete_checkpoint`: one a killed save left incomplete is skipped with a warning); a given
        checkpoint is checked with `check_resume_checkpoint` (complete, same R² regularizer).
        """
        # Drop range losses accumulated by a previous, interrupted `train` call.
        self._r2_sum, self._r2_count = None, 0
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir}).")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is not None:
            r2_type = self.r2_regularizer.config.r2_type if self.r2_regularizer is not None else "none"
            check_resume_checkpoint(resume_from_checkpoint, r2_type)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- model card ----

    def create_model_card(
        self,
        tags: str | list[str] | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
        extra_sections: Sequence[str] = (),
        **kwargs,
    ) -> None:
        """`Trainer.create_model_card` (`README.md` in `output_dir`) that says how the model was regularized and never
        names a local path.

        Adds the tags `hf_r2`, `range-regularization` and `r2-<type>` and a section with the R² settings (the `r2_*`
        arguments are not part of the Trainer's hyperparameter list, so its card alone would not say how the model was
        regularized), then `extra_sections` (e.g. `hf_r2.hub.run_card_sections`: compression, metrics before and after
        it, weight ranges). The base model (`finetuned_from`, by default the model's `config._name_or_path`) and
        `dataset` are named through `hf_r2.utils.public_source_name`: a Hub id is kept and linked, a local checkpoint
        or data file is named by its folder (and file) name, and only a Hub id becomes the `base_model` metadata.

        Args:
            tags (`str` or `list[str]`, *optional*): More tags, as for `Trainer.create_model_card`.
            finetuned_from (`str`, *optional*): The starting checkpoint (Hub id or local path).
            dataset (`str` or `list[str]`, *optional*): The data (Hub ids or local paths).
            extra_sections (`Sequence[str]`, *optional*): Markdown blocks appended to the card.
            **kwargs: As for `Trainer.create_model_card` (`language`, `license`, `model_name`, `tasks`,
                `dataset_tags`, `dataset_args`).
        """
        r2_type = (
            getattr(self.args, "r2_type", "none") if self.r2_regularizer is None else self.r2_regularizer.config.r2_type
        )
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if r2_type != "none":
            tags += [t for t in (*R2_CARD_TAGS, f"r2-{r2_type}".replace("_", "-")) if t not in tags]
        if finetuned_from is None:
            finetuned_from = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        base_name, base_is_local = public_source_name(finetuned_from)
        if dataset is not None:
            dataset = [
                public_source_name(d, keep_parent=True)[0] for d in ([dataset] if isinstance(dataset, str) else dataset)
            ]
            dataset = dataset[0] if len(dataset) == 1 else dataset
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        is_peft_card = False
        if os.path.exists(path):  # keep the tags of an earlier card, as `Trainer.create_model_card` does
            earlier = ModelCard.load(path).data
            tags += [t for t in (earlier.tags or []) if t not in tags]
            is_peft_card = earlier.get("library_name") == "peft"
        # `TrainingSummary` directly rather than `Trainer.create_model_card`: the latter replaces a missing base model
        # with `config._name_or_path`, a local path or "" for a model built from its config (then linked as
        # "[](https://huggingface.co/)"). Only a Hub id may become the linked base model and `base_model` metadata;
        # "" also keeps `TrainingSummary` from asking the Hub for its license.
        summary = TrainingSummary.from_trainer(
            self,
            tags=tags or None,
            finetuned_from=base_name if base_name and not base_is_local else "",
            dataset=dataset,
            **kwargs,
        )
        if not summary.finetuned_from:
            summary.finetuned_from = None
        card = summary.to_model_card()
        if base_is_local:
            card = card.replace(
                "This model was trained from scratch on ",
                f"This model is a fine-tuned version of the local checkpoint `{base_name}` on ",
                1,
            )
        lines = []
        if r2_type != "none":
            lines = [
                "",
                "## R² range regularization",
                "",
                f"- r2_type: {r2_type}",
                f"- r2_mode: {getattr(self.args, 'r2_mode', 'loss')}",
                f"- r2_weight: {self.r2_weight}",
            ]
            config = self.r2_regularizer.config if self.r2_regularizer is not None else None
            if config is not None:
                lines += [
                    f"- r2_cluster_dim: {config.cluster_dim}",
                    f"- regularized layers: {len(self.r2_regularizer.layer_names)}",
                ]
            last = next((e for e in reversed(self.state.log_history) if "r2_loss" in e), None)
            if last is not None:
                lines += [
                    f"- final r2_loss: {last['r2_loss']:.4g}",
                    f"- final max_weight_range: {last['max_weight_range']:.4g}",
                ]
        for section in extra_sections:
            lines += ["", section.strip("\n")]
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(card.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
        if is_peft_card:  # as `Trainer.create_model_card`: let peft add its part
            self.accelerator.unwrap_model(self.model).create_or_update_model_card(self.args.output_dir)

    # ---- checkpoints ----

    def _r2_state(self) -> dict[str, torch.Tensor]:
        if self.r2_regularizer is None:
            return {}
        return {k: v.detach().cpu().contiguous() for k, v in self.r2_regularizer.state_dict().items()}

    def _r2_metadata(self) -> dict[str, str]:
        config = self.r2_regularizer.config
        return {
            "r2_type": config.r2_type,
            "cluster_dim": str(config.cluster_dim),
            "layer_names": json.dumps(self.r2_regularizer.layer_names),
        }

    def _save_r2_state(self, output_dir: str) -> None:
        state = self._r2_state()
        if not state or not self.args.should_save:
            return
        with atomic_path(os.path.join(output_dir, R2_STATE_NAME)) as tmp:
            save_file(state, str(tmp), metadata=self._r2_metadata())

    def _load_r2_state(self, checkpoint_dir: str, required: bool) -> None:
        path = os.path.join(checkpoint_dir, R2_STATE_NAME)
        expected = self._r2_state()
        if not expected:
            if os.path.isfile(path):
                logger.warning(f"{path} holds R² regularizer parameters, but this run has none to restore; ignored.")
            return
        if not os.path.isfile(path):
            if required:
                raise ValueError(
                    f"Checkpoint {checkpoint_dir!r} has no {R2_STATE_NAME}, so the learnable parameters of the "
                    f"{self.r2_regularizer.config.r2_type!r} regularizer cannot be restored; resume from a checkpoint "
                    "written by R2Trainer with the same r2_type."
                )
            return
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        mine = self._r2_metadata()
        for key in ("r2_type", "cluster_dim", "layer_names"):
            if metadata.get(key) != mine[key]:
                raise ValueError(
                    f"{path} was written for {key}={metadata.get(key)!r}, but this run has {key}={mine[key]!r}; "
                    "resume with the same R² settings and model."
                )
        state = load_file(path)
        for key, value in expected.items():
            if key not in state or state[key].shape != value.shape:
                got = None if key not in state else tuple(state[key].shape)
                raise ValueError(f"{path}: parameter {key!r} has shape {got}, expected {tuple(value.shape)}.")
        self.r2_regularizer.load_state_dict(state, strict=True)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        # Written before the Trainer's own files so that a checkpoint it pushes or keeps always includes it.
        run_dir = self._get_output_dir(trial=trial)
        self._save_r2_state(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_r2_state(resume_from_checkpoint, required=True)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_r2_state(self.state.best_model_checkpoint, required=False)


def evaluate_model(
    model: nn.Module,
    args: TrainingArguments,
    eval_dataset: Any,
    *,
    metric_key_prefix: str = "eval",
    **trainer_kwargs: Any,
) -> dict[str, float]:
    """Evaluates `model` once with a plain `Trainer` on `args`, e.g. the full-precision model before compression
    layers are swapped in (the example scripts' "before" metric).

    No range term (evaluation never adds one), nothing saved, and no reporting integration (`--report_to`): it is
    not the run's trainer, so it must not start a second run in an experiment tracker. Under FSDP or DeepSpeed it
    evaluates nothing and returns `{}` with a warning: their evaluation shards the model in place, which must not
    happen before compression layers are swapped in and the run's own trainer prepares it.

    Args:
        model (`nn.Module`): The model to evaluate.
        args (`TrainingArguments`): The run's arguments (batch size, device, processes).
        eval_dataset: The evaluation data.
        metric_key_prefix (`str`, *optional*, defaults to `"eval"`): Prefix of the returned keys.
        **trainer_kwargs: Passed on to `Trainer` (`data_collator`, `processing_class`, `compute_metrics`).

    Returns:
        `dict[str, float]`: The `Trainer.evaluate` metrics (`{}` under FSDP or DeepSpeed).
    """
    from transformers.integrations import get_reporting_integration_callbacks

    trainer = Trainer(model=model, args=args, eval_dataset=eval_dataset, **trainer_kwargs)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        logger.warning(
            f"The {metric_key_prefix} evaluation is skipped under {'FSDP' if trainer.is_fsdp_enabled else 'DeepSpeed'}:"
            " it would shard the model in place before the run's own trainer prepares it."
        )
        return {}
    for callback in get_reporting_integration_callbacks(args.report_to):
        trainer.remove_callback(callback)
    return trainer.evaluate(metric_key_prefix=metric_key_prefix)

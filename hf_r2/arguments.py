"""Command-line flags for compression and publishing, shared by the example scripts.

`CompressionArguments` is parsed by `transformers.HfArgumentParser` next to `R2TrainingArguments`; it only turns
flags into the configs of `hf_r2.palettization` (DKM) and `hf_r2.quantization` (LSQ, EWGS, PACT, PTQ) and calls their
entry points, so every piece of compression logic stays in those packages. `PublishArguments` holds the flags of the
model-card / publish-folder step (`hf_r2.hub`).

Example:

```python
from transformers import HfArgumentParser
from hf_r2.arguments import CompressionArguments

(compression,) = HfArgumentParser(CompressionArguments).parse_args_into_dataclasses(
    ["--quant_method", "lsq", "--w_bits", "2", "--a_bits", "2"]
)
model = compression.apply(model)      # before training: swaps in fake-quantized layers
...                                   # train
model = compression.finalize(model)   # after training: integer weights + scales
```
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hf_r2.quantization.config import QUANTIZATION_CONFIGS, quantization_methods
from hf_r2.utils import LiveChoices, check_module_regex, is_module_regex

#: The `--quant_method` values: `"none"`, then every registered quantization method (`register_quantization_method`),
#: read from the registry at every use.
QUANT_METHOD_CHOICES = LiveChoices(quantization_methods, "none")


def __getattr__(name: str):
    # `QUANT_METHODS` / `QAT_METHODS`, the former hand-written lists, now read from the registry at every access.
    if name == "QUANT_METHODS":
        return tuple(QUANT_METHOD_CHOICES)
    if name == "QAT_METHODS":
        return tuple(quantization_methods(quantization_aware=True))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_module_pattern(value: list[str] | str | None, name: str = "module pattern") -> list[str] | str | None:
    """Turns a `--*_target_modules` / `--*_exclude_modules` flag into the form `hf_r2.utils.select_modules` takes.

    On the command line a pattern is one or more names (`--dkm_target_modules query key value`, also accepted
    comma-separated) or a single regular expression (`--dkm_target_modules '.*attention.*'`). A single entry holding
    regex syntax (anything but letters, digits, `_`, `-` and `.`) is a regex; everything else is a list of names.

    Args:
        value (`list[str]` or `str`, *optional*): The parsed flag.
        name (`str`, *optional*): The flag, for error messages.

    Returns:
        `None`, a list of names, or one regex string.
    """
    if value is None:
        return None
    entries = [value] if isinstance(value, str) else list(value)
    if len(entries) == 1 and is_module_regex(entries[0]):
        return check_module_regex(entries[0], name)  # a malformed regex fails here, while parsing flags, not mid-run
    names = [part.strip() for entry in entries for part in entry.split(",") if part.strip()]
    if not names:
        raise ValueError(f"Empty {name} {value!r}: give module names or one regular expression.")
    regexes = [n for n in names if is_module_regex(n)]
    if regexes:
        raise ValueError(
            f"{name} {entries} mixes module names with a regular expression {regexes}: a regular expression must "
            f"stand alone (e.g. {name} '{regexes[0]}'); names are matched literally (a name also covers every layer "
            "inside the module it names)."
        )
    return names


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """Parses `--config_overrides` such as `num_hidden_layers=2,hidden_sizes=[16,32],hidden_act=relu` into a dict.

    Like `PretrainedConfig.update_from_string`, but values may be JSON lists (vision configs need them: ResNet's
    `hidden_sizes`, `depths`); other values are parsed as JSON (numbers, `true`/`false`, `null`), Python booleans
    (`True`/`False`) or kept as strings.

    Raises:
        ValueError: On an entry without `=`.
    """
    if not overrides:
        return {}
    entries, depth, current = [], 0, ""
    for char in overrides:  # split on commas outside brackets
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    entries.append(current)
    parsed: dict[str, Any] = {}
    for entry in (e.strip() for e in entries if e.strip()):
        key, sep, raw = entry.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValueError(f"--config_overrides entry {entry!r} is not key=value.")
        if raw in ("True", "False"):
            parsed[key] = raw == "True"
            continue
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    return parsed


def config_with_overrides(config_or_type: Any, overrides: str | None) -> Any:
    """A config with `--config_overrides` applied.

    Given a model type (`"resnet"`), the config is built with the overrides as constructor arguments, so values
    derived from them (ResNet's `stage_names` from `depths`) stay consistent. Given a loaded config, the overrides
    are set as attributes (as `update_from_string` does).

    Raises:
        ValueError: On a key the config does not have.
    """
    from transformers import AutoConfig

    values = parse_config_overrides(overrides)
    base = AutoConfig.for_model(config_or_type) if isinstance(config_or_type, str) else config_or_type
    unknown = sorted(k for k in values if not hasattr(base, k))
    if unknown:
        raise ValueError(f"--config_overrides keys {unknown} are not attributes of {type(base).__name__}.")
    if isinstance(config_or_type, str):
        return AutoConfig.for_model(config_or_type, **values)
    for key, value in values.items():
        setattr(base, key, value)
    return base


def _check_bits(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(f"--{name} must be an integer from 1 to 8, got {value!r}.")


def _build_config(config_cls: type, what: str, **kwargs: Any) -> Any:
    """Instantiates `config_cls` with the flags the user set, refusing a flag the method does not have."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    if dataclasses.is_dataclass(config_cls):
        known = {f.name for f in dataclasses.fields(config_cls)}
        unsupported = sorted(set(given) - known)
        if unsupported:
            raise ValueError(
                f"{what} ({config_cls.__name__}) has no option {unsupported}; its options are {sorted(known)}."
            )
    return config_cls(**given)


def _sharding_engine_requested(training_args: Any) -> str | None:
    """`"FSDP"` or `"DeepSpeed"` when the training arguments or `accelerate launch` (its environment) ask for one."""
    flags = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}
    for engine, variable in flags.items():
        if getattr(training_args, engine.lower(), None) or os.environ.get(variable, "").lower() in ("1", "true"):
            return engine
    return None


@dataclass
class CompressionArguments:
    """DKM palettization and quantization flags of the example scripts (at most one method per run)."""

    dkm_bits: int | None = field(
        default=None,
        metadata={
            "help": "Palettize with DKM (differentiable k-means) at this many bits per cluster index (1-8): 2^bits "
            "centroids per layer. Unset: no palettization."
        },
    )
    dkm_cluster_dim: int | None = field(
        default=None,
        metadata={
            "help": "DKM vector size d (>= 1, dividing each layer's output channels): d consecutive output channels "
            "share one index, giving dkm_bits / d bits per weight. Defaults to 1 (scalar palettization)."
        },
    )
    dkm_temperature: float | None = field(
        default=None,
        metadata={"help": "Softmax temperature of DKM's soft assignment (> 0). Defaults to hf_r2.palettization's."},
    )
    dkm_kmeans_iters: int | None = field(
        default=None,
        metadata={"help": "Differentiable k-means iterations per forward (>= 1). Defaults to hf_r2.palettization's."},
    )
    dkm_weight_threshold: int | None = field(
        default=None,
        metadata={
            "help": "Leave dense the layers whose weight has fewer elements than this (>= 0), e.g. a small classifier "
            "with fewer weights than 2^dkm_bits centroids. Default 0: every selected layer is palettized."
        },
    )
    dkm_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to palettize: names (suffix match, space- or comma-separated) or one regex. Default: "
            "every Linear, Conv2d and Embedding, first and last layers included."
        },
    )
    dkm_exclude_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules never to palettize: names or one regex (same syntax as --dkm_target_modules)."},
    )
    quant_method: str = field(
        default="none",
        metadata={
            "help": "Quantization, a registered method (hf_r2.quantization.register_quantization_method): 'lsq', "
            "'ewgs', 'pact' train with fake quantization (QAT); 'ptq' rounds to nearest after training. 'none' "
            "(default) disables it. Exclusive with --dkm_bits.",
            "choices": QUANT_METHOD_CHOICES,
        },
    )
    w_bits: int | None = field(
        default=None, metadata={"help": "Weight bits (1-8) for --quant_method. Defaults to the method's default."}
    )
    a_bits: int | None = field(
        default=None,
        metadata={"help": "Activation bits (1-8) for --quant_method. Defaults to the method's default."},
    )
    quant_per_channel: bool | None = field(
        default=None,
        metadata={"help": "true: one weight scale per output channel; false: one per tensor (default: the method's)."},
    )
    quant_symmetric: bool | None = field(
        default=None,
        metadata={"help": "true/false: symmetric (no zero point) weights, for 'ptq' (default: the method's)."},
    )
    quant_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to quantize: names or one regex. Default: every Linear and Conv2d, first and last "
            "layers included (as the paper does)."
        },
    )
    quant_exclude_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules never to quantize: names or one regex (same syntax as --quant_target_modules)."},
    )
    r2_during_compression: bool = field(
        default=False,
        metadata={
            "help": "Keep --r2_type on while DKM or QAT trains (it then regularizes the latent weights the compression "
            "trains). Off by default, and refused without this flag: the paper turns R² off during compression "
            "(R² run first, then a compression run from its output)."
        },
    )

    def __post_init__(self):
        _check_bits("dkm_bits", self.dkm_bits)
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        dim = self.dkm_cluster_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"--dkm_cluster_dim must be an integer >= 1, got {self.dkm_cluster_dim!r}.")
        if self.dkm_temperature is not None and not (math.isfinite(self.dkm_temperature) and self.dkm_temperature > 0):
            raise ValueError(f"--dkm_temperature must be a finite number > 0, got {self.dkm_temperature!r}.")
        if self.dkm_kmeans_iters is not None and self.dkm_kmeans_iters < 1:
            raise ValueError(f"--dkm_kmeans_iters must be >= 1, got {self.dkm_kmeans_iters!r}.")
        if self.quant_method not in QUANT_METHOD_CHOICES:
            raise ValueError(f"--quant_method {self.quant_method!r} is not one of {list(QUANT_METHOD_CHOICES)}.")
        if self.dkm_bits is not None and self.quant_method != "none":
            raise ValueError(
                f"--dkm_bits {self.dkm_bits} and --quant_method {self.quant_method} are mutually exclusive: "
                "palettization and quantization each replace the same layers. Run them as separate stages "
                "(e.g. an R² run, then a DKM run from its output)."
            )
        dkm_only = {
            "dkm_cluster_dim",
            "dkm_temperature",
            "dkm_kmeans_iters",
            "dkm_weight_threshold",
            "dkm_target_modules",
            "dkm_exclude_modules",
        }
        quant_only = {
            "w_bits",
            "a_bits",
            "quant_per_channel",
            "quant_symmetric",
            "quant_target_modules",
            "quant_exclude_modules",
        }
        self._refuse_orphans(dkm_only, self.dkm_bits is None, "--dkm_bits")
        self._refuse_orphans(quant_only, self.quant_method == "none", "--quant_method")
        # Parse now so a bad pattern fails before a model is even loaded.
        for name in ("dkm_target_modules", "dkm_exclude_modules", "quant_target_modules", "quant_exclude_modules"):
            parse_module_pattern(getattr(self, name), f"--{name}")
        # Build the method's config now: a flag it lacks (--quant_per_channel with lsq) or a combination it refuses
        # (--quant_method lsq --w_bits 1) then fails while parsing, not after the data and model are loaded.
        if self.method == "dkm":
            self.dkm_config()
        elif self.method is not None:
            self.quantization_config()

    def _refuse_orphans(self, names: set[str], disabled: bool, switch: str) -> None:
        if not disabled:
            return
        orphans = sorted(f"--{n}" for n in names if getattr(self, n) is not None)
        if orphans:
            raise ValueError(
                f"{', '.join(orphans)} given without {switch}: these flags only apply when {switch} is set."
            )

    @property
    def method(self) -> str | None:
        """`"dkm"`, the quantization method name, or `None` when no compression was asked for."""
        if self.dkm_bits is not None:
            return "dkm"
        return None if self.quant_method == "none" else self.quant_method

    @property
    def trains_compressed(self) -> bool:
        """Whether the compression is applied before training (DKM, QAT) rather than after it (PTQ)."""
        return self.method == "dkm" or (self.method is not None and not self._post_training)

    @property
    def _post_training(self) -> bool:
        """Whether the method is a registered quantization method that rounds a trained model (PTQ), not QAT."""
        config_cls = QUANTIZATION_CONFIGS.get(self.quant_method)
        return self.dkm_bits is None and config_cls is not None and not config_cls.quantization_aware

    def dkm_config(self) -> Any:
        """The `hf_r2.palettization.DKMConfig` these flags describe."""
        if self.dkm_bits is None:
            raise ValueError("dkm_config() needs --dkm_bits.")
        palettization = importlib.import_module("hf_r2.palettization")
        return _build_config(
            palettization.DKMConfig,
            "DKM palettization",
            n_bits=self.dkm_bits,
            cluster_dim=self.dkm_cluster_dim,
            temperature=self.dkm_temperature,
            kmeans_iters=self.dkm_kmeans_iters,
            weight_threshold=self.dkm_weight_threshold,
            target_modules=parse_module_pattern(self.dkm_target_modules),
            exclude_modules=parse_module_pattern(self.dkm_exclude_modules),
        )

    def quantization_config(self) -> Any:
        """The `hf_r2.quantization` config these flags describe (via `get_quantization_config`)."""
        if self.quant_method == "none":
            raise ValueError("quantization_config() needs --quant_method other than 'none'.")
        quantization = importlib.import_module("hf_r2.quantization")
        kwargs = {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "per_channel": self.quant_per_channel,
            "symmetric": self.quant_symmetric,
            "target_modules": parse_module_pattern(self.quant_target_modules),
            "exclude_modules": parse_module_pattern(self.quant_exclude_modules),
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return quantization.get_quantization_config(self.quant_method, **kwargs)

    def apply(self, model: nn.Module, *, before_training: bool = True) -> nn.Module:
        """Swaps in the compression layers (in place) and returns the model.

        DKM and QAT apply before training. PTQ applies after training, so with `before_training=True` it only checks
        that it will be able to (`hf_r2.quantization.validate_quantization`) and `finalize` does the work.

        Args:
            model (`nn.Module`): The model to compress.
            before_training (`bool`, *optional*, defaults to `True`): Whether training follows.
        """
        method = self.method
        if method is None:
            return model
        if self._post_training and before_training:
            # Quantized after training, but checked now: a selection that matches nothing, a tied or non-finite
            # weight or an already compressed model fails before the training time is spent.
            importlib.import_module("hf_r2.quantization").validate_quantization(model, self.quantization_config())
            return model
        if method == "dkm":
            palettization = importlib.import_module("hf_r2.palettization")
            result = palettization.palettize(model, self.dkm_config())
        else:
            quantization = importlib.import_module("hf_r2.quantization")
            result = quantization.quantize(model, self.quantization_config())
        return model if result is None or not isinstance(result, nn.Module) else result

    def prepare(
        self, model: nn.Module, training_args: Any, eval_dataset: Any = None, **eval_kwargs: Any
    ) -> tuple[nn.Module, dict[str, float], str]:
        """Before training, in an example script: the metric before compression, then `apply`.

        DKM and QAT train the compressed model, so their full-precision reference is the model the run starts from,
        evaluated (with `--do_eval`) before the layers are swapped, as optimum-intel's example reports it. PTQ comes
        after training; it is tried now on a copy, so that a target entry that matches nothing (or a layer it cannot
        quantize) fails before the training time is spent.

        Args:
            model (`nn.Module`): The model the run starts from.
            training_args (`TrainingArguments`): The parsed training flags (`do_eval`, `do_train`, ...).
            eval_dataset (*optional*): The evaluation set of the full-precision metric.
            **eval_kwargs: Passed to `hf_r2.trainer.evaluate_model` (`data_collator`, `compute_metrics`, ...).

        Returns:
            `tuple`: The model to train, the full-precision metrics (`eval_float_*`, empty when not measured here) and
            the label of that column in the model card.
        """
        float_metrics: dict[str, float] = {}
        float_label = "full precision"
        if training_args.do_eval and self.trains_compressed:
            evaluate_model = importlib.import_module("hf_r2.trainer").evaluate_model
            float_metrics = evaluate_model(
                model, training_args, eval_dataset, metric_key_prefix="eval_float", **eval_kwargs
            )
            float_label = "full precision (start of this run)"
        model = self.apply(model)
        if self._post_training and training_args.do_train:
            self.apply(copy.deepcopy(model), before_training=False)
        return model, float_metrics, float_label

    def finalize(self, model: nn.Module, calibration_batches: Iterable[Any] | None = None) -> nn.Module:
        """After training: hard-assigns DKM weights to centroids, or turns fake-quantized layers into integer weights
        and scales (applying PTQ first when that is the method). Returns the model (changed in place).

        Args:
            model (`nn.Module`): The trained model.
            calibration_batches (`Iterable`, *optional*): Model inputs (dicts), training batches preferably: they set
                PTQ activation ranges (required for `--quant_method ptq` with `--a_bits`), and the step sizes / signs
                of QAT activation quantizers that have seen no batch (a run without training).
        """
        method = self.method
        if method is None:
            return model
        if self._post_training:
            model = self.apply(model, before_training=False)
            if self.a_bits is not None:
                if calibration_batches is None:
                    raise ValueError("--quant_method ptq with --a_bits needs calibration batches (activation ranges).")
                importlib.import_module("hf_r2.quantization").calibrate(model, calibration_batches)
        elif method != "dkm" and calibration_batches is not None:
            quantization = importlib.import_module("hf_r2.quantization")
            if quantization.uncalibrated_input_quantizers(model):
                # Not trained (e.g. --do_eval alone): the activation quantizers have seen no batch yet; set their step
                # sizes and signs from the given (training) batches rather than from a loaded model's first input.
                quantization.calibrate(model, calibration_batches)
        package = importlib.import_module("hf_r2.palettization" if method == "dkm" else "hf_r2.quantization")
        result = package.finalize(model)
        return model if result is None or not isinstance(result, nn.Module) else result

    def check_training_args(self, training_args: Any) -> None:
        """Refuses, before anything is loaded, flag combinations of the compression and the training arguments.

        * `--r2_type` with `--dkm_bits` or a QAT `--quant_method` while training: the paper turns R² off during
          compression, so this needs `--r2_during_compression` (PTQ comes after training: R² then PTQ is the paper's
          own recipe and is accepted).
        * `--r2_cluster_dim` other than `--dkm_cluster_dim`: the regularizer would shape vectors DKM does not cluster.
        * A compression under FSDP or DeepSpeed: the scripts finalize it on the trained model, whose weights those
          engines leave sharded (finalize needs whole weights, and refuses sharded ones).

        Args:
            training_args (`R2TrainingArguments`): The parsed training flags.
        """
        engine = _sharding_engine_requested(training_args)
        if self.method is not None and engine is not None:
            raise ValueError(
                f"--{'dkm_bits' if self.method == 'dkm' else 'quant_method'} under {engine}: the script finalizes the "
                "compression on the trained model, which that engine leaves sharded, and finalize needs whole weights. "
                "Compress under DDP (torchrun, or accelerate launch --multi_gpu), or train under FSDP in your own "
                "script and finalize a gathered full state dict (docs/trainer.md, Engines)."
            )
        r2_type = getattr(training_args, "r2_type", "none")
        compresses_in_training = self.trains_compressed and getattr(training_args, "do_train", False)
        if r2_type != "none" and compresses_in_training and not self.r2_during_compression:
            switch = f"--dkm_bits {self.dkm_bits}" if self.method == "dkm" else f"--quant_method {self.quant_method}"
            raise ValueError(
                f"--r2_type {r2_type} with {switch} would keep R² on while the compression trains, regularizing its "
                "latent weights; the paper turns R² off during compression. Run R² first (--r2_type alone), then the "
                f"compression from its output with --r2_type none; or pass --r2_during_compression to do both at once."
            )
        if self.r2_during_compression and not (r2_type != "none" and compresses_in_training):
            raise ValueError(
                "--r2_during_compression applies only with --r2_type, --do_train and --dkm_bits or a QAT "
                f"--quant_method ({', '.join(quantization_methods(quantization_aware=True))}); got --r2_type "
                f"{r2_type}, method {self.method!r}."
            )
        r2_dim = getattr(training_args, "r2_cluster_dim", 1)
        dkm_dim = self.dkm_cluster_dim or 1
        if self.method == "dkm" and r2_type != "none" and r2_dim != dkm_dim:
            raise ValueError(
                f"--r2_cluster_dim {r2_dim} differs from --dkm_cluster_dim {dkm_dim}: R² would regularize "
                f"{r2_dim}-dimensional vectors while DKM clusters {dkm_dim}-dimensional ones. Give both the same value."
            )

    def trainer_callbacks(self) -> list[Any]:
        """The `TrainerCallback`s the method needs during training, as registered with its quantize handler
        (`EWGSDeltaCallback` for `--quant_method ewgs`: without it EWGS's delta stays at its starting value)."""
        if self.method is None or self.method == "dkm":
            return []
        return importlib.import_module("hf_r2.quantization").trainer_callbacks(self.quantization_config())

    def card_info(self, model: nn.Module | None = None) -> dict[str, Any] | None:
        """What was done, for the model card (`hf_r2.hub`); `None` without compression.

        Args:
            model (`nn.Module`, *optional*): The finalized model: adds what was actually compressed (layers and share
                of the weights of the compressible layers), counted from its compressed layers, not from the flags.
        """
        info = self._card_settings()
        if info is not None and model is not None:
            info.update(compressed_summary(model))
        return info

    def _card_settings(self) -> dict[str, Any] | None:
        method = self.method
        if method is None:
            return None
        if method == "dkm":
            cluster_dim = self.dkm_cluster_dim or 1
            return {
                "method": "dkm",
                "n_bits": self.dkm_bits,
                "cluster_dim": cluster_dim,
                "bits_per_weight": self.dkm_bits / cluster_dim,
                "target_modules": parse_module_pattern(self.dkm_target_modules),
                "exclude_modules": parse_module_pattern(self.dkm_exclude_modules),
            }
        config = self.quantization_config()
        info = {"method": method}
        for key in ("w_bits", "a_bits", "per_channel", "symmetric", "target_modules", "exclude_modules"):
            if hasattr(config, key):
                info[key] = getattr(config, key)
        info.setdefault("w_bits", self.w_bits)
        info["bits_per_weight"] = info.get("w_bits")
        return info


def compressed_summary(model: nn.Module) -> dict[str, Any]:
    """What a finalized model actually holds compressed: `compressed_layers` (how many palettized or quantized layers)
    and `compressed_weights` (their weights out of all weights of `Linear` / `Conv2d` / transformers `Conv1D` /
    `Embedding` layers, which is what a compression could have covered), for the model card."""
    from transformers.pytorch_utils import Conv1D

    from hf_r2.palettization.compressed import PalettizedMixin
    from hf_r2.quantization.layers import _QuantizedLayerMixin

    compressed = total = layers = 0
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding | Conv1D):
            continue
        is_compressed = isinstance(module, PalettizedMixin | _QuantizedLayerMixin)
        weight = module.weight_int if isinstance(module, _QuantizedLayerMixin) else module.weight
        if id(weight) in seen:  # a tied weight counts once
            continue
        seen.add(id(weight))
        total += weight.numel()
        if is_compressed:
            compressed += weight.numel()
            layers += 1
    share = 100.0 * compressed / total if total else 0.0
    return {"compressed_layers": layers, "compressed_weights": f"{compressed:,} of {total:,} ({share:.1f} %)"}


@dataclass
class PublishArguments:
    """Model-card and publish-folder flags of the example scripts (see `hf_r2.hub`)."""

    publish_dir: str | None = field(
        default=None,
        metadata={
            "help": "Write the folder that would be pushed to the Hub (safetensors, config, tokenizer or image "
            "processor, README.md model card, weight-histogram figure) here. Defaults to <output_dir>/publish when "
            "--push_to_hub is set; otherwise no folder is written unless given."
        },
    )
    card_histogram_layers: int = field(
        default=4,
        metadata={"help": "How many layers the model card's weight-histogram figure shows (>= 1; 0 for no figure)."},
    )
    card_compare_initial: bool = field(
        default=True,
        metadata={
            "help": "Overlay the weights before this run (the starting checkpoint or initialisation) in the model "
            "card's weight ranges table and histograms."
        },
    )
    card_reference_model: str | None = field(
        default=None,
        metadata={
            "help": "Compare against this checkpoint instead (name or path, same architecture), e.g. the same model "
            "trained without R², as in the paper's Table 6 and Figure 2."
        },
    )
    card_reference_label: str = field(
        default="without R²", metadata={"help": "How the card names --card_reference_model."}
    )
    export_coreml: str | None = field(
        default=None,
        metadata={
            "help": "After compressing, also write DIR/model.mlpackage: a Core ML package (iOS 18 / macOS 15) whose "
            "palettized or quantized weights stay compressed, checked equal to the PyTorch weights "
            "(pip install hf-r2[coreml]; docs/export.md). Needs --dkm_bits or --quant_method."
        },
    )

    def __post_init__(self):
        if (
            isinstance(self.card_histogram_layers, bool)
            or not isinstance(self.card_histogram_layers, int)
            or (self.card_histogram_layers < 0)
        ):
            raise ValueError(f"--card_histogram_layers must be an integer >= 0, got {self.card_histogram_layers!r}.")


def parse_script_args(model_args_cls: type, data_args_cls: type, args_list: list[str] | None = None) -> tuple:
    """Parses an example script's command line into its five argument dataclasses.

    `(model_args, data_args, R2TrainingArguments, CompressionArguments, PublishArguments)`, from `args_list` (default
    `sys.argv[1:]`) or, when that is a single `.json` path, from that file (as transformers' example scripts do).
    Combinations across them are checked here (`CompressionArguments.check_training_args`).
    """
    import os
    import sys

    from transformers import HfArgumentParser

    from hf_r2.trainer import R2TrainingArguments

    parser = HfArgumentParser(
        (model_args_cls, data_args_cls, R2TrainingArguments, CompressionArguments, PublishArguments)
    )
    argv = sys.argv[1:] if args_list is None else args_list
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    _, _, training_args, compression_args, publish_args = parsed
    compression_args.check_training_args(training_args)  # flag combinations, before any data or model is loaded
    engine = _sharding_engine_requested(training_args)
    publishing = [
        flag
        for flag, on in (("--publish_dir", publish_args.publish_dir), ("--push_to_hub", training_args.push_to_hub))
        if on
    ]
    if engine is not None and publishing:
        raise ValueError(
            f"{' / '.join(publishing)} under {engine}: publishing runs on the main process alone and reads the model's "
            "weights, which that engine keeps sharded over all processes. Train under it (the model saved to "
            "--output_dir is whole), then publish in one process: the same script with --model_name_or_path "
            "OUTPUT_DIR --do_eval and the publish flags."
        )
    return parsed


def load_metric(
    name_or_path: str | None, config_name: str | None, *, default: str, flag: str = "--metric_name_or_path"
) -> Any:
    """The example scripts' `evaluate` metric: `evaluate.load(name_or_path or default, config_name)`, in memory.

    The scripts ship their metric modules (`examples/metrics/<name>/<name>.py`) and load them by path by default,
    which works offline; a Hub name (`glue`, `accuracy`) loads the Hub's module instead and needs the Hub. Loaded
    before training, so that a bad value fails before any time is spent. `keep_in_memory=True`: nothing is written
    under the metrics cache, so processes of one run never share a cache file.

    Args:
        name_or_path (`str`, *optional*): The flag's value; `None` for `default`.
        config_name (`str`, *optional*): The metric's configuration (the GLUE task).
        default (`str`): Folder of the shipped module.
        flag (`str`, *optional*): The flag, for the error message.

    Raises:
        ValueError: If the metric cannot be loaded, naming the value and the offline default.
    """
    import evaluate

    source = name_or_path or default
    try:
        return evaluate.load(source, config_name, keep_in_memory=True)
    except (OSError, ImportError, KeyError, ValueError) as err:  # not found (offline: FileNotFoundError), bad config
        raise ValueError(
            f"{flag} {source!r} could not be loaded: {err} Leave {flag} unset for the module shipped with the script "
            f"({default}, works offline), or give an `evaluate` metric name (needs the Hub) or a folder holding "
            "<name>/<name>.py."
        ) from err

"""The example scripts' publish step, from their parsed flags: card information from `R2TrainingArguments` /
`CompressionArguments` (the R² settings the chosen regularizer reads, the hyperparameters, the DKM size report),
the publish folder's place, and `publish_from_args` (prepare the folder, then push it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from hf_r2.hub.publish_folder import check_publish_dir, prepare_publish_folder
from hf_r2.hub.upload import push_folder
from hf_r2.regularizer_registry import get_regularizer, regularizer_names

logger = logging.getLogger(__name__)


def r2_info_from_args(args: Any) -> dict[str, Any] | None:
    """The `r2_*` settings of an `R2TrainingArguments` (or any object with such attributes), for the card.

    Only the settings the chosen `r2_type` uses (its registered `RegularizerSpec.options`): the initial margin for
    `margin`, the initial temperature for `soft_min_max` (a card listing both would suggest both were used). The
    regularizer's learning rate is the one trained with: `resolved_r2_learning_rate()` when `r2_learning_rate` was left
    to its per-type default; a regularizer without a learnable parameter (`linf`) has none.

    Returns `None` when R² was off (`r2_type` missing or `"none"`).
    """
    r2_type = getattr(args, "r2_type", "none")
    if r2_type in (None, "none"):
        return None
    spec = get_regularizer(r2_type)
    type_specific = {option for name in regularizer_names() for option in get_regularizer(name).options}
    unused = {f"r2_{option}" for option in type_specific - set(spec.options)}
    info = {k: v for k, v in sorted(vars(args).items()) if k.startswith("r2_") and v is not None and k not in unused}
    resolve = getattr(args, "resolved_r2_learning_rate", None)
    if spec.parameter is None:
        info.pop("r2_learning_rate", None)
    elif callable(resolve):
        info["r2_learning_rate"] = resolve()
    return dict(sorted(info.items()))


def training_info_from_args(args: Any) -> dict[str, Any]:
    """The usual hyperparameters of a `TrainingArguments`, for the card's training section."""
    keys = (
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "weight_decay",
        "warmup_steps",
        "lr_scheduler_type",
        "seed",
    )
    info = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    world = getattr(args, "world_size", 1) or 1
    if "per_device_train_batch_size" in info:
        info["total_train_batch_size"] = (
            info["per_device_train_batch_size"] * info.get("gradient_accumulation_steps", 1) * world
        )
    return info


def resolve_publish_dir(training_args: Any, publish_args: Any, push: bool) -> Path | None:
    """The example scripts' publish folder: `--publish_dir`, else `<output_dir>/publish` when pushing, else `None`."""
    if publish_args.publish_dir:
        return Path(publish_args.publish_dir)
    return Path(training_args.output_dir) / "publish" if push else None


def dkm_size_report(compression: Any) -> Callable[[Path], str] | None:
    """For a DKM run (`CompressionArguments` with `dkm_bits`), a function giving the paper's Table 2 for a written
    folder (`hf_r2.palettization` size report at 32/4/2/1 bits, first and last layers in or out, actual file size);
    `None` otherwise."""
    if getattr(compression, "method", None) != "dkm":
        return None
    cluster_dim = getattr(compression, "dkm_cluster_dim", None) or 1

    def report(folder: Path) -> str:
        from hf_r2.palettization.serialization import palettized_size_report

        return palettized_size_report(folder, cluster_dim=cluster_dim).to_table()

    return report


def publish_from_args(
    model: nn.Module,
    training_args: Any,
    compression_args: Any,
    publish_args: Any,
    *,
    push: bool,
    eval_metrics: Mapping[str, Any] | None = None,
    **publish_kwargs: Any,
) -> Path:
    """The example scripts' last step: `prepare_publish_folder` from their flags, then `push_folder` if `push`.

    The folder is `--publish_dir` (default `<output_dir>/publish`; refused if it is or contains `--output_dir`, see
    `check_publish_dir`, which the scripts also call before training) and the repository `--hub_model_id` (default
    the output folder's name); the card gets the R² settings, the compression, the numeric `eval_metrics` and (after
    training) the training hyperparameters; the push uses `--hub_token`, `--hub_private_repo` and `--hub_revision`.

    Args:
        model (`PreTrainedModel`): The trained (and, if compressed, finalized) model.
        training_args (`R2TrainingArguments`), compression_args (`CompressionArguments`),
            publish_args (`PublishArguments`): The parsed flags.
        push (`bool`): Upload the folder (the script's `--push_to_hub`, which it takes away from the Trainer).
        eval_metrics (`Mapping`, *optional*): Evaluation results for the card.
        **publish_kwargs: Passed to `prepare_publish_folder` (`tokenizer`, `reference_weights`, `reference_ranges`,
            `reference_label`, `float32_bytes`, `verify_inputs`, `base_model`, `dataset`, `pipeline_tag`, ...).

    Returns:
        `Path`: The publish folder.
    """
    folder = resolve_publish_dir(training_args, publish_args, push=True)
    check_publish_dir(folder, output_dir=training_args.output_dir, name="--publish_dir")
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    prepare_publish_folder(
        model,
        folder,
        model_name=repo_id.split("/")[-1],
        r2=r2_info_from_args(training_args),
        compression=compression_args.card_info(model),
        metrics={k: v for k, v in (eval_metrics or {}).items() if isinstance(v, (int, float))},
        training=training_info_from_args(training_args) if training_args.do_train else None,
        histogram_layers=publish_args.card_histogram_layers,
        size_report=dkm_size_report(compression_args),
        verify_atol=0.0 if compression_args.method is None else 1e-5,
        repo_id=repo_id,
        **publish_kwargs,
    )
    logger.info(f"Publish folder written to {folder}.")
    if push:
        commit = push_folder(
            folder,
            repo_id,
            token=training_args.hub_token,
            private=training_args.hub_private_repo,
            revision=training_args.hub_revision,
        )
        logger.info(f"Pushed {folder} to {repo_id}: {commit}")
    return Path(folder)

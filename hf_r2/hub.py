"""Publishing regularized and compressed checkpoints: model card, publish folder, upload.

Three steps, each usable alone:

1. `build_model_card(...)` writes a card that says what was done: the R² settings, the per-layer weight ranges and
   standard deviations (the paper's Table 6, optionally next to a reference such as the weights before the run),
   a per-layer weight-histogram figure (Figure 2), the compression bits and the checkpoint size (Table 2) and the
   evaluation metrics (before and after compression side by side when both are given), with the tags `hf_r2` and
   `range-regularization`. The same sections (`run_card_sections`) go into the card that `R2Trainer.create_model_card`
   writes next to the model in `output_dir`.
2. `prepare_publish_folder(model, folder, ...)` writes the exact folder that would be uploaded (safetensors weights,
   config, tokenizer or image processor, `README.md`, `weight_histograms.png`) atomically, without the regularizer's
   own parameters, and by default checks that it loads back with `from_pretrained` with no missing or unexpected key
   and the same outputs. It never replaces a folder hf_r2 did not write as a publish folder (`check_publish_dir`:
   each publish folder carries the marker `PUBLISH_MARKER`, which is not uploaded).
3. `push_folder(folder, repo_id, ...)` creates the repository if needed and uploads that folder
   (`huggingface_hub.HfApi.create_repo` / `upload_folder`).

Example:

```python
from hf_r2.hub import prepare_publish_folder, push_folder

folder = prepare_publish_folder(
    trainer.model, "outputs/publish", tokenizer=tokenizer,
    r2={"r2_type": "soft_min_max", "r2_weight": 0.01}, metrics=trainer.evaluate(),
    verify_inputs=dict(tokenizer(["a question"], ["a sentence"], return_tensors="pt")),
)
push_folder(folder, "me/minilm-qnli-r2")
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from hf_r2.analysis import LayerWeightStats, format_weight_range_table, weight_ranges
from hf_r2.plotting import layer_weights, pick_histogram_layers, plot_weight_histograms
from hf_r2.regularizer_registry import get_regularizer, regularizer_names
from hf_r2.utils import (
    make_temp_dir_beside,
    public_source_name,
    recover_replaced_dir,
    remove_stale_temp_dirs,
    replace_dir,
)

logger = logging.getLogger(__name__)

TAGS = ("hf_r2", "range-regularization")
HISTOGRAM_FILE = "weight_histograms.png"
CARD_FILE = "README.md"
#: Column title of the full-precision metrics in a card's before/after-compression table.
FLOAT_LABEL = "full precision"
#: Marker file hf_r2 writes into every publish folder it creates, listing the files it wrote there. An existing folder
#: is replaced only if it holds this marker and nothing but the files the marker lists (plus the marker): hf_r2 never
#: deletes a folder, or a file, that it did not create as part of a publish folder. It is not uploaded.
PUBLISH_MARKER = ".hf_r2_publish.json"
PUBLISH_MARKER_FORMAT = "hf_r2 publish folder"
#: Name of the Trainer's checkpoint folders (`checkpoint-<step>`), which it deletes when rotating checkpoints.
_CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")
#: Section headings of the card, in order (a section is left out when there is nothing to say in it).
SECTIONS = {
    "r2": "## Range regularization (R²)",
    "compression": "## Compression",
    "metrics": "## Evaluation results",
    "ranges": "## Weight ranges",
    "figure": "## Weight distribution",
    "training": "## Training procedure",
    "usage": "## How to use",
}


# ----------------------------------------------------------------------------------------------------------- stats
def folder_size_bytes(folder: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    """Bytes on disk of the files matching `pattern` in `folder` (the weights of a `save_pretrained` folder)."""
    files = list(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"No {pattern} file in {folder}.")
    return sum(f.stat().st_size for f in files)


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


# ------------------------------------------------------------------------------------------------------------ card
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _kv_table(rows: Mapping[str, Any], header: tuple[str, str] = ("Setting", "Value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _size_table(size: Mapping[str, Any]) -> str:
    lines = ["| | MB |", "|---|---:|"]
    if "float32_bytes" in size:
        lines.append(f"| float32 (32 bit) | {size['float32_bytes'] / 1e6:.3f} |")
    label = size.get("label", "this checkpoint")
    lines.append(f"| {label} | {size['checkpoint_bytes'] / 1e6:.3f} |")
    if size.get("coreml_bytes"):
        lines.append(f"| Core ML package weight file (iOS 18, `hf_r2.export`) | {size['coreml_bytes'] / 1e6:.3f} |")
    text = "\n".join(lines)
    if "float32_bytes" in size and size["checkpoint_bytes"]:
        text += f"\n\nCompression ratio versus float32: {size['float32_bytes'] / size['checkpoint_bytes']:.2f}×."
    return text


def card_tags(r2: Mapping[str, Any] | None = None, compression: Mapping[str, Any] | None = None) -> list[str]:
    """The tags of an hf_r2 card: `hf_r2`, `range-regularization`, `r2-<type>` when R² was on, and `palettization` +
    `dkm` or `quantization` + the method when compressed."""
    tags = list(TAGS)
    if r2:
        tags.append(f"r2-{r2.get('r2_type')}".replace("_", "-"))
    if compression:
        method = compression.get("method")
        tags += ["palettization", "dkm"] if method == "dkm" else ["quantization", str(method)]
    return tags


def build_model_card(
    *,
    model_name: str,
    r2: Mapping[str, Any] | None = None,
    compression: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    float_metrics: Mapping[str, Any] | None = None,
    float_label: str = FLOAT_LABEL,
    ranges: Mapping[str, LayerWeightStats] | None = None,
    reference_ranges: Mapping[str, LayerWeightStats] | None = None,
    reference_label: str = "reference",
    figure: str | None = None,
    size: Mapping[str, Any] | None = None,
    size_report: str | None = None,
    training: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    pipeline_tag: str | None = None,
    auto_class: str = "AutoModel",
    repo_id: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    extra_tags: Sequence[str] = (),
) -> ModelCard:
    """Builds the model card of a regularized and/or compressed checkpoint.

    Args:
        model_name (`str`): Title of the card.
        r2 (`Mapping`, *optional*): R² settings (e.g. `r2_info_from_args(training_args)`); `None` if R² was off.
        compression (`Mapping`, *optional*): Compression settings (e.g. `CompressionArguments.card_info()`).
        metrics (`Mapping`, *optional*): Evaluation metrics (`trainer.evaluate()`), of the compressed model when
            `float_metrics` is given.
        float_metrics (`Mapping`, *optional*): The same metrics of the full-precision model (keys `eval_float_*` or
            `eval_*`), shown next to `metrics` as "before and after compression".
        float_label (`str`, *optional*): Column title of `float_metrics`.
        ranges (`Mapping[str, LayerWeightStats]`, *optional*): `hf_r2.analysis.weight_ranges` of the published model.
        reference_ranges (`Mapping[str, LayerWeightStats]`, *optional*): The same for a reference (before the run, or
            without R²), over the same layers.
        reference_label (`str`, *optional*, defaults to `"reference"`): How the reference is named in the card.
        figure (`str`, *optional*): File name, relative to the card, of the weight-histogram figure.
        size (`Mapping`, *optional*): `checkpoint_bytes` (and optionally `float32_bytes`, `label`) for Table 2.
        size_report (`str`, *optional*): A ready-made size report (e.g. from `hf_r2.palettization`), shown verbatim.
        training (`Mapping`, *optional*): Training hyperparameters (`training_info_from_args`).
        base_model (`str`, *optional*): The checkpoint the run started from (a Hub id goes into the metadata).
        dataset (`str`, *optional*): The training data.
        pipeline_tag (`str`, *optional*): E.g. `"text-classification"`.
        auto_class (`str`, *optional*, defaults to `"AutoModel"`): The `transformers` class of the usage snippet.
        repo_id (`str`, *optional*): Repository id shown in the usage snippet.
        license (`str`, *optional*): License identifier for the metadata.
        language (`str` or `list[str]`, *optional*): Language(s) for the metadata.
        extra_tags (`Sequence[str]`, *optional*): More tags (the method names are added automatically).

    Returns:
        `huggingface_hub.ModelCard`.
    """
    tags = card_tags(r2, compression)
    tags += [t for t in extra_tags if t not in tags]
    # A card must never carry a local path (it would publish the user's file-system layout): a local checkpoint is
    # named by its Hub id when it is a Hub download, else by its folder's name; only Hub ids go in the metadata.
    base_id, base_local = public_source_name(base_model)
    dataset_id, dataset_local = public_source_name(dataset, keep_parent=True)
    data = ModelCardData(
        library_name="transformers",
        tags=tags,
        base_model=base_id if base_id and base_id.count("/") == 1 and not base_local else None,
        datasets=[dataset_id] if dataset_id and not dataset_local else None,
        pipeline_tag=pipeline_tag,
        license=license,
        language=language,
        metrics=sorted({_metric_name(k) for k in (metrics or {}) if _is_quality_metric(k)}) or None,
    )

    what = []
    if r2:
        what.append(f"R² range regularization (`{r2.get('r2_type')}`, weight {_fmt(r2.get('r2_weight'))})")
    if compression:
        what.append(_describe_compression(compression))
    origin = " from scratch"
    if base_id:
        origin = f" from the local checkpoint `{base_id}`" if base_local else f" from `{base_id}`"
    on = ""
    if dataset_id:
        on = f" on the local data `{dataset_id}`" if dataset_local else f" on `{dataset_id}`"
    summary = f"Trained{origin}{on} with {' and '.join(what) if what else 'no R² and no compression'}"
    parts = [
        f"# {model_name}",
        summary + " using `hf_r2` (R²: Kundu et al., *R²: Range Regularization for Model Compression and "
        "Quantization*).",
    ]
    if r2:
        parts += [
            SECTIONS["r2"],
            "Each targeted layer's weight range is penalized during training so that it survives low-bit compression.",
            _kv_table(r2),
        ]
    parts += compression_section(compression, size=size, size_report=size_report)
    parts += metrics_section(metrics, float_metrics, float_label=float_label, compressed=bool(compression))
    parts += ranges_section(ranges, reference_ranges, reference_label)
    if figure:
        parts += [SECTIONS["figure"], f"![Per-layer weight histograms]({figure})"]
    if training:
        parts += [SECTIONS["training"], _kv_table(training, header=("Hyperparameter", "Value"))]
    parts += usage_section(auto_class, repo_id, compressed=bool(compression))
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"
    return ModelCard(content)


def compression_section(
    compression: Mapping[str, Any] | None,
    *,
    size: Mapping[str, Any] | None = None,
    size_report: str | None = None,
) -> list[str]:
    """The card's compression section (settings, Table 2-style size table, size report) as Markdown blocks."""
    if compression:
        body = [SECTIONS["compression"], _kv_table(compression)]
        if size:
            body.append(_size_table(size))
        if size_report:
            body.append(f"```text\n{size_report.strip()}\n```")
        return body
    if size:
        return [SECTIONS["compression"], "Not compressed.", _size_table(size)]
    return []


def metrics_section(
    metrics: Mapping[str, Any] | None,
    float_metrics: Mapping[str, Any] | None = None,
    *,
    float_label: str = FLOAT_LABEL,
    compressed: bool = True,
) -> list[str]:
    """The card's evaluation section: one column of quality metrics and loss, or, with `float_metrics`, the metric
    before compression (full precision) next to the one after it, row by row."""
    shown = {k: v for k, v in (metrics or {}).items() if _is_quality_metric(k) or _metric_name(k) == "loss"}
    before = {
        _metric_name(k): v
        for k, v in (float_metrics or {}).items()
        if _is_quality_metric(k) or _metric_name(k) == "loss"
    }
    if not before:
        return [SECTIONS["metrics"], _kv_table(shown, header=("Metric", "Value"))] if shown else []
    after = {_metric_name(k): v for k, v in shown.items()}
    names = list(before) + [n for n in after if n not in before]
    names.sort(key=lambda n: n == "loss")  # the quality metrics first, the loss last
    after_label = "compressed" if compressed else "this model"
    lines = [f"| Metric | {float_label} | {after_label} |", "|---|---:|---:|"]
    lines += [
        f"| `{n}` | {_fmt(before[n]) if n in before else '–'} | {_fmt(after[n]) if n in after else '–'} |"
        for n in names
    ]
    text = "Evaluated on the same data before and after compression, in one run of the script."
    return [SECTIONS["metrics"], text, "\n".join(lines)]


def ranges_section(
    ranges: Mapping[str, LayerWeightStats] | None,
    reference_ranges: Mapping[str, LayerWeightStats] | None = None,
    reference_label: str = "reference",
) -> list[str]:
    """The card's weight-range section (the paper's Table 6), optionally next to a reference."""
    if not ranges:
        return []
    ref_text = f", for this model and for the reference ({reference_label})" if reference_ranges else ""
    return [
        SECTIONS["ranges"],
        f"Per-layer weight range (max − min) and standard deviation{ref_text}, as in Table 6 of the R² paper.",
        format_weight_range_table(ranges, reference_ranges, labels=("this model", reference_label), precision=4),
    ]


def usage_section(auto_class: str = "AutoModel", repo_id: str | None = None, compressed: bool = False) -> list[str]:
    """The card's "How to use" snippet (with `import hf_r2` for a compressed checkpoint, which needs it to load)."""
    target = repo_id or "path/to/this/folder"
    snippet = ["```python"]
    if compressed:
        snippet.append("import hf_r2  # registers the compressed layers; without it loading fails")
    snippet += [f"from transformers import {auto_class}", "", f'model = {auto_class}.from_pretrained("{target}")']
    snippet.append("```")
    return [SECTIONS["usage"], "\n".join(snippet)]


def run_card_sections(
    model: nn.Module,
    *,
    compression: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    float_metrics: Mapping[str, Any] | None = None,
    float_label: str = FLOAT_LABEL,
    folder: str | os.PathLike | None = None,
    float32_bytes: int | None = None,
    coreml_bytes: int | None = None,
    size_report: str | Callable[[Path], str] | None = None,
    reference_ranges: Mapping[str, LayerWeightStats] | None = None,
    reference_label: str = "start of this run",
) -> list[str]:
    """The hf_r2 sections of the card the example scripts write into `--output_dir` next to the model.

    `R2Trainer.create_model_card(extra_sections=...)` appends them to the Trainer's own card (which already holds the
    R² settings, the hyperparameters and the last evaluation): the compression with the size of the weights saved in
    `folder` against float32 (Table 2), the metrics before and after compression when `float_metrics` is given, the
    per-layer weight ranges (Table 6, next to `reference_ranges` if given), and for a compressed model how to load it.

    Args:
        model (`nn.Module`): The saved (finalized, if compressed) model.
        compression (`Mapping`, *optional*): `CompressionArguments.card_info(model)`; `None` when not compressed.
        metrics, float_metrics, float_label: See `metrics_section`.
        folder (`str` or `os.PathLike`, *optional*): Where the model's `model*.safetensors` were saved, for the size.
        float32_bytes (`int`, *optional*): Size of the uncompressed float32 weights.
        coreml_bytes (`int`, *optional*): Weight-file size of the Core ML export, shown next to the safetensors size.
        size_report (`str` or `Callable[[Path], str]`, *optional*): As for `prepare_publish_folder`.
        reference_ranges, reference_label: See `build_model_card`.

    Returns:
        `list[str]`: Markdown blocks.
    """
    size = None
    if compression and folder is not None and list(Path(folder).glob("model*.safetensors")):
        size = {
            "checkpoint_bytes": folder_size_bytes(folder, "model*.safetensors"),
            "label": "this checkpoint (safetensors on disk)",
        }
        if float32_bytes:
            size["float32_bytes"] = float32_bytes
        if coreml_bytes:
            size["coreml_bytes"] = coreml_bytes
        if callable(size_report):
            size_report = size_report(Path(folder))
    else:
        size_report = None if callable(size_report) else size_report
    parts = compression_section(compression, size=size, size_report=size_report)
    if float_metrics:
        parts += metrics_section(metrics, float_metrics, float_label=float_label, compressed=bool(compression))
    parts += ranges_section(weight_ranges(model), reference_ranges, reference_label)
    if compression:
        parts += usage_section(_auto_class_name(model), compressed=True)
    return parts


def _metric_name(key: str) -> str:
    for prefix in ("eval_float_", "eval_", "test_", "predict_"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _is_quality_metric(key: str) -> bool:
    name = _metric_name(key)
    return not any(s in name for s in ("runtime", "_time", "per_second", "loss", "epoch", "samples", "steps"))


def _describe_compression(info: Mapping[str, Any]) -> str:
    method = info.get("method")
    if method == "dkm":
        dim = info.get("cluster_dim", 1)
        return (
            f"DKM palettization ({info.get('n_bits')}-bit, cluster_dim {dim}: {_fmt(info.get('bits_per_weight'))} "
            "bits per weight)"
        )
    a_bits = info.get("a_bits")
    acts = f", activations {a_bits}-bit" if a_bits else ""
    return f"{str(method).upper()} quantization (weights {info.get('w_bits')}-bit{acts})"


# ---------------------------------------------------------------------------------------------- publish folder
def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The content of `folder`'s `PUBLISH_MARKER`, or `None` if it has none (or not one hf_r2 wrote)."""
    try:
        data = json.loads((folder / PUBLISH_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("format") != PUBLISH_MARKER_FORMAT
        or not isinstance(data.get("files"), list)
    ):
        return None
    return data


def _write_marker(folder: Path) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.name != PUBLISH_MARKER)
    text = json.dumps({"format": PUBLISH_MARKER_FORMAT, "version": 1, "files": files}, indent=2) + "\n"
    (folder / PUBLISH_MARKER).write_text(text, encoding="utf-8")


def is_publish_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a publish folder written by hf_r2 (it holds the `PUBLISH_MARKER` file)."""
    return Path(folder).is_dir() and _read_marker(Path(folder)) is not None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_publish_dir(
    folder: str | os.PathLike, *, output_dir: str | os.PathLike | None = None, name: str = "The publish folder"
) -> Path:
    """Refuses a publish folder that hf_r2 may not (or cannot) replace, before any work is done.

    `prepare_publish_folder` replaces its folder as a whole. It may replace only a folder that hf_r2 itself created
    as a publish folder (it holds `PUBLISH_MARKER`) and that holds nothing but the files hf_r2 wrote there, or an
    empty one. A publish swap killed halfway is repaired first (see `hf_r2.utils.recover_replaced_dir`).

    Args:
        folder (`str` or `os.PathLike`): The publish folder.
        output_dir (`str` or `os.PathLike`, *optional*): The training run's output folder: the publish folder may not
            be it, contain it, or lie inside one of its `checkpoint-<step>` folders.
        name (`str`, *optional*): How the folder is named in error messages (e.g. `"--publish_dir"`).

    Returns:
        `Path`: `folder`.

    Raises:
        ValueError: If the folder is the output folder, contains it, is inside one of its checkpoints, is a file or a
            symbolic link, or exists holding files hf_r2 did not write there as a publish folder.
        PermissionError: If the folder (or the folder it would be created in) is not writable.
    """
    folder = Path(folder)
    restored = recover_replaced_dir(folder, owned=is_publish_folder)
    if restored is not None:
        logger.warning(
            f"{name} {folder} was missing and its previous version was found at {restored.name} (a publish swap "
            "interrupted between its two renames): restored it."
        )
    real = Path(os.path.realpath(folder))
    if output_dir is not None:
        out = Path(os.path.realpath(output_dir))
        if real == out:
            raise ValueError(
                f"{name} {folder} is the run's --output_dir: publishing replaces the whole folder, which would delete "
                f"the run's checkpoints, trainer_state.json and results. Use a subfolder such as {out / 'publish'} "
                "(the default) or another new folder."
            )
        if real in out.parents:
            raise ValueError(
                f"{name} {folder} contains the run's --output_dir {output_dir}: publishing replaces the whole folder, "
                f"which would delete the run. Use a subfolder of the output dir such as {out / 'publish'} "
                "(the default) or another new folder."
            )
        if out in real.parents:
            first = real.relative_to(out).parts[0]
            if _CHECKPOINT_FOLDER.fullmatch(first):
                raise ValueError(
                    f"{name} {folder} lies inside the checkpoint folder {out / first} of --output_dir, which the "
                    "Trainer deletes when it rotates checkpoints and reads when it resumes. Use "
                    f"{out / 'publish'} (the default) or a folder outside the checkpoints."
                )
    if folder.is_symlink():
        raise ValueError(f"{name} {folder} is a symbolic link; give the folder it points to, {real}, or a new folder.")
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{name} {folder} is a file, not a folder; give a new or empty folder.")
        entries = sorted(p.name for p in folder.iterdir())
        marker = _read_marker(folder)
        if entries and marker is None:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(
                f"{name} {folder} already exists and holds files that hf_r2 did not write there as a publish folder "
                f"({shown}; no {PUBLISH_MARKER}). Publishing replaces the whole folder, so it is refused: give a new "
                "or empty folder, or move these files away."
            )
        if marker is not None:
            foreign = [e for e in entries if e != PUBLISH_MARKER and e not in marker["files"]]
            if foreign:
                raise ValueError(
                    f"{name} {folder} is a publish folder written by hf_r2, but it now also holds {foreign[:5]}, which "
                    "hf_r2 did not write: publishing would delete them, so it is refused. Move them away or give "
                    "another folder."
                )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{name} {folder} is not writable; give a folder you can write to.")
    parent = _nearest_existing(real.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{name} {folder} cannot be written: {parent} is not a writable folder. Give a folder you can write to."
        )
    return folder


def resolve_publish_dir(training_args: Any, publish_args: Any, push: bool) -> Path | None:
    """The example scripts' publish folder: `--publish_dir`, else `<output_dir>/publish` when pushing, else `None`."""
    if publish_args.publish_dir:
        return Path(publish_args.publish_dir)
    return Path(training_args.output_dir) / "publish" if push else None


def _regularizer_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of R² regularizer modules attached to `model` (their parameters are training state)."""
    try:
        from hf_r2.range_regularizer import RangeRegularizer
    except ImportError:  # pragma: no cover - part of the package
        return []
    return [f"{name}." for name, module in model.named_modules() if name and isinstance(module, RangeRegularizer)]


def _save_model(model: nn.Module, folder: Path) -> list[str]:
    """`save_pretrained` without regularizer parameters; returns the state-dict keys left out."""
    prefixes = _regularizer_prefixes(model)
    if not prefixes:
        model.save_pretrained(folder)
        return []
    state = model.state_dict()
    dropped = [k for k in state if k.startswith(tuple(prefixes))]
    model.save_pretrained(folder, state_dict={k: v for k, v in state.items() if k not in dropped})
    return dropped


def verify_publish_folder(
    folder: str | os.PathLike,
    model: nn.Module,
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    ignore_keys: Sequence[str] = (),
    atol: float = 0.0,
) -> nn.Module:
    """Loads `folder` with `type(model).from_pretrained` and checks it reproduces `model`.

    Checks: no missing, unexpected or mismatched key; and either identical outputs on `inputs` (within `atol`) or,
    without inputs, identical tensors for every state-dict entry except `ignore_keys`.

    Returns:
        The loaded model (in eval mode).

    Raises:
        ValueError: Naming what differs.
    """
    loaded, info = type(model).from_pretrained(str(folder), output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"The folder {folder} does not load back cleanly into {type(model).__name__}: {problems}.")
    loaded.eval()
    if inputs is not None:
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            loaded.to(device)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.no_grad():
                want, got = model(**inputs), loaded(**inputs)
        finally:
            model.train(was_training)
        want_logits, got_logits = _first_tensor(want), _first_tensor(got)
        if want_logits.shape != got_logits.shape or not torch.allclose(want_logits, got_logits, atol=atol, rtol=0):
            diff = (want_logits - got_logits).abs().max().item() if want_logits.shape == got_logits.shape else "shape"
            raise ValueError(f"The folder {folder} loads back with different outputs (max abs difference {diff}).")
    else:
        want_state, got_state = model.state_dict(), loaded.state_dict()
        ignored = set(ignore_keys)
        differing = [
            k
            for k, v in want_state.items()
            if k not in ignored
            and (k not in got_state or got_state[k].shape != v.shape or not torch.equal(got_state[k].to(v.device), v))
        ]
        if differing:
            raise ValueError(f"The folder {folder} loads back with different tensors: {differing[:10]}.")
    return loaded


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    values = output.values() if isinstance(output, Mapping) else output
    return next(v for v in values if isinstance(v, torch.Tensor))


def prepare_publish_folder(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer: Any = None,
    model_name: str | None = None,
    r2: Mapping[str, Any] | None = None,
    compression: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    reference_weights: Mapping[str, torch.Tensor] | None = None,
    reference_ranges: Mapping[str, LayerWeightStats] | None = None,
    reference_label: str = "start of this run",
    histogram_layers: int = 4,
    float32_bytes: int | None = None,
    coreml_bytes: int | None = None,
    size_report: str | Callable[[Path], str] | None = None,
    verify: bool = True,
    verify_inputs: Mapping[str, torch.Tensor] | None = None,
    verify_atol: float = 0.0,
    **card_kwargs: Any,
) -> Path:
    """Writes the exact folder to publish, atomically, and (by default) checks it loads back identically.

    Contents: the `save_pretrained` weights (safetensors) and config without any R² regularizer parameter,
    `tokenizer` (a tokenizer or image processor) if given, `README.md` (see `build_model_card`),
    `weight_histograms.png` when `histogram_layers > 0`, and the `PUBLISH_MARKER` file (not uploaded) that lets a
    later call replace the folder. An existing `folder` is replaced only if hf_r2 wrote it (see `check_publish_dir`);
    the new folder gets the usual permissions (the umask).

    Args:
        model (`PreTrainedModel`): The trained (and, if compressed, finalized) model.
        folder (`str` or `os.PathLike`): Destination: a new or empty folder, or a publish folder written earlier
            by hf_r2; replaced only once the new folder is complete.
        tokenizer (*optional*): Tokenizer or image processor to save with the model.
        model_name (`str`, *optional*): Card title; defaults to the folder name.
        r2, compression, metrics, training: See `build_model_card`.
        reference_weights (`Mapping[str, torch.Tensor]`, *optional*): Weights of the histogram layers to overlay
            (e.g. `hf_r2.plotting.layer_weights(model, names)` taken before training); their names choose the
            histogram layers.
        reference_ranges (`Mapping[str, LayerWeightStats]`, *optional*): `hf_r2.analysis.weight_ranges` of the
            reference (same layers as the model's).
        reference_label (`str`, *optional*, defaults to `"start of this run"`): How the reference is named.
        histogram_layers (`int`, *optional*, defaults to 4): Layers in the figure when `reference_weights` is not
            given; 0 for no figure.
        float32_bytes (`int`, *optional*): Size of the uncompressed float32 weights, for the size table.
        coreml_bytes (`int`, *optional*): Weight-file size of the Core ML export (`hf_r2.export`), for the size
            table next to the safetensors size.
        size_report (`str` or `Callable[[Path], str]`, *optional*): Extra size report shown verbatim in the
            compression section, or a function computing it from the written folder (e.g. `dkm_size_report`).
        verify (`bool`, *optional*, defaults to `True`): Load the written folder back and compare (see
            `verify_publish_folder`) before it replaces `folder`.
        verify_inputs (`Mapping[str, torch.Tensor]`, *optional*): Model inputs for the output comparison.
        verify_atol (`float`, *optional*, defaults to 0): Largest absolute output difference accepted (0: identical).
        **card_kwargs: Passed to `build_model_card` (`base_model`, `dataset`, `pipeline_tag`, `auto_class`,
            `repo_id`, `license`, `language`, `extra_tags`).

    Returns:
        `Path`: The folder.

    Raises:
        ValueError, PermissionError: If `folder` may not be replaced (see `check_publish_dir`), before any work.
    """
    folder = check_publish_dir(folder)
    remove_stale_temp_dirs(folder, owned=is_publish_folder)
    tmp = make_temp_dir_beside(folder)
    try:
        _write_marker(tmp)  # first: the leftover of a killed run is recognisably hf_r2's (removed by the next run)
        dropped = _save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

        figure = None
        if reference_weights:
            names = list(reference_weights)
        elif histogram_layers > 0:
            names = pick_histogram_layers(model, histogram_layers)
        else:
            names = []
        if names:
            plot_weight_histograms(
                layer_weights(model, names),
                tmp / HISTOGRAM_FILE,
                reference=reference_weights,
                label="this model",
                reference_label=reference_label,
                title=model_name,
            )
            figure = HISTOGRAM_FILE

        size = {"checkpoint_bytes": folder_size_bytes(tmp), "label": "this checkpoint (safetensors on disk)"}
        if float32_bytes:
            size["float32_bytes"] = float32_bytes
        if coreml_bytes:
            size["coreml_bytes"] = coreml_bytes
        if callable(size_report):
            size_report = size_report(tmp)
        card = build_model_card(
            model_name=model_name or folder.name,
            r2=r2,
            compression=compression,
            metrics=metrics,
            ranges=weight_ranges(model),
            reference_ranges=reference_ranges,
            reference_label=reference_label,
            figure=figure,
            size=size,
            size_report=size_report,
            training=training,
            auto_class=card_kwargs.pop("auto_class", _auto_class_name(model)),
            **card_kwargs,
        )
        card.save(tmp / CARD_FILE)
        if verify:
            verify_publish_folder(tmp, model, inputs=verify_inputs, ignore_keys=dropped, atol=verify_atol)
        _write_marker(tmp)
        check_publish_dir(folder)  # again: the folder may have changed while this one was written
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def card_reference(
    model: nn.Module, reference: nn.Module, histogram_layers: int = 4
) -> tuple[dict[str, LayerWeightStats], dict[str, torch.Tensor] | None]:
    """Weight ranges and histogram weights of `reference` for the layers `model`'s card will show.

    Call it before training (with the model about to be trained, or a copy of another checkpoint) so that a
    reference that does not match fails early rather than after training.

    Args:
        model (`nn.Module`): The model to be published.
        reference (`nn.Module`): The model to compare with (e.g. the starting weights, or a run without R²).
        histogram_layers (`int`, *optional*, defaults to 4): Layers of the figure (0: no figure).

    Returns:
        `(reference_ranges, reference_weights)` for `prepare_publish_folder`.

    Raises:
        ValueError: If `reference` does not have the same measured layers as `model`.
    """
    ranges, own = weight_ranges(reference), weight_ranges(model)
    if list(ranges) != list(own):
        only_model = [n for n in own if n not in ranges][:5]
        only_ref = [n for n in ranges if n not in own][:5]
        raise ValueError(
            f"The card's reference ({type(reference).__name__}) has other layers than the model "
            f"({type(model).__name__}): only in the model {only_model}, only in the reference {only_ref}."
        )
    names = pick_histogram_layers(model, histogram_layers) if histogram_layers else []
    return ranges, (layer_weights(reference, names) if names else None)


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


def _auto_class_name(model: nn.Module) -> str:
    for suffix, auto in (
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForImageClassification", "AutoModelForImageClassification"),
        ("ForMaskedLM", "AutoModelForMaskedLM"),
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ):
        if type(model).__name__.endswith(suffix):
            return auto
    return "AutoModel"


# ------------------------------------------------------------------------------------------------------------ push
def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload hf_r2 checkpoint",
    endpoint: str | None = None,
    api: Any = None,
) -> Any:
    """Creates `repo_id` (if it does not exist) and uploads `folder` to it as one commit.

    Args:
        folder (`str` or `os.PathLike`): A folder written by `prepare_publish_folder`.
        repo_id (`str`): `"user/name"` or `"org/name"`.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        private (`bool`, *optional*): Visibility when the repository is created.
        revision (`str`, *optional*): Branch to commit to.
        commit_message (`str`, *optional*): Commit message.
        endpoint (`str`, *optional*): Hub endpoint (e.g. a private Hub); defaults to huggingface.co / `HF_ENDPOINT`.
        api (`huggingface_hub.HfApi`, *optional*): Client to use instead of `HfApi(endpoint, token)`.

    Returns:
        The `CommitInfo` of the upload.

    Raises:
        FileNotFoundError: If `folder` lacks the card, the config or the safetensors weights.
    """
    folder = Path(folder)
    missing = [n for n in (CARD_FILE, "config.json") if not (folder / n).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(f"{folder} is not a publish folder: {missing} missing (use prepare_publish_folder).")
    if not isinstance(repo_id, str) or not repo_id.strip("/") or repo_id.count("/") > 1:
        raise ValueError(f"repo_id must look like 'name' or 'user/name', got {repo_id!r}.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    target = getattr(url, "repo_id", None) or repo_id
    return api.upload_folder(
        repo_id=target,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
        ignore_patterns=[PUBLISH_MARKER],
    )


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


def read_card_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The YAML metadata of the card in `folder` (as a dict), e.g. to check its tags."""
    card = ModelCard.load(Path(folder) / CARD_FILE)
    return json.loads(json.dumps(card.data.to_dict()))

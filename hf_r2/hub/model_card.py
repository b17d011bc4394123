"""The model card of a regularized and/or compressed checkpoint: its metadata, sections and tags.

`build_model_card` renders the whole card of a publish folder: the R² settings, the compression with the checkpoint
size (the paper's Table 2), the evaluation metrics (before and after compression side by side when both are given),
the per-layer weight ranges and standard deviations (Table 6, optionally next to a reference), the weight-histogram
figure (Figure 2) and a usage snippet, with the tags `hf_r2` and `range-regularization`. `run_card_sections` renders
the hf_r2 sections that `R2Trainer.create_model_card` appends to the Trainer's own card in `output_dir`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from hf_r2.analysis import LayerWeightStats, format_weight_range_table, weight_ranges
from hf_r2.plotting import layer_weights, pick_histogram_layers
from hf_r2.utils import public_source_name

TAGS = ("hf_r2", "range-regularization")
CARD_FILE = "README.md"
#: Column title of the full-precision metrics in a card's before/after-compression table.
FLOAT_LABEL = "full precision"
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


def folder_size_bytes(folder: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    """Bytes on disk of the files matching `pattern` in `folder` (the weights of a `save_pretrained` folder)."""
    files = list(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"No {pattern} file in {folder}.")
    return sum(f.stat().st_size for f in files)


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
    ranges: Mapping[str, LayerWeightStats] | None = None,
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
        ranges (`Mapping[str, LayerWeightStats]`, *optional*): `hf_r2.analysis.weight_ranges(model)`, measured by the
            caller; under FSDP measuring gathers every weight (a collective), so the scripts measure on every process
            and write the card on the main one.

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
    parts += ranges_section(weight_ranges(model) if ranges is None else ranges, reference_ranges, reference_label)
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


def read_card_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The YAML metadata of the card in `folder` (as a dict), e.g. to check its tags."""
    card = ModelCard.load(Path(folder) / CARD_FILE)
    return json.loads(json.dumps(card.data.to_dict()))

"""The publish folder: the exact folder that would be uploaded, written atomically and checked to load back.

`prepare_publish_folder(model, folder, ...)` writes safetensors weights, config, tokenizer or image processor,
`README.md` (`hf_r2.hub.model_card`) and `weight_histograms.png`, without the regularizer's own parameters, and by
default checks that it loads back with `from_pretrained` with no missing or unexpected key and the same outputs
(`verify_publish_folder`). It never replaces a folder hf_r2 did not write as a publish folder (`check_publish_dir`:
each publish folder carries the marker `PUBLISH_MARKER`, which is not uploaded).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_r2.analysis import LayerWeightStats, weight_ranges
from hf_r2.hub.model_card import CARD_FILE, _auto_class_name, build_model_card, folder_size_bytes
from hf_r2.plotting import layer_weights, pick_histogram_layers, plot_weight_histograms
from hf_r2.utils import make_temp_dir_beside, recover_replaced_dir, remove_stale_temp_dirs, replace_dir

logger = logging.getLogger(__name__)
HISTOGRAM_FILE = "weight_histograms.png"
#: Marker file hf_r2 writes into every publish folder it creates, listing the files it wrote there. An existing folder
#: is replaced only if it holds this marker and nothing but the files the marker lists (plus the marker): hf_r2 never
#: deletes a folder, or a file, that it did not create as part of a publish folder. It is not uploaded.
PUBLISH_MARKER = ".hf_r2_publish.json"
PUBLISH_MARKER_FORMAT = "hf_r2 publish folder"
#: Name of the Trainer's checkpoint folders (`checkpoint-<step>`), which it deletes when rotating checkpoints.
_CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")


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

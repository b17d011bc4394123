"""Saving palettized models atomically.

`save_palettized(model, directory)` is `model.save_pretrained` written into a temporary folder first, then moved into
place file by file with `os.replace` (weights before `config.json`), so a crash never leaves a half-written file.
The size report of the paper's Table 2 moved to `hf_r2.palettization.size_report` (re-exported here).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hf_r2.palettization.config import PalettizationQuantizationConfig, attach_palettization_config
from hf_r2.palettization.size_report import PalettizedSizeReport, palettized_size_report  # former home

__all__ = ["PalettizedSizeReport", "palettized_size_report", "save_palettized"]

# Weight files (single, sharded, index) that an earlier save may have left and the new one would not overwrite.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def save_palettized(model, save_directory: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Saves a palettized model with `save_pretrained`, atomically per file.

    Attaches the `quantization_config` first if the model does not carry one yet (`attach_palettization_config` with
    the layers the model holds). Stale weight files of an earlier save in `save_directory` (other shards, an index that
    would shadow the new `model.safetensors`) are removed; other files there (tokenizer, checkpoints) are kept.

    Args:
        model (`PreTrainedModel`): A model with palettized layers (after DKM `finalize`).
        save_directory (`str` or `os.PathLike`): Target folder; created if needed.
        save_pretrained_kwargs: Passed to `model.save_pretrained` (not `push_to_hub`: push the folder afterwards).

    Returns:
        `Path`: `save_directory`.
    """
    if save_pretrained_kwargs.get("push_to_hub"):
        raise ValueError("save_palettized does not push: call it, then upload the folder (e.g. `upload_folder`).")
    if not isinstance(getattr(model.config, "quantization_config", None), PalettizationQuantizationConfig):
        attach_palettization_config(model)
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, **save_pretrained_kwargs)
        target.mkdir(exist_ok=True)
        written = sorted(p.name for p in tmp.iterdir())
        for old in target.iterdir():
            if old.is_file() and _WEIGHT_FILE.fullmatch(old.name) and old.name not in written:
                old.unlink()
        # config.json last: until it lands, a reader sees the previous complete config.
        for name in sorted(written, key=lambda n: n == "config.json"):
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

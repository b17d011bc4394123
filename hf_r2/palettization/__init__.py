"""DKM training-time palettization (paper section 3.3): `palettize` -> train -> `finalize`.

Example:
    ```python
    >>> from hf_r2.palettization import DKMConfig, finalize, palettize
    >>> model = palettize(model, DKMConfig(n_bits=2, cluster_dim=1))
    >>> trainer = transformers.Trainer(model=model, ...)  # no callback needed
    >>> trainer.train()
    >>> model = finalize(model)  # LUT + packed indices; save_pretrained writes the compact checkpoint
    >>> print(palettized_size_report(model))
    ```
"""

from . import hf_quantizer
from .config import DKMConfig, PalettizationQuantizationConfig, attach_palettization_config
from .functional import dkm_exact, dkm_grid, kmeans, nearest_centroid, soft_assignment
from .layers import DKMConv1D, DKMConv2d, DKMEmbedding, DKMLayerMixin, DKMLinear
from .model import dkm_layers, finalize, palettize, unpalettize
from .palettized_layers import (
    PalettizedConv1D,
    PalettizedConv2d,
    PalettizedEmbedding,
    PalettizedLinear,
    palettized_modules,
    to_palettized,
)
from .serialization import save_palettized
from .size_report import PalettizedSizeReport, palettized_size_report

__all__ = [
    "DKMConfig",
    "DKMConv1D",
    "DKMConv2d",
    "DKMEmbedding",
    "DKMLayerMixin",
    "DKMLinear",
    "PalettizedConv1D",
    "PalettizedConv2d",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizationQuantizationConfig",
    "PalettizedSizeReport",
    "attach_palettization_config",
    "dkm_exact",
    "dkm_grid",
    "dkm_layers",
    "finalize",
    "kmeans",
    "nearest_centroid",
    "palettize",
    "palettized_modules",
    "palettized_size_report",
    "save_palettized",
    "soft_assignment",
    "to_palettized",
    "unpalettize",
]

# `from_pretrained` loads palettized checkpoints once `hf_r2.palettization` is imported (`import hf_r2` does it).
hf_quantizer.register()

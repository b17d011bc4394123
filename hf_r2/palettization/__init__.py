"""DKM training-time palettization (paper section 3.3): `palettize` -> train -> `finalize`.

Example:
    ```python
    >>> from hf_r2.palettization import DKMConfig, finalize, palettize
    >>> model = palettize(model, DKMConfig(n_bits=2, cluster_dim=1))
    >>> trainer = transformers.Trainer(model=model, ...)  # no callback needed
    >>> trainer.train()
    >>> model = finalize(model)
    ```
"""

from .config import DKMConfig
from .functional import dkm_exact, dkm_grid, kmeans, nearest_centroid, soft_assignment
from .layers import DKMConv2d, DKMEmbedding, DKMLayerMixin, DKMLinear
from .model import dkm_layers, finalize, palettize

__all__ = [
    "DKMConfig",
    "DKMConv2d",
    "DKMEmbedding",
    "DKMLayerMixin",
    "DKMLinear",
    "dkm_exact",
    "dkm_grid",
    "dkm_layers",
    "finalize",
    "kmeans",
    "nearest_centroid",
    "palettize",
    "soft_assignment",
]

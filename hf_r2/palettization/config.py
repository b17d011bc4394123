"""Configuration of DKM training-time palettization, and the `quantization_config` of the palettized checkpoints it
produces (`PalettizationQuantizationConfig`, recorded on a model by `attach_palettization_config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_r2.palettization.format import PALETTIZATION_FORMAT_VERSION
from hf_r2.palettization.palettized_layers import palettized_modules
from hf_r2.utils import check_bits, check_cluster_dim

__all__ = ["QUANT_METHOD", "DKMConfig", "PalettizationQuantizationConfig", "attach_palettization_config"]

_INITS = ("kmeans++", "quantile")
_BACKENDS = ("auto", "grid", "exact")


@dataclass
class DKMConfig:
    """Settings of DKM (differentiable k-means) palettization, applied by `hf_r2.palettization.palettize`.

    Each targeted layer's weight is seen as vectors of `cluster_dim` consecutive output channels
    (`hf_r2.utils.weight_to_vectors`) and softly clustered into `2**n_bits` centroids at every forward pass, so training
    learns weights that survive palettization; `finalize` then stores each vector as a `n_bits`-bit index into a LUT,
    i.e. `n_bits / cluster_dim` bits per weight.

    Example:
        ```python
        >>> config = DKMConfig(n_bits=2, cluster_dim=1, exclude_modules=["classifier"])
        >>> DKMConfig.from_dict(config.to_dict()) == config
        True
        ```
    """

    n_bits: int = field(default=4, metadata={"help": "Bits per palette index: 2**n_bits centroids per layer (1-8)."})
    cluster_dim: int = field(
        default=1,
        metadata={
            "help": "Dimension d of the clustered vectors (d consecutive output channels at one input position); "
            "must divide every palettized layer's output channels. Effective bits per weight: n_bits / d."
        },
    )
    temperature: float = field(
        default=1e-4,
        metadata={
            "help": "Softmax temperature tau of DKM's attention softmax(-||w - c||^2 / tau), in units of a squared "
            "weight (the distance and default of coremltools' palett_tau). Smaller is closer to hard k-means."
        },
    )
    kmeans_iters: int = field(
        default=3,
        metadata={"help": "DKM iterations (attention -> centroid update) per forward pass, warm-started (>= 1)."},
    )
    convergence_eps: float = field(
        default=0.0,
        metadata={
            "help": "Stop the iterations early once no centroid moves by more than this (absolute); 0 runs all "
            "`kmeans_iters`."
        },
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or one regex (full match) to palettize. Default: every nn.Linear, "
            "nn.Conv2d and nn.Embedding, first and last layers included."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Module names or one regex to leave unpalettized."}
    )
    weight_threshold: int = field(
        default=0,
        metadata={"help": "Skip (leave dense) layers whose weight has fewer elements than this (>= 0)."},
    )
    init: str = field(
        default="kmeans++",
        metadata={"help": f"Centroid initialisation before training, followed by Lloyd k-means: one of {_INITS}."},
    )
    init_iters: int = field(default=20, metadata={"help": "Hard Lloyd k-means iterations after the initialisation."})
    backend: str = field(
        default="auto",
        metadata={
            "help": f"How the soft clustering is computed: one of {_BACKENDS}. 'exact' recomputes the N x 2**b "
            "attention in chunks, also in backward (exact DKM gradients, any cluster_dim). 'grid' (cluster_dim 1 only) "
            "resamples the 1-D weight distribution on a uniform grid, so a step costs O(N) instead of "
            "O(N * 2**b * iterations), with a small discretisation error. 'auto' takes 'grid' for a scalar layer when "
            "16 grid points per attention transition fit in `grid_size` points and in an eighth of its weights, "
            "'exact' otherwise."
        },
    )
    grid_size: int = field(
        default=16384,
        metadata={"help": "Most grid points per layer of the 'grid' backend (>= 64); 'grid' forced uses exactly this."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the k-means++ initialisation."})

    def __post_init__(self):
        check_bits(self.n_bits, "n_bits")
        check_cluster_dim(self.cluster_dim)  # whether it divides a layer's output channels is checked per layer
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}.")
        if not _is_int(self.kmeans_iters) or self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be an integer >= 1, got {self.kmeans_iters!r}.")
        if not isinstance(self.convergence_eps, (int, float)) or self.convergence_eps < 0:
            raise ValueError(f"convergence_eps must be a number >= 0, got {self.convergence_eps!r}.")
        if not _is_int(self.weight_threshold) or self.weight_threshold < 0:
            raise ValueError(f"weight_threshold must be an integer >= 0, got {self.weight_threshold!r}.")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}.")
        if not _is_int(self.init_iters) or self.init_iters < 0:
            raise ValueError(f"init_iters must be an integer >= 0, got {self.init_iters!r}.")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}.")
        if self.backend == "grid" and self.cluster_dim != 1:
            raise ValueError(f"backend='grid' needs cluster_dim=1, got cluster_dim={self.cluster_dim}; use 'exact'.")
        if not _is_int(self.grid_size) or self.grid_size < 64:
            raise ValueError(f"grid_size must be an integer >= 64, got {self.grid_size!r}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{name} must be a string (regex), a list of names or None, got {value!r}.")

    @property
    def n_clusters(self) -> int:
        """Number of centroids, `2**n_bits`."""
        return 2**self.n_bits

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DKMConfig:
        """Builds a config from `to_dict`'s output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown DKMConfig keys {unknown}; known keys: {sorted(known)}.")
        return cls(**config)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


QUANT_METHOD = "hf_r2_palettization"


@dataclass
class PalettizationQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of an hf_r2 palettized checkpoint (one entry per palettized layer).

    Example:
        ```python
        >>> spec = {"n_bits": 2, "cluster_dim": 1, "shape": [2, 8]}
        >>> config = PalettizationQuantizationConfig(layers={"classifier": spec})
        >>> config.to_dict()["quant_method"]
        'hf_r2_palettization'
        ```
    """

    layers: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Palettized layers by full module name: {'n_bits': 1-8, 'cluster_dim': d >= 1, 'shape': dense "
            "weight shape}."
        },
    )
    format_version: int = field(
        default=PALETTIZATION_FORMAT_VERSION,
        metadata={"help": "On-disk layout version (see hf_r2.palettization.format); newer ones are refused."},
    )
    quant_method: str = field(
        default=QUANT_METHOD, metadata={"help": f"transformers quantization method name; always {QUANT_METHOD!r}."}
    )

    def __post_init__(self):
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}.")
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"format_version must be a positive integer, got {self.format_version!r}.")
        if self.format_version > PALETTIZATION_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses palettization format version {self.format_version}, newer than the "
                f"{PALETTIZATION_FORMAT_VERSION} this hf_r2 reads: upgrade hf_r2."
            )
        if not isinstance(self.layers, dict) or not self.layers:
            raise ValueError(f"layers must be a non-empty dict of palettized layers, got {self.layers!r}.")
        for name, spec in self.layers.items():
            if not isinstance(spec, dict):
                raise ValueError(f"quantization_config layer {name!r}: expected a dict, got {spec!r}.")
            missing = {"n_bits", "cluster_dim", "shape"} - set(spec)
            if missing:
                raise ValueError(f"quantization_config layer {name!r} lacks {sorted(missing)}: got {spec!r}.")
            n_bits, cluster_dim, shape = spec["n_bits"], spec["cluster_dim"], spec["shape"]
            try:
                check_bits(n_bits, "n_bits")
            except ValueError:
                raise ValueError(
                    f"quantization_config layer {name!r}: n_bits must be in 1..8, got {n_bits!r}."
                ) from None
            try:
                check_cluster_dim(cluster_dim)
            except ValueError as err:
                raise ValueError(f"quantization_config layer {name!r}: {err}") from None
            if (
                not isinstance(shape, (list, tuple))
                or not shape
                or not all(isinstance(s, int) and s > 0 for s in shape)
            ):
                raise ValueError(
                    f"quantization_config layer {name!r}: shape must be a list of positive ints, got {shape!r}."
                )
            check_cluster_dim(cluster_dim, shape, name=f"quantization_config layer {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "layers": {name: dict(spec, shape=list(spec["shape"])) for name, spec in self.layers.items()},
        }


def attach_palettization_config(model: nn.Module, layers: Mapping[str, Mapping[str, Any]] | None = None):
    """Records the palettized layers in `model.config.quantization_config`, so `save_pretrained` writes a checkpoint
    that `from_pretrained` (after `import hf_r2`) loads back into the same palettized layers.

    Args:
        model (`PreTrainedModel`): A model whose palettized layers were built with `to_palettized`.
        layers (`dict[str, dict]`, *optional*): `{"layer name": {"n_bits": b, "cluster_dim": d}}` for every palettized
            layer; checked against the layers themselves. Defaults to what the model holds.

    Returns:
        `PalettizationQuantizationConfig`: The attached config.

    Raises:
        ValueError: If a listed layer is missing or not palettized, its bits/dims disagree with the layer, a
            palettized layer is not listed, or a palettized weight is tied to another module.
    """
    if getattr(model, "config", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no `config`: attach_palettization_config needs a transformers PreTrainedModel."
        )
    found = palettized_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no palettized layer: run DKM finalize (or to_palettized) first.")
    if layers is None:
        layers = {name: {"n_bits": m.n_bits, "cluster_dim": m.cluster_dim} for name, m in found.items()}
    unknown = sorted(set(layers) - set(found))
    if unknown:
        raise ValueError(f"layers {unknown} are not palettized layers of {type(model).__name__}.")
    unlisted = sorted(set(found) - set(layers))
    if unlisted:
        raise ValueError(f"palettized layers {unlisted} are missing from `layers`; list every palettized layer.")
    tied = _tied_weight_names(model)
    specs = {}
    for name, module in found.items():
        spec = dict(layers[name])
        for key in ("n_bits", "cluster_dim"):
            if key not in spec or spec[key] != getattr(module, key):
                raise ValueError(
                    f"layers[{name!r}][{key!r}] is {spec.get(key)!r} but the layer has {key}={getattr(module, key)}."
                )
        if f"{name}.weight" in tied:
            raise ValueError(
                f"The weight of {name!r} is tied to another module's weight; palettizing tied weights is not "
                "supported (exclude the layer or untie the weights)."
            )
        module.layer_name = name
        specs[name] = {"n_bits": module.n_bits, "cluster_dim": module.cluster_dim, "shape": list(module.dense_shape)}
    config = PalettizationQuantizationConfig(layers=specs)
    model.config.quantization_config = config
    return config


def _tied_weight_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())

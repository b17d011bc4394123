"""Configuration of DKM training-time palettization."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

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
        if not _is_int(self.n_bits) or not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits must be an integer in 1..8, got {self.n_bits!r}.")
        if not _is_int(self.cluster_dim) or self.cluster_dim < 1:
            raise ValueError(f"cluster_dim must be an integer >= 1, got {self.cluster_dim!r}.")
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

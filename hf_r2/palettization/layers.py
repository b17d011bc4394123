"""DKM wrapper layers: subclasses of the layers they replace, so `weight` / `bias` keep their state-dict names.

`palettize` turns an existing `nn.Linear` / `nn.Conv2d` / `nn.Embedding` into its DKM subclass in place (its class is
swapped and a `centroids` buffer added), so parameters, devices, hooks and optimizer references are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..utils import vectors_to_weight, weight_to_vectors
from .config import DKMConfig
from .format import output_channels_first
from .functional import dkm_exact, dkm_grid, grid_bounds, grid_points_needed, kmeans, nearest_centroid


class DKMLayerMixin:
    """Shared DKM state and weight computation of `DKMLinear`, `DKMConv2d` and `DKMEmbedding`.

    Attributes:
        centroids (`torch.Tensor`): `(2**n_bits, cluster_dim)` float32 buffer, warm-started from step to step.
        dkm_config (`DKMConfig`): The layer's settings.

    In training mode the forward pass uses the soft-clustered weight `A C` (gradients reach `weight` through all DKM
    iterations) and stores the new centroids. In eval mode it uses the hard-assigned weight that `finalize` would
    produce (no centroid update), so evaluation during DKM training shows the palettized model's quality.
    """

    base_class: type[nn.Module]

    def _setup_dkm(self, config: DKMConfig, generator: torch.Generator | None = None) -> None:
        self.dkm_config = config
        with torch.no_grad():
            vectors = weight_to_vectors(output_channels_first(self).detach().float().cpu(), config.cluster_dim)
            centroids = kmeans(vectors, config.n_clusters, config.init_iters, config.init, generator=generator)
        self.register_buffer("centroids", centroids.to(self.weight.device))

    def dkm_grid_size(self, bounds: tuple[float, float] | None = None) -> int | None:
        """Grid points the 'grid' backend uses for the current weights and centroids, or `None` for 'exact'.

        'auto' takes the grid when `grid_points_needed` (16 points per attention transition) over the span the grid
        must resolve (`grid_bounds`: heavy tails beyond the outermost centroids are saturated and need no points) fits
        in `config.grid_size` and is at most an eighth of the weights (else the grid saves nothing).
        """
        plan = self._grid_plan(bounds)
        return None if plan is None else plan[0]

    def _grid_plan(self, bounds: tuple[float, float] | None = None) -> tuple[int, tuple[float, float]] | None:
        """`(grid_size, grid span)` of the 'grid' backend, or `None` for 'exact'; `bounds` are the weights' min/max."""
        config = self.dkm_config
        if config.backend == "exact" or config.cluster_dim != 1:
            return None
        if bounds is None:
            bounds = tuple(torch.stack(torch.aminmax(self.weight.detach().float())).tolist())
        if config.backend == "grid":
            return config.grid_size, bounds
        span = grid_bounds(bounds, self.centroids, config.temperature)
        size = self._auto_grid_size(span)
        return None if size is None else (size, span)

    def _auto_grid_size(self, span: tuple[float, float]) -> int | None:
        config = self.dkm_config
        needed = grid_points_needed(span, self.centroids, config.temperature)
        size = max(256, -(-needed // 64) * 64)
        return size if size <= config.grid_size and 8 * size <= self.weight.numel() else None

    def soft_weight(self, update: bool = True) -> torch.Tensor:
        """The DKM soft-clustered weight `A C` (differentiable w.r.t. `weight`); `update` stores the new centroids."""
        config = self.dkm_config
        weight = self.weight.float()
        start = self.centroids.float().clone()  # saved for backward, while the buffer is updated in place
        bounds = None
        if config.cluster_dim == 1 and config.backend != "exact":
            bounds = tuple(torch.stack(torch.aminmax(weight.detach())).tolist())
        plan = self._grid_plan(bounds)
        soft = None
        if plan is not None:
            grid_size, span = plan
            report = {}
            soft, new = self._grid(weight, start, grid_size, span, report)
            if not report["saturated"]:  # the centroids moved too far for the narrowed span: resolve the whole range
                size, soft = self._auto_grid_size(bounds), None
                if size is not None:
                    soft, new = self._grid(weight, start, size, bounds, None)
        if soft is None:
            weight = output_channels_first(self, weight)
            vectors = weight_to_vectors(weight, config.cluster_dim)
            soft, new = dkm_exact(vectors, start, config.temperature, config.kmeans_iters, config.convergence_eps)
            soft = output_channels_first(self, vectors_to_weight(soft, weight.shape, config.cluster_dim))
        if update:
            with torch.no_grad():
                self.centroids.copy_(new)
        return soft.to(self.weight.dtype)

    def _grid(self, weight, start, grid_size, span, report):
        config = self.dkm_config
        soft, new = dkm_grid(
            weight.reshape(-1),
            start,
            config.temperature,
            config.kmeans_iters,
            config.convergence_eps,
            grid_size,
            span,
            report,
        )
        return soft.reshape(weight.shape), new

    @torch.no_grad()
    def hard_assignment(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(lut, indices)`: the current centroids `(k, d)` and each weight vector's nearest centroid `(N,)`."""
        vectors = weight_to_vectors(output_channels_first(self).detach().float(), self.dkm_config.cluster_dim)
        return self.centroids.clone(), nearest_centroid(vectors, self.centroids)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The weight with every vector replaced by its nearest centroid (at most 2**n_bits distinct vectors)."""
        lut, indices = self.hard_assignment()
        shape = output_channels_first(self).shape
        hard = vectors_to_weight(lut[indices], shape, self.dkm_config.cluster_dim)
        return output_channels_first(self, hard).to(self.weight.dtype)

    def palettized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: soft (training) or hard (eval)."""
        return self.soft_weight() if self.training else self.hard_weight()

    def extra_repr(self) -> str:
        config = self.dkm_config
        return (
            f"{super().extra_repr()}, n_bits={config.n_bits}, cluster_dim={config.cluster_dim}, "
            f"temperature={config.temperature}, backend={config.backend!r}"
        )


class DKMLinear(DKMLayerMixin, nn.Linear):
    """`nn.Linear` trained with DKM palettization."""

    base_class = nn.Linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.palettized_weight(), self.bias)


class DKMConv2d(DKMLayerMixin, nn.Conv2d):
    """`nn.Conv2d` trained with DKM palettization."""

    base_class = nn.Conv2d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.palettized_weight(), self.bias)


class DKMEmbedding(DKMLayerMixin, nn.Embedding):
    """`nn.Embedding` trained with DKM palettization (vectors run along `num_embeddings`, the output channels)."""

    base_class = nn.Embedding

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            input,
            self.palettized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


class DKMConv1D(DKMLayerMixin, Conv1D):
    """transformers' `Conv1D` (GPT-2's Linear with an `(in, out)` weight) trained with DKM palettization; vectors run
    along the output channels, as for `DKMLinear`."""

    base_class = Conv1D

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        size_out = input.size()[:-1] + (self.nf,)
        output = torch.addmm(self.bias, input.reshape(-1, input.size(-1)), self.palettized_weight())
        return output.view(size_out)


DKM_LAYERS: dict[type[nn.Module], type[DKMLayerMixin]] = {
    Conv1D: DKMConv1D,
    nn.Linear: DKMLinear,
    nn.Conv2d: DKMConv2d,
    nn.Embedding: DKMEmbedding,
}

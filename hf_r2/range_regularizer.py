"""`RangeRegularizer`: the total R² range loss of a model, with its learnable margins / temperatures.

State-dict layout: the regularizer registers only its own parameters, never the model.

* `r2_type="margin"`: one parameter `margins` of shape `(n_layers, cluster_dim)`,
* `r2_type="soft_min_max"`: one parameter `alphas` of shape `(n_layers, cluster_dim)`,
* `r2_type="linf"`: no parameter (an empty state dict).

Row `i` belongs to `layer_names[i]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_r2 import regularizers as R
from hf_r2.utils import check_cluster_dim, select_modules

__all__ = ["R2Config", "RangeRegularizer", "SUPPORTED_LAYER_TYPES"]


def _transposed_layer_types() -> tuple[type[nn.Module], ...]:
    try:  # GPT-2 style models use transformers' Conv1D: a Linear whose weight is stored as (in, out).
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but the math does not need it
        return ()
    return (Conv1D,)


_TRANSPOSED_LAYER_TYPES = _transposed_layer_types()

#: Layer types whose `weight` is regularized by default.
SUPPORTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Embedding,
    *_TRANSPOSED_LAYER_TYPES,
)


@dataclass
class R2Config:
    """Configuration of R² range regularization (Kundu et al., section 2)."""

    r2_type: str = field(metadata={"help": f"Range regularizer: one of {list(R.R2_TYPES)}."})
    cluster_dim: int = field(
        default=1,
        metadata={
            "help": "Vector dimension d: regularize the range of each of the d coordinates of the d-dimensional "
            "vectors that vector palettization clusters (d consecutive output channels). Must divide the output "
            "channels of every targeted layer."
        },
    )
    margin_init_std: float = field(
        default=2.0, metadata={"help": "r2_type='margin': initial margin in multiples of std(W) (the paper uses 2)."}
    )
    alpha_init: float = field(
        default=0.1, metadata={"help": "r2_type='soft_min_max': initial temperature alpha (the paper uses 0.1)."}
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or one regex (full match) to regularize. Default: the weight of "
            "every nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding and transformers Conv1D, first and last layers "
            "included."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Module names (suffix match) or one regex (full match) to skip."}
    )

    def __post_init__(self) -> None:
        if self.r2_type not in R.R2_TYPES:
            raise ValueError(f"Unknown r2_type {self.r2_type!r}; allowed: {list(R.R2_TYPES)}.")
        if not isinstance(self.cluster_dim, int) or isinstance(self.cluster_dim, bool) or self.cluster_dim < 1:
            raise ValueError(f"cluster_dim must be an integer >= 1, got {self.cluster_dim!r}.")
        if not isinstance(self.margin_init_std, (int, float)) or not (
            math.isfinite(self.margin_init_std) and self.margin_init_std > 0
        ):
            raise ValueError(f"margin_init_std must be a finite number > 0, got {self.margin_init_std!r}.")
        if not isinstance(self.alpha_init, (int, float)) or not math.isfinite(self.alpha_init):
            raise ValueError(f"alpha_init must be a finite number, got {self.alpha_init!r}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            value = list(value)
            if not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be None, a regex string or a non-empty list of names, got {value!r}.")
            setattr(self, name, value)


class RangeRegularizer(nn.Module):
    """Computes `Σ_layers R(W_layer)` for one of the three R² regularizers over the targeted layers of a model.

    The model is not registered as a submodule: the regularizer keeps references to the targeted modules and reads
    `module.weight` at every call, so it follows `model.to(...)` and DDP wrapping (which keeps the modules).

    Args:
        model (`nn.Module`): The model whose weights are regularized.
        config (`R2Config`): Which regularizer and which layers.

    Example:
        ```python
        reg = RangeRegularizer(model, R2Config(r2_type="margin"))
        optimizer = torch.optim.AdamW([*model.parameters(), *reg.parameters()])
        loss = task_loss + 0.01 * reg()
        ```
    """

    def __init__(self, model: nn.Module, config: R2Config) -> None:
        super().__init__()
        self.config = config
        modules = select_modules(
            model,
            SUPPORTED_LAYER_TYPES,
            config.target_modules,
            config.exclude_modules,
            what="R² range regularization",
        )
        self.layer_names: list[str] = list(modules)
        # A plain list: nn.Module.__setattr__ would register a ModuleList and put the model into our state dict.
        self._layers: list[nn.Module] = list(modules.values())
        weights = [self._weight(i) for i in range(len(self._layers))]
        for name, w in zip(self.layer_names, weights, strict=True):
            check_cluster_dim(config.cluster_dim, w.shape, name=f"{name}.weight")

        if config.r2_type == "margin":
            init = torch.stack([R.init_margin(w, config.cluster_dim, config.margin_init_std) for w in weights])
            self.margins = nn.Parameter(init)
        elif config.r2_type == "soft_min_max":
            init = torch.stack([R.init_alpha(w, config.cluster_dim, config.alpha_init) for w in weights])
            self.alphas = nn.Parameter(init)

    def _weight(self, i: int) -> torch.Tensor:
        layer = self._layers[i]
        # Conv1D stores (in, out): transpose so that dim 0 holds the output channels, as for every other layer.
        return layer.weight.t() if isinstance(layer, _TRANSPOSED_LAYER_TYPES) else layer.weight

    def weights(self) -> list[torch.Tensor]:
        """The targeted weights (output channels first), in `layer_names` order."""
        return [self._weight(i) for i in range(len(self._layers))]

    def layer_losses(self) -> torch.Tensor:
        """The differentiable per-layer losses, a `float32` tensor of shape `(n_layers,)`."""
        d = self.config.cluster_dim
        weights = self.weights()
        if self.config.r2_type == "linf":
            losses = [R.linf(w, d) for w in weights]
        elif self.config.r2_type == "margin":
            losses = [R.margin(w, self.margins[i].to(w.device), d) for i, w in enumerate(weights)]
        else:
            losses = [R.soft_min_max(w, self.alphas[i].to(w.device), d) for i, w in enumerate(weights)]
        return torch.stack(losses)

    def forward(self) -> torch.Tensor:
        """Returns the total range loss, a differentiable scalar `float32` tensor.

        Raises:
            ValueError: If the loss is not finite, naming the first offending layer.
        """
        losses = self.layer_losses()
        total = losses.sum()
        if not torch.isfinite(total):
            self._raise_non_finite(losses)
        return total

    def _raise_non_finite(self, losses: torch.Tensor) -> None:
        values = losses.detach().cpu().tolist()
        bad = [(n, v) for n, v in zip(self.layer_names, values, strict=True) if not math.isfinite(v)]
        name, value = bad[0] if bad else ("<sum>", float("nan"))
        raise ValueError(
            f"R² {self.config.r2_type} range loss is not finite ({value}) for layer {name!r}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: its weight (or the regularizer's own "
            "parameter) holds NaN/inf."
        )

    def per_layer_losses(self) -> dict[str, float]:
        """The per-layer range losses as Python floats, by layer name (for debugging and tests)."""
        with torch.no_grad():
            values = self.layer_losses().cpu().tolist()
        return dict(zip(self.layer_names, values, strict=True))

    def extra_repr(self) -> str:
        config = self.config
        return f"r2_type={config.r2_type!r}, cluster_dim={config.cluster_dim}, n_layers={len(self.layer_names)}"

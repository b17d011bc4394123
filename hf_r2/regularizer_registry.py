"""The registry of R² range regularizers: one `RegularizerSpec` per `--r2_type` name.

A regularizer is everything `RangeRegularizer`, `R2TrainingArguments`, the model card and the documentation need to
know about it, in one place:

* `loss`: the pure function of one weight (the readable definition, `hf_r2.regularizers`);
* `fused`: optionally, a kernel computing every layer's loss at once (`hf_r2.range_regularizer`); without one, the
  layers are looped over with `loss`;
* `parameter`: optionally, its learnable per-layer parameter (`LearnableParameter`: name, initialisation, default
  learning rate of its own Adam, units, floor);
* `sparse_gradient`: whether its weight gradient may come back sparse (then `.grad` is densified after accumulation);
* `options`: the `R2Config` fields it reads (the model card lists only those).

The three regularizers of the paper are registered by `hf_r2.range_regularizer`; a new one is one file that defines
its function and calls `register_regularizer` (see `docs/adding-a-method.md`). This module imports nothing of hf_r2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_PARAMETER_LEARNING_RATE",
    "LearnableParameter",
    "RegularizerSpec",
    "get_regularizer",
    "register_regularizer",
    "regularizer_names",
    "unregister_regularizer",
]

#: Default learning rate of a learnable parameter's own Adam (`R2Config.learning_rate`, `--r2_learning_rate`).
DEFAULT_PARAMETER_LEARNING_RATE = 0.01


@dataclass(frozen=True)
class LearnableParameter:
    """The learnable parameter of a regularizer: one row of `cluster_dim` values per regularized layer.

    Args:
        name (`str`): Attribute and state-dict name on `RangeRegularizer` (`"margins"`); its Adam state is saved as
            `<name>_exp_avg` / `<name>_exp_avg_sq`.
        init (`Callable`): `init(weights, config) -> Tensor` of shape `(n_layers, config.cluster_dim)`, float32, on
            the weights' device; `weights` are the layers' weights (output channels first), `config` the `R2Config`.
        learning_rate (`float`, *optional*, defaults to `DEFAULT_PARAMETER_LEARNING_RATE`): Default learning rate of
            its own Adam (`RangeRegularizer.step_parameters`) when `R2Config.learning_rate` is not given.
        std_exponent (`int`, *optional*, defaults to 0): How the parameter scales with a layer's std when it is
            stored in absolute units (`scale_free=False`): Adam's step, taken in scale-free units, is multiplied by
            `std ** std_exponent` (a margin: 1, a temperature: -1; 0: no conversion).
        floor (`Callable`, *optional*): `floor(config) -> float | None`, a lower bound the parameter is clamped to
            after every step (`None`: no bound).
    """

    name: str
    init: Callable[[Sequence[torch.Tensor], Any], torch.Tensor]
    learning_rate: float = DEFAULT_PARAMETER_LEARNING_RATE
    std_exponent: int = 0
    floor: Callable[[Any], float | None] | None = None


@dataclass(frozen=True)
class RegularizerSpec:
    """One R² regularizer, registered under its `--r2_type` name.

    Args:
        name (`str`): The `--r2_type` value (not `"none"`).
        loss (`Callable`): The pure function of one weight. Without a parameter: `loss(weight, cluster_dim=d)`; with
            one: `loss(weight, param, cluster_dim=d, scale=unit)` where `param` is the layer's `(d,)` row and `unit`
            the detached per-coordinate std when `scale_free` (else `None`). Returns a scalar float32 tensor.
        description (`str`): One line for `--r2_type`'s help and the docs.
        fused (`Callable`, *optional*): `fused(weights, param, config) -> Tensor` of shape `(n_layers,)`, the
            per-layer losses of all layers at once, equal to `loss` (`param` is `None` without a parameter).
            Without it, `RangeRegularizer` loops over the layers with `loss`.
        parameter (`LearnableParameter`, *optional*): The learnable parameter, if any.
        sparse_gradient (`bool`, *optional*, defaults to `False`): Whether the weight gradient may be a sparse tensor.
        options (`tuple[str, ...]`, *optional*): The `R2Config` fields, besides the common ones, this regularizer
            reads (e.g. `("margin_init_std", "scale_free")`).
        pulls_bulk (`bool`, *optional*, defaults to `False`): Whether its gradient pulls the tails of every layer's
            bulk, not only the outliers (then `r2_mode="decoupled"` above a small `r2_weight` is warned about).
    """

    name: str
    loss: Callable[..., torch.Tensor]
    description: str
    fused: Callable[[Sequence[torch.Tensor], torch.Tensor | None, Any], torch.Tensor] | None = None
    parameter: LearnableParameter | None = None
    sparse_gradient: bool = False
    options: tuple[str, ...] = ()
    pulls_bulk: bool = False

    @property
    def default_learning_rate(self) -> float:
        """The learning rate of the parameter's own Adam when none is given (the module default without one)."""
        return DEFAULT_PARAMETER_LEARNING_RATE if self.parameter is None else self.parameter.learning_rate


_REGISTRY: dict[str, RegularizerSpec] = {}


def register_regularizer(spec: RegularizerSpec) -> RegularizerSpec:
    """Registers `spec` under `spec.name`; `R2Config`, `--r2_type` and the model card then accept it.

    Raises:
        ValueError: If the name is taken, is `"none"`, or is not an identifier-like string.
    """
    if not isinstance(spec, RegularizerSpec):
        raise TypeError(f"register_regularizer takes a RegularizerSpec, got {type(spec).__name__}.")
    if not isinstance(spec.name, str) or not spec.name.isidentifier() or spec.name == "none":
        raise ValueError(f"A regularizer name must be an identifier other than 'none', got {spec.name!r}.")
    if spec.name in _REGISTRY:
        raise ValueError(f"A regularizer named {spec.name!r} is already registered.")
    if spec.parameter is not None and not spec.parameter.name.isidentifier():
        raise ValueError(f"The parameter name of {spec.name!r} must be an identifier, got {spec.parameter.name!r}.")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_regularizer(name: str) -> RegularizerSpec:
    """Removes a registered regularizer (e.g. one a test registered) and returns its spec."""
    if name not in _REGISTRY:
        raise ValueError(f"No regularizer named {name!r} is registered; registered: {regularizer_names()}.")
    return _REGISTRY.pop(name)


def regularizer_names() -> list[str]:
    """The registered `--r2_type` names, in registration order (without `"none"`)."""
    return list(_REGISTRY)


def get_regularizer(name: str) -> RegularizerSpec:
    """The spec registered under `name`.

    Raises:
        ValueError: For an unknown name, naming the allowed ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown r2_type {name!r}; allowed: {regularizer_names()}.") from None

"""`palettize` / `finalize`: the model-level DKM lifecycle."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..sharding import refuse_sharded_layers
from ..utils import (
    check_cluster_dim,
    refuse_multihead_attention,
    replace_submodule,
    select_modules,
    tied_weight_groups,
    vectors_to_weight,
)
from .config import QUANT_METHOD, DKMConfig, attach_palettization_config
from .format import output_channels_first, output_channels_first_shape
from .layers import DKM_LAYERS, DKMLayerMixin
from .palettized_layers import palettized_modules, plain_class_for, to_palettized

__all__ = ["dkm_layers", "finalize", "palettize", "unpalettize"]

logger = logging.getLogger(__name__)


def _refuse_tied_weights(model: nn.Module, layer_names, what: str) -> None:
    """Raises a `ValueError` naming every tied weight among `layer_names`' weights, and how to leave them out.

    `what` is `"palettize"` (the advice is to exclude the modules) or `"finalize"` (nothing was changed; untie).
    """
    groups = tied_weight_groups(model)
    tied = {}
    for name in layer_names:
        group = groups.get(f"{name}.weight")
        if group:
            tied[tuple(group)] = None
    if not tied:
        return
    modules = dict(model.named_modules())
    owners = sorted(
        {
            owner
            for group in tied
            for owner in (n.rpartition(".")[0] for n in group)
            if isinstance(modules.get(owner), tuple(DKM_LAYERS))
        }
    )
    described = "; ".join(" = ".join(group) for group in tied)
    if what == "palettize":
        fix = (
            f"Leave every module sharing it dense, e.g. exclude_modules={owners!r} (together with your other "
            "exclusions), or untie the weights before building the model (e.g. `config.tie_word_embeddings = False`)."
        )
    else:
        fix = (
            "Nothing was changed: the DKM layers and their centroids are intact. Give each module its own weight "
            "(e.g. `model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone())`) and call finalize again."
        )
    raise ValueError(
        f"{what}: tied weights cannot be palettized ({described} are one tensor, e.g. tied input embeddings and LM "
        "head). DKM would cluster the tensor for one module while the other uses it unclustered, and the compact "
        f"checkpoint cannot store a tied palettized weight. {fix}"
    )


def _validate(name: str, module: nn.Module, config: DKMConfig) -> None:
    if type(module) not in DKM_LAYERS:
        if isinstance(module, DKMLayerMixin):
            raise ValueError(f"Module {name!r} is already palettized ({type(module).__name__}).")
        supported = ", ".join(t.__name__ for t in DKM_LAYERS)
        raise ValueError(
            f"Module {name!r} is a {type(module).__name__}, a subclass DKM cannot wrap safely (supported exactly: "
            f"{supported}); leave it out with exclude_modules=[{name!r}]."
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        # nn.Embedding renormalizes rows in place during forward when max_norm is set: the weight would drift away
        # from its palette, and the compact layer refuses it at finalize.
        raise ValueError(
            f"Module {name!r} is an nn.Embedding with max_norm={module.max_norm}, which rewrites its weights in "
            f"forward and cannot be palettized; leave it out with exclude_modules=[{name!r}]."
        )
    if not torch.isfinite(module.weight).all():
        bad = int((~torch.isfinite(module.weight)).sum())
        raise ValueError(
            f"{name}.weight holds {bad} NaN/Inf value(s): k-means cannot cluster it. Fix or re-initialise the layer, "
            f"or leave it out with exclude_modules=[{name!r}]."
        )
    check_cluster_dim(config.cluster_dim, output_channels_first_shape(module), f"{name}.weight")
    n_vectors = module.weight.numel() // config.cluster_dim
    if n_vectors < config.n_clusters:
        raise ValueError(
            f"{name}.weight (shape {tuple(module.weight.shape)}) has {n_vectors} weight vectors of dimension "
            f"{config.cluster_dim}, fewer than the 2**{config.n_bits} = {config.n_clusters} centroids; lower n_bits, "
            f"exclude the layer (exclude_modules=[{name!r}], --dkm_exclude_modules {name}), or leave every layer this "
            f"small dense with weight_threshold={module.weight.numel() + 1} (--dkm_weight_threshold "
            f"{module.weight.numel() + 1})."
        )


def palettize(model: nn.Module, config: DKMConfig) -> nn.Module:
    """Prepares `model` for DKM training, in place: every targeted layer becomes its DKM subclass.

    Each `nn.Linear` / `nn.Conv2d` / `nn.Embedding` selected by `config.target_modules` / `config.exclude_modules`
    (default: all of them) with at least `config.weight_threshold` weights becomes a `DKMLinear` / `DKMConv2d` /
    `DKMEmbedding`, with centroids initialised by k-means on its weights. Train as usual (any `Trainer`, no callback);
    then call `finalize`. All layers are validated before any is changed.

    Args:
        model (`nn.Module`): The model (e.g. a `PreTrainedModel`), modified in place.
        config (`DKMConfig`): The settings.

    Returns:
        `nn.Module`: `model`, with `model.dkm_config` set.

    Raises:
        ValueError: On a layer whose output channels `cluster_dim` does not divide, a layer with fewer weight vectors
            than `2**n_bits`, an unsupported or already palettized layer, or a selection that matches nothing.

    Example:
        ```python
        >>> from transformers import MobileBertConfig, MobileBertForSequenceClassification
        >>> model = MobileBertForSequenceClassification(MobileBertConfig(num_hidden_layers=2))
        >>> model = palettize(model, DKMConfig(n_bits=4, exclude_modules=["classifier"]))
        >>> # ... train with transformers.Trainer / hf_r2.trainer.R2Trainer ...
        >>> model = finalize(model)  # weights hard-assigned: 16 distinct values per layer
        ```
    """
    if not isinstance(config, DKMConfig):
        raise TypeError(f"config must be a DKMConfig, got {type(config).__name__}.")
    selected = select_modules(
        model, tuple(DKM_LAYERS), config.target_modules, config.exclude_modules, what="DKM palettization"
    )
    selected = {n: m for n, m in selected.items() if m.weight.numel() >= config.weight_threshold}
    if not selected:
        raise ValueError(f"No layer has at least weight_threshold={config.weight_threshold} weights to palettize.")
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is not None and dict(existing).get("quant_method") != "hf_r2_palettization":
        raise ValueError(
            f"{type(model).__name__} is already compressed ({dict(existing).get('quant_method')!r} in "
            "config.quantization_config) and a checkpoint holds one compression method: palettize the dense model "
            "instead, or call `model.dequantize()` first to get plain layers."
        )
    refuse_multihead_attention(model, selected, "DKM palettization")
    for name, module in selected.items():
        _validate(name, module, config)
    # Refused here, before training, not at finalize: a tied weight has no compact form, and finding that out after
    # DKM training would throw the trained centroids away.
    _refuse_tied_weights(model, selected, "palettize")
    generator = torch.Generator().manual_seed(config.seed)
    for module in selected.values():
        module.__class__ = DKM_LAYERS[type(module)]
        module._setup_dkm(config, generator)
    model.dkm_config = config
    logger.info(
        "DKM: palettizing %d layers at %d bits, cluster_dim %d.", len(selected), config.n_bits, config.cluster_dim
    )
    return model


def dkm_layers(model: nn.Module) -> dict[str, DKMLayerMixin]:
    """The DKM layers of `model`, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DKMLayerMixin)}


@torch.no_grad()
def finalize(model: nn.Module, compress: bool | None = None) -> nn.Module:
    """Ends DKM training: hard-assigns every weight vector to its nearest final centroid, in place.

    The centroids are those of the last training forward pass (what eval mode already uses). Each DKM layer becomes a
    compressed layer (LUT + packed `n_bits` indices, `hf_r2.palettization.compressed.to_palettized`, and the model's
    `config.quantization_config` is set so `save_pretrained` / `from_pretrained` keep the compact form), or, with
    `compress=False`, returns to its plain class with a weight holding at most `2**n_bits` distinct vectors.

    Args:
        model (`nn.Module`): A model prepared by `palettize`.
        compress (`bool`, *optional*): Defaults to `True` for a model with a transformers `config` (the compressed
            layers record themselves there), `False` otherwise.

    Returns:
        `nn.Module`: `model`.
    """
    layers = dkm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DKM layer: call palettize(model, config) first.")
    has_config = getattr(model, "config", None) is not None
    if compress is None:
        compress = has_config
    if compress and not has_config:
        raise ValueError(
            f"finalize(compress=True) needs a transformers PreTrainedModel (with `config`), got "
            f"{type(model).__name__}; "
            "use compress=False for plain layers with hard-assigned weights."
        )
    # Everything that can fail is checked, and every hard assignment computed, before the first layer changes: a
    # refusal leaves the trained DKM model (centroids included) intact, ready for another finalize.
    _refuse_tied_weights(model, layers, "finalize")
    refuse_sharded_layers(layers, "finalize")
    if compress:
        existing = getattr(model.config, "quantization_config", None)
        if existing is not None and not (
            dict(existing).get("quant_method") == "hf_r2_palettization" and palettized_modules(model)
        ):
            raise ValueError(
                f"{type(model).__name__}.config already has a quantization_config "
                f"({dict(existing).get('quant_method')!r}): this model is already compressed by another method; "
                "finalize(compress=False) keeps plain layers with hard-assigned weights."
            )
    assignments = {}
    for name, layer in layers.items():
        # The centroids of the last training forward pass, as the eval-mode forward uses: the finalized model is
        # exactly the one evaluated during DKM training.
        lut, indices = layer.hard_assignment()
        if not torch.isfinite(lut).all():
            raise ValueError(f"DKM layer {name!r} has non-finite centroids (training diverged); nothing was finalized.")
        assignments[name] = (lut, indices.to(torch.uint8 if layer.dkm_config.n_clusters <= 256 else torch.long))
    specs = {}
    for name, layer in layers.items():
        config = layer.dkm_config
        lut, indices = assignments.pop(name)
        indices = indices.long()
        was_training = layer.training
        hard = vectors_to_weight(lut[indices], output_channels_first_shape(layer), config.cluster_dim)
        layer.weight.copy_(output_channels_first(layer, hard).to(layer.weight.dtype))
        layer.__class__ = layer.base_class
        del layer.centroids, layer.dkm_config
        layer.train(was_training)
        specs[name] = {"n_bits": config.n_bits, "cluster_dim": config.cluster_dim}
        if compress:
            replace_submodule(model, name, to_palettized(layer, lut, indices, config.n_bits, config.cluster_dim))
    if hasattr(model, "dkm_config"):
        del model.dkm_config
    if compress:
        attach_palettization_config(model, specs)
    return model


def unpalettize(model: nn.Module) -> nn.Module:
    """Turns every palettized layer of `model` back into its plain class, in place.

    Each layer keeps its decoded dense weight, now trainable again, and drops its LUT and packed indices; the model's
    `quantization_config` is removed, so `save_pretrained` then writes an ordinary dense checkpoint (e.g. for export
    tools that expect plain layers). For a model loaded with `from_pretrained`, `model.dequantize()` does the same.

    Returns:
        `nn.Module`: `model`.
    """
    for module in palettized_modules(model).values():
        plain = plain_class_for(module)
        for buffer in ("weight_lut", "weight_packed_indices", "weight_checksum"):
            module._buffers.pop(buffer, None)
            module._non_persistent_buffers_set.discard(buffer)
        for attribute in ("n_bits", "cluster_dim", "layer_name", "_dense_shape", "_loaded_packed_weight"):
            module.__dict__.pop(attribute, None)
        module.__class__ = plain
        module.weight.requires_grad_(True)
    config = getattr(model, "config", None)
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is not None and dict(quantization_config).get("quant_method") == QUANT_METHOD:
        del config.quantization_config
    return model

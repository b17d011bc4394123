"""Whole-model entry points: `quantize`, `calibrate`, `finalize`, and EWGS's Hessian-based delta update."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from hf_r2.palettization.palettized_layers import PalettizedMixin
from hf_r2.quantization.config import (
    HF_QUANT_METHOD,
    EWGSConfig,
    LSQConfig,
    PACTConfig,
    PTQConfig,
    QuantizationConfig,
    attach_hf_quantization_config,
)
from hf_r2.quantization.layers import (
    QuantConv1D,
    QuantConv2d,
    QuantizedConv1D,
    QuantizedConv2d,
    QuantizedLinear,
    QuantLinear,
)
from hf_r2.quantization.quantizers import (
    DoReFaWeightQuantizer,
    LSQInputQuantizer,
    LSQWeightQuantizer,
    PACTInputQuantizer,
    RTNInputQuantizer,
    RTNWeightQuantizer,
    WeightQuantizer,
    _all_reduce_mean,
)
from hf_r2.sharding import refuse_sharded_layers
from hf_r2.utils import refuse_multihead_attention, replace_submodule, select_modules, tied_weight_groups

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, Conv1D)
# Fake-quantized and finalized class of each supported type (Conv1D: transformers' GPT-2 Linear, weight (in, out)).
_QUANT_TYPES = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, Conv1D: QuantConv1D}
_FINALIZED_TYPES = {QuantLinear: QuantizedLinear, QuantConv2d: QuantizedConv2d, QuantConv1D: QuantizedConv1D}
_QUANTIZED = QuantLinear | QuantConv2d | QuantConv1D | QuantizedLinear | QuantizedConv2d | QuantizedConv1D

QuantizerFactory = Callable[[nn.Module, QuantizationConfig], tuple[WeightQuantizer, "nn.Module | None"]]
_HANDLERS: dict[type[QuantizationConfig], QuantizerFactory] = {}
_TRAINER_CALLBACKS: dict[type[QuantizationConfig], Callable[[], list[TrainerCallback]]] = {}


def register_quantize_handler(
    config_cls: type[QuantizationConfig], trainer_callbacks: Callable[[], list[TrainerCallback]] | None = None
):
    """Registers the function that builds `(weight_quantizer, input_quantizer)` for one layer under a config type.

    Args:
        config_cls (`type`): The method's config class (registered with `register_quantization_method`).
        trainer_callbacks (`Callable`, *optional*): Returns the `TrainerCallback`s a training run of the method needs
            (see `trainer_callbacks`); none by default.
    """

    def wrap(fn: QuantizerFactory) -> QuantizerFactory:
        _HANDLERS[config_cls] = fn
        if trainer_callbacks is not None:
            _TRAINER_CALLBACKS[config_cls] = trainer_callbacks
        return fn

    return wrap


def trainer_callbacks(config: QuantizationConfig) -> list[TrainerCallback]:
    """The `TrainerCallback`s a training run of `config`'s method needs (EWGS: `EWGSDeltaCallback`, without which
    its delta stays at its starting value); an empty list for the others."""
    for cls in type(config).__mro__:
        if cls in _TRAINER_CALLBACKS:
            return list(_TRAINER_CALLBACKS[cls]())
        if cls in _HANDLERS:  # the nearest registered handler decides (EWGSConfig subclasses LSQConfig)
            return []
    return []


@register_quantize_handler(LSQConfig)
def _lsq_quantizers(module: nn.Module, config: LSQConfig):
    delta = config.delta if isinstance(config, EWGSConfig) else None
    weight_q = LSQWeightQuantizer(module.weight, config.w_bits, eps=config.eps, ewgs_delta=delta)
    input_q = None
    if config.a_bits is not None:
        input_q = LSQInputQuantizer(config.a_bits, signed=config.a_signed, eps=config.eps, ewgs_delta=delta)
        input_q.to(device=module.weight.device)
    return weight_q, input_q


register_quantize_handler(EWGSConfig, trainer_callbacks=lambda: [EWGSDeltaCallback()])(_lsq_quantizers)


@register_quantize_handler(PACTConfig)
def _pact_quantizers(module: nn.Module, config: PACTConfig):
    weight_q = DoReFaWeightQuantizer(config.w_bits, rescale=config.dorefa_rescale)
    input_q = None
    if config.a_bits is not None:
        input_q = PACTInputQuantizer(
            config.a_bits, alpha_init=config.alpha_init, alpha_l2=config.alpha_l2, signed=config.a_signed
        ).to(device=module.weight.device)
    return weight_q, input_q


@register_quantize_handler(PTQConfig)
def _ptq_quantizers(module: nn.Module, config: PTQConfig):
    weight_q = RTNWeightQuantizer(config.w_bits, per_channel=config.per_channel, symmetric=config.symmetric)
    input_q = None
    if config.a_bits is not None:
        input_q = RTNInputQuantizer(config.a_bits, symmetric=config.a_symmetric).to(device=module.weight.device)
    return weight_q, input_q


def _handler(config: QuantizationConfig) -> QuantizerFactory:
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig (LSQConfig, EWGSConfig, ...), got {type(config)!r}.")
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise ValueError(f"No quantization handler is registered for {type(config).__name__}.")


def validate_quantization(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module]:
    """Checks that `quantize(model, config)` can run and give a checkpoint that loads; changes nothing.

    `quantize` calls it first. Call it yourself before training when quantization comes after it (PTQ), so that a
    bad selection or an incompatible model fails before the training time is spent.

    Returns:
        `dict[str, nn.Module]`: The layers `quantize` would replace, by name.

    Raises:
        ValueError: If the model is already quantized or palettized (a checkpoint holds one compression method), the
            selection matches nothing (or names a layer that is not a Linear/Conv2d), a selected weight is tied to
            another module's, or a selected weight holds NaN/Inf values.
    """
    _handler(config)
    already = [n for n, m in model.named_modules() if isinstance(m, _QUANTIZED)]
    if already:
        raise ValueError(f"Model is already quantized (e.g. {already[0]!r}); quantize a float model.")
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is not None and dict(existing).get("quant_method") == HF_QUANT_METHOD:
        existing = None  # ours, with no quantized layer yet: `from_pretrained` rebuilding the layers
    palettized = [n for n, m in model.named_modules() if isinstance(m, PalettizedMixin)]
    if palettized or existing is not None:
        method = dict(existing).get("quant_method") if existing is not None else "hf_r2_palettization"
        raise ValueError(
            f"{type(model).__name__} is already compressed ({method!r}"
            + (f", e.g. palettized layer {palettized[0]!r}" if palettized else "")
            + "), and a checkpoint holds one compression method: its quantization_config would be overwritten and "
            "the saved model would not load. Quantize the dense model instead (e.g. the input of the DKM run), or "
            "call `model.dequantize()` (or `hf_r2.palettization.unpalettize(model)`) first to quantize plain layers "
            "holding the palettized values."
        )
    selected = select_modules(
        model, SUPPORTED_TYPES, config.target_modules, config.exclude_modules, what=f"{type(config).__name__}"
    )
    refuse_multihead_attention(model, selected, type(config).__name__)
    groups = tied_weight_groups(model)
    tied = {name: groups[f"{name}.weight"] for name in selected if f"{name}.weight" in groups}
    if tied:
        described = "; ".join(" = ".join(group) for group in dict.fromkeys(tuple(g) for g in tied.values()))
        raise ValueError(
            f"Cannot quantize tied weights ({described} are one tensor, e.g. tied input embeddings and LM head): the "
            "quantized layer would stop sharing it, and the saved checkpoint would not load. Leave them in full "
            f"precision with exclude_modules={sorted(tied)!r} (together with your other exclusions), or untie the "
            "weights before building the model (e.g. `config.tie_word_embeddings = False`)."
        )
    for name, module in selected.items():
        # Meta placeholders (`from_pretrained` rebuilding the layers) have no values to check.
        if not module.weight.is_meta and not bool(torch.isfinite(module.weight).all()):
            bad = int((~torch.isfinite(module.weight)).sum())
            raise ValueError(
                f"{name}.weight holds {bad} NaN/Inf value(s): its quantization scale would be non-finite and the "
                f"checkpoint unloadable. Fix the weights (did training diverge?) or leave the layer out with "
                f"exclude_modules=[{name!r}]."
            )
    return selected


def quantize(model: nn.Module, config: QuantizationConfig) -> nn.Module:
    """Swaps the targeted `nn.Linear` / `nn.Conv2d` layers of `model`, in place, for fake-quantized ones.

    First and last layers are included unless excluded by name. Parameters keep their names (`...weight`,
    `...bias`); each layer gains a `weight_quantizer` and, with `a_bits`, an `input_quantizer`. Train as usual
    (any `transformers.Trainer`); then `finalize(model)` for integer weights.

    Args:
        model (`nn.Module`): The model, modified in place.
        config (`QuantizationConfig`): `LSQConfig`, `EWGSConfig`, `PACTConfig` or `PTQConfig`.

    Returns:
        `nn.Module`: `model` itself.

    Raises:
        ValueError: Everything `validate_quantization` refuses (nothing is changed then).

    Example:
        ```python
        from hf_r2.quantization import get_quantization_config, quantize

        quantize(model, get_quantization_config("lsq", w_bits=2, a_bits=2, exclude_modules=["classifier"]))
        ```
    """
    handler = _handler(config)
    selected = validate_quantization(model, config)
    for name, module in selected.items():
        base = next(t for t in _QUANT_TYPES if isinstance(module, t))  # Conv1D, Linear, Conv2d: unrelated types
        weight_q, input_q = handler(module, config)
        replace_submodule(model, name, _QUANT_TYPES[base].from_float(module, weight_q, input_q))
    # Kept for `finalize`, which records it in a transformers model's config (a plain attribute, not state).
    model.hf_r2_quantization_config = config
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quantized layers of `model`, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantConv2d | QuantConv1D)}


def quantizer_parameter_names(model: nn.Module) -> list[str]:
    """Names of the quantizers' own parameters (LSQ/EWGS steps, PACT alphas). `R2Trainer` excludes them from weight
    decay; a plain `Trainer` decays them (their names contain no `bias`/`norm`) unless its
    `get_decay_parameter_names` leaves them out."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, WeightQuantizer | LSQInputQuantizer | PACTInputQuantizer):
            names += [f"{module_name}.{n}" for n, _ in module.named_parameters()]
    return names


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch)
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Runs `batches` through `model` (eval mode, no gradients) to set activation ranges.

    PTQ input quantizers record the min/max of their inputs over all batches (inputs pass through unquantized while
    calibrating), then quantize with that range. LSQ/PACT input quantizers initialize from the first batch (they
    would anyway on their first forward). A batch is a dict (`model(**batch)`), a tuple (`model(*batch)`) or a tensor.

    Returns:
        `nn.Module`: `model` itself, in the training mode it had.
    """
    observers = [m for m in model.modules() if isinstance(m, RTNInputQuantizer)]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    for obs in observers:
        obs.calibrating = True
    count = 0
    try:
        for batch in batches:
            _call(model, _to_device(batch, device))
            count += 1
    finally:
        for obs in observers:
            obs.calibrating = False
        model.train(was_training)
    if count == 0:
        raise ValueError("calibrate got no batches; pass an iterable with at least one batch.")
    return model


def uncalibrated_input_quantizers(model: nn.Module) -> list[str]:
    """Names of the quantized layers whose input quantizer still waits for its first batch.

    LSQ/EWGS input quantizers set their step size, and LSQ/EWGS/PACT ones with `a_signed=None` their grid's sign, from
    the first batch they see; a PTQ one needs `calibrate`. Finalized before that, the step (or sign) would be set by
    whatever batch a loaded model meets first, so two loads of one checkpoint would disagree.
    """
    names = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        if quantizer is None or any(b.is_meta for b in quantizer.buffers()):  # a placeholder being loaded
            continue
        if isinstance(quantizer, LSQInputQuantizer) and not bool(quantizer.initialized):
            names.append(name)
        elif isinstance(quantizer, LSQInputQuantizer | PACTInputQuantizer) and int(quantizer.signed) < 0:
            names.append(name)
        elif isinstance(quantizer, RTNInputQuantizer) and not quantizer.calibrated:
            names.append(name)
    return names


def finalize(model: nn.Module, *, rebuild_only: bool = False) -> nn.Module:
    """Replaces every fake-quantized layer, in place, with a layer storing integer weight codes and scales.

    Each `QuantLinear` / `QuantConv2d` becomes a `QuantizedLinear` / `QuantizedConv2d` with buffers `weight_int`
    (`int8` for signed grids, `uint8` for unsigned ones), `weight_scale` and `weight_zero_point` (per tensor or per
    output channel) such that `(weight_int - weight_zero_point) * weight_scale` is exactly the fake-quantized weight;
    input quantizers stay (frozen), so the finalized model's outputs equal the fake-quantized model's. A transformers
    model also gets `config.quantization_config` (`HfR2QuantizationConfig`), so `save_pretrained` /
    `from_pretrained` round-trip it (with `hf_r2.quantization` imported).

    Returns:
        `nn.Module`: `model` itself.

    Args:
        model (`nn.Module`): A model prepared by `quantize` (and trained or calibrated).
        rebuild_only (`bool`, *optional*, defaults to `False`): Build the finalized structure of an untrained model
            only to `load_state_dict` a finalized checkpoint into it (the loaded state replaces every quantizer
            state), so input quantizers that have seen no batch are accepted.

    Raises:
        ValueError: If `model` has no fake-quantized layer, an input quantizer has seen no batch yet
            (`uncalibrated_input_quantizers`), or a weight holds NaN/Inf; nothing is changed then.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"finalize found no fake-quantized layer in {type(model).__name__}; call quantize first.")
    refuse_sharded_layers(layers, "finalize")
    waiting = [] if rebuild_only else [n for n in uncalibrated_input_quantizers(model) if n in layers]
    if waiting:
        raise ValueError(
            f"The input quantizers of {len(waiting)} layer(s), e.g. {waiting[:5]}, have seen no batch yet: their step "
            "size or grid sign comes from the first batch, so a checkpoint finalized now would take them from whatever "
            "a loaded model meets first. Run `hf_r2.quantization.calibrate(model, [a_training_batch])` (or train) "
            "before finalize. Nothing was finalized."
        )
    # Every layer is encoded and checked before the first is replaced: a refusal leaves the fake-quantized model as it
    # was, and a layer whose weights became NaN/Inf in training never reaches a checkpoint that would then be refused.
    finalized = {}
    for name, layer in layers.items():
        cls = _FINALIZED_TYPES[type(layer)]
        placeholder = layer.weight.is_meta  # `from_pretrained` rebuilding the layers: nothing to check yet
        if not placeholder and not bool(torch.isfinite(layer.weight).all()):
            raise ValueError(
                f"{name}.weight holds NaN/Inf values (did training diverge?): its codes and scale would be "
                "meaningless. Nothing was finalized."
            )
        finalized[name] = cls.from_quant(layer)
        if not placeholder:
            finalized[name].check_codes(name)
    for name, new in finalized.items():
        replace_submodule(model, name, new)
    config = getattr(model, "hf_r2_quantization_config", None)
    if config is not None:
        attach_hf_quantization_config(model, config, list(layers))
    return model


# -----------------------------------------------------------------------------------------------------------------
# EWGS: delta from a Hessian-trace estimate
# -----------------------------------------------------------------------------------------------------------------


def _ewgs_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LSQWeightQuantizer | LSQInputQuantizer) and m.ewgs_delta is not None
    }


def estimate_ewgs_deltas(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    *,
    num_samples: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Sets each EWGS quantizer's delta from a Hutchinson estimate of the Hessian trace, as EWGS does.

    For every EWGS quantizer with quantized values `x_q` (normalized domain, `N` elements) and loss gradient `g`:
    `delta = (Tr(H) / N) / (3 std(g))` with `Tr(H)` the trace of the loss Hessian with respect to `x_q`, estimated as
    the mean of `v . (H v)` over Rademacher vectors `v`. All layers are probed with one Hessian-vector product per
    sample (independent `v` per layer, so cross-layer terms vanish in expectation). A negative estimate gives
    delta 0 (plain straight-through estimator).

    Args:
        model (`nn.Module`): A model quantized with an `EWGSConfig`.
        loss_fn (`Callable[[], torch.Tensor]`): Runs a forward pass of `model` on one batch and returns the loss.
        num_samples (`int`, *optional*, defaults to 8): Hutchinson samples.
        generator (`torch.Generator`, *optional*): For reproducible probe vectors.

    Returns:
        `dict[str, float]`: The new delta of each EWGS quantizer, by module name.
    """
    quantizers = _ewgs_quantizers(model)
    if not quantizers:
        raise ValueError("estimate_ewgs_deltas found no EWGS quantizer; quantize the model with an EWGSConfig.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    for q in quantizers.values():
        q._capture, q._captured = True, None
    try:
        # Hessian-vector products differentiate the backward pass again: the fused attention kernels (flash,
        # memory-efficient) have no double backward, the plain math one does.
        with sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn()
        names = [n for n, q in quantizers.items() if q._captured is not None and q._captured.requires_grad]
        values = [quantizers[n]._captured for n in names]
    finally:
        for q in quantizers.values():
            q._capture, q._captured = False, None
    if not names:
        raise RuntimeError("loss_fn ran no EWGS quantizer with gradients; is the model in torch.no_grad?")
    grads = torch.autograd.grad(loss, values, create_graph=True, allow_unused=True)
    keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    traces = [0.0] * len(names)
    for _ in range(num_samples):
        probes = [
            (torch.randint(0, 2, values[i].shape, generator=generator, device="cpu") * 2 - 1).to(values[i])
            for i in keep
        ]
        hvps = torch.autograd.grad(
            [grads[i] for i in keep],
            [values[i] for i in keep],
            grad_outputs=probes,
            retain_graph=True,
            allow_unused=True,
        )
        for i, v, hv in zip(keep, probes, hvps, strict=True):
            if hv is not None:
                traces[i] += float((v * hv).sum()) / num_samples
    deltas = {}
    for i, name in enumerate(names):
        q = quantizers[name]
        q_n, q_p = q._range() if isinstance(q, LSQInputQuantizer) else (q.q_n, q.q_p)
        levels = q_n + q_p
        g = grads[i]
        sigma = float(g.detach().std()) if g is not None and g.numel() > 1 else 0.0
        # Hessian and gradient are taken in step units; the paper's normalized domain is step units / levels, which
        # multiplies Tr(H)/N by levels^2 and std(g) by levels.
        deltas[name] = levels * traces[i] / values[i].numel() / (3 * sigma) if sigma > 0 else 0.0
    # Under DDP each process probes its own batch: average, so that every process scales gradients alike.
    averaged = _all_reduce_mean(torch.tensor(list(deltas.values()), dtype=torch.float64)).tolist()
    for name, delta in zip(names, averaged, strict=True):
        quantizers[name].ewgs_delta = deltas[name] = max(delta, 0.0)
    return deltas


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = _call(model, batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("The model returned no loss for this batch; pass batches with labels or a loss_fn.")
    return loss


class EWGSDeltaCallback(TrainerCallback):
    """Updates EWGS deltas from the Hessian trace at the start of every epoch (as EWGS's code does) or every
    `every_n_steps` optimizer steps.

    Args:
        every_n_steps (`int`, *optional*): Update interval in steps; default: once per epoch.
        num_samples (`int`, *optional*, defaults to 8): Hutchinson samples per update.
        batch (`dict`, *optional*): Batch used for the estimate (on the model's device); default: the first batch of
            the Trainer's training dataloader.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*): Computes the loss from `(model, batch)`;
            default: `model(**batch).loss`.
    """

    def __init__(self, every_n_steps: int | None = None, num_samples: int = 8, batch: Any = None, loss_fn=None):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an integer >= 1 or None, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch = batch
        self.loss_fn = loss_fn or _model_loss
        self.history: list[dict[str, float]] = []

    def _update(self, model, train_dataloader):
        batch = self.batch if self.batch is not None else next(iter(train_dataloader))
        batch = _to_device(batch, next(model.parameters()).device)
        self.history.append(
            estimate_ewgs_deltas(model, lambda: self.loss_fn(model, batch), num_samples=self.num_samples)
        )

    def on_epoch_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.every_n_steps is None:
            self._update(model, train_dataloader)

    def on_step_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self._update(model, train_dataloader)

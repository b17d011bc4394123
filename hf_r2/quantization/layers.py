"""The layers of quantization-aware training and their finalized form.

* `QuantLinear` / `QuantConv2d` / `QuantConv1D` subclass `nn.Linear` / `nn.Conv2d` / `Conv1D` and keep their
  `weight` / `bias` parameters, so checkpoint keys do not move (torchao's `FakeQuantizedLinear` pattern); they apply
  the quantizers of `hf_r2.quantization.quantizers` in every forward.
* `QuantizedLinear` / `QuantizedConv2d` / `QuantizedConv1D` are the finalized layers: integer weight codes plus scale
  and zero point; `weight` is a read-only property giving the dequantized weight.

Checkpoint keys follow the convention of every compressed hf_r2 layer (palettized ones too): `<layer>.weight` holds the
compressed integer payload as a 1-D tensor, here the codes in output-channels-first order (a shape no dense weight
has, so a loader that does not know the format fails on a size mismatch instead of casting codes to floats), and
`<layer>.weight_<name>` the tensors that decode it (`weight_scale`, `weight_zero_point`). Checkpoints of format
version 1 stored the codes under `weight_int` next to an empty `weight` placeholder; they still load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_r2.palettization.format import output_channels_first
from hf_r2.quantization import quantizers
from hf_r2.quantization.functional import dequantize
from hf_r2.quantization.quantizers import WeightQuantizer
from hf_r2.utils import layer_shell

__all__ = ["QuantConv1D", "QuantConv2d", "QuantLinear", "QuantizedConv1D", "QuantizedConv2d", "QuantizedLinear"]


def __getattr__(name: str):
    # The quantizers lived here before `hf_r2.quantization.quantizers`: old imports keep working.
    if name in quantizers.__all__:
        return getattr(quantizers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _QuantLayerMixin:
    """Fake-quantized layer: quantizes its weight through `weight_quantizer` and its input through
    `input_quantizer` (if any) in every forward."""

    weight_quantizer: WeightQuantizer
    input_quantizer: nn.Module | None

    @classmethod
    def from_float(cls, module, weight_quantizer: WeightQuantizer, input_quantizer: nn.Module | None = None):
        """Wraps `module`, reusing its `weight` and `bias` parameters (same objects, same keys)."""
        new = layer_shell(cls, module)
        new.weight = module.weight
        new.weight_quantizer = weight_quantizer
        new.input_quantizer = input_quantizer
        return new

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight used by `forward`, shaped like `weight`.

        The quantizer sees the weight output channels first (`output_channels_first`: transposed for `Conv1D`), so a
        per-channel scale is one per output channel for every layer type.
        """
        return output_channels_first(self, self.weight_quantizer(output_channels_first(self)))

    def to_float(self) -> nn.Module:
        """The plain float layer (weights not quantized), sharing this layer's parameters."""
        new = layer_shell(self._FLOAT, self)
        new.weight = self.weight
        return new


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """`nn.Linear` with fake-quantized weight and (optionally) input."""

    _FLOAT = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """`nn.Conv2d` with fake-quantized weight and (optionally) input."""

    _FLOAT = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantConv1D(_QuantLayerMixin, Conv1D):
    """transformers' `Conv1D` (GPT-2's Linear with an `(in, out)` weight) with fake-quantized weight and input."""

    _FLOAT = Conv1D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = self._quantize_input(x)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight()).view(size_out)


class _QuantizedLayerMixin:
    """Finalized layer: `weight_int` codes, `weight_scale`, `weight_zero_point` buffers; `weight` dequantizes them.

    In the state dict the codes are the 1-D `weight` entry (see the module docstring), not `weight_int`: a loader that
    does not know this format (a float `nn.Linear`, or `from_pretrained` without hf_r2 imported) then fails on a size
    mismatch instead of silently casting codes to floats or initializing random weights. Loading also accepts the
    format-1 keys (`weight_int` plus an empty `weight` placeholder).
    """

    input_quantizer: nn.Module | None
    #: The on-disk key layout `state_dict` writes: 2 (codes under `weight`) unless the layer was loaded from a
    #: format-1 checkpoint, which then saves back as it was (its config.json still says format version 1).
    checkpoint_format: int = 2

    @classmethod
    def from_quant(cls, module: _QuantLayerMixin):
        """Finalizes a fake-quantized layer: stores its weight's codes; keeps its (frozen) input quantizer."""
        with torch.no_grad():
            codes, scale, zero_point = module.weight_quantizer.encode(output_channels_first(module))
        q_min, q_max = module.weight_quantizer.code_range
        dtype = torch.int8 if q_min < 0 else torch.uint8
        scale = scale.detach().to(module.weight.dtype)
        new = layer_shell(cls, module)
        new.register_buffer("weight_int", codes.detach().round().to(dtype))
        new.register_buffer("weight_scale", scale.clone())
        zero_point = torch.as_tensor(zero_point, dtype=scale.dtype, device=scale.device)
        new.register_buffer("weight_zero_point", zero_point.detach().clone())
        new.weight_bits = module.weight_quantizer.bits
        new.code_range = (q_min, q_max)
        if module.input_quantizer is not None:
            module.input_quantizer.requires_grad_(False)
        new.input_quantizer = module.input_quantizer
        return new

    @property
    def weight(self) -> torch.Tensor:
        # `weight_int` is stored output channels first (per-channel scales broadcast along dim 0): transposed back for
        # `Conv1D`, whose weight is `(in, out)`.
        if self.weight_int.is_meta:  # a placeholder `from_pretrained` has not filled (yet): no values to compute
            return output_channels_first(self, torch.empty(self.weight_int.shape, device="meta"))
        return output_channels_first(self, dequantize(self.weight_int, self.weight_scale, self.weight_zero_point))

    @torch.no_grad()
    def check_codes(self, name: str = "layer") -> None:
        """Raises a `ValueError` naming `name` unless the stored codes, scale and zero point can be this layer's.

        A loaded checkpoint is checked with it: codes outside the `weight_bits` grid, another integer dtype, or a
        negative or non-finite scale would otherwise dequantize to wrong weights without any error.
        """
        q_min, q_max = self.code_range
        dtype = torch.int8 if q_min < 0 else torch.uint8
        codes = self.weight_int
        if codes.dtype != dtype:
            raise ValueError(
                f"{name}: the weight codes have dtype {codes.dtype}; this {self.weight_bits}-bit grid stores {dtype}."
            )
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < q_min or hi > q_max:
                raise ValueError(
                    f"{name}: the weight holds codes in [{lo}, {hi}], outside the {self.weight_bits}-bit grid "
                    f"[{q_min}, {q_max}]: corrupt checkpoint."
                )
        scale, zero_point = self.weight_scale, self.weight_zero_point
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError(f"{name}.weight_scale must be finite and >= 0: corrupt checkpoint.")
        if not bool(torch.isfinite(zero_point).all()):
            raise ValueError(f"{name}.weight_zero_point must be finite: corrupt checkpoint.")

    def __setattr__(self, name, value):
        if name == "weight":
            # transformers' loader assigns every checkpoint entry with setattr: the 1-D codes (kept for
            # `HfR2Quantizer` to check and install once loading is done) or a format-1 empty placeholder (ignored).
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                if value.numel():
                    super().__setattr__("_loaded_codes", value.detach())
                    try:  # installed now: transformers may read `weight` (its `_init_weights`) before `HfR2Quantizer`
                        self.install_codes(value.detach(), "layer")
                    except ValueError:
                        pass  # reported, naming the layer, by `HfR2Quantizer` once loading is done
                return
            raise AttributeError(
                f"{type(self).__name__}.weight is derived from weight_int, weight_scale and weight_zero_point; "
                "assign those instead."
            )
        super().__setattr__(name, value)

    def install_codes(self, codes: torch.Tensor, name: str = "layer") -> None:
        """Installs checkpoint codes (the 1-D `weight` entry) as `weight_int`, keeping their dtype for `check_codes`.

        Raises:
            ValueError: If `codes` is not a 1-D tensor of as many codes as the layer has weights, naming `name`.
        """
        expected = self.weight_int.numel()
        if codes.dim() != 1 or codes.numel() != expected or codes.is_floating_point():
            raise ValueError(
                f"{name}.weight holds a {codes.dtype} tensor of shape {tuple(codes.shape)}; this layer stores its "
                f"{expected} integer weight codes as a 1-D tensor: corrupt checkpoint, or a config.json that does not "
                "belong to these weights."
            )
        self._buffers["weight_int"] = codes.reshape(self.weight_int.shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.checkpoint_format == 1:  # codes under `weight_int`, an empty `weight` placeholder
            destination[prefix + "weight"] = torch.zeros(0, dtype=torch.uint8, device=self.weight_int.device)
            return
        codes = destination.pop(prefix + "weight_int")
        destination[prefix + "weight"] = codes.reshape(-1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        stored = state_dict.get(prefix + "weight")
        if stored is not None and stored.numel() == 0:  # format 1: codes under `weight_int`, `weight` a placeholder
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        elif stored is not None and stored.dim() == 1 and not stored.is_floating_point():
            if stored.numel() != self.weight_int.numel():
                errors.append(
                    f"{prefix}weight holds {stored.numel()} integer codes, but {type(self).__name__} has "
                    f"{self.weight_int.numel()} weights: the checkpoint belongs to another layer shape."
                )
                return
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
            state_dict[prefix + "weight_int"] = stored.reshape(self.weight_int.shape)
        elif stored is not None:
            errors.append(
                f"{prefix}weight holds a dense weight of shape {tuple(stored.shape)}, but {type(self).__name__} "
                "loads integer codes and scales: this is a float checkpoint, not a finalized one."
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantizedLinear(_QuantizedLayerMixin, nn.Linear):
    """Finalized `nn.Linear`: integer weight codes, dequantized on the fly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.weight, self.bias)


class QuantizedConv2d(_QuantizedLayerMixin, nn.Conv2d):
    """Finalized `nn.Conv2d`: integer weight codes, dequantized on the fly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantize_input(x), self.weight, self.bias)


class QuantizedConv1D(_QuantizedLayerMixin, Conv1D):
    """Finalized transformers `Conv1D`: integer codes stored output channels first (`(out, in)`, as for a
    `QuantizedLinear`); `weight` gives Conv1D's `(in, out)` dequantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = self._quantize_input(x)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(size_out)

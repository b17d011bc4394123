"""transformers integration: `from_pretrained` loads finalized hf_r2 quantized checkpoints.

Importing `hf_r2.quantization` registers the method `"hf_r2_quantization"` with transformers
(`register_quantization_config` / `register_quantizer`). The flow:

1. `finalize(model)` on a transformers model sets `model.config.quantization_config` to a
   `HfR2QuantizationConfig` (the method's config and the finalized layer names), so `save_pretrained` writes it.
2. On `from_pretrained`, `HfR2Quantizer` rebuilds the layers on the meta device with `quantize` + `finalize`, the
   loader fills `weight_int`, `weight_scale`, `weight_zero_point` and the input quantizers' tensors, and every one of
   them is checked to have come from the checkpoint: a missing tensor raises a `ValueError` naming it.

Without hf_r2 imported, transformers skips the unknown method and tries to load the empty `weight` placeholder into
the dense weight: a size mismatch, which `from_pretrained` raises on (unless `ignore_mismatched_sizes=True`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_r2.quantization.config import QuantizationConfig
from hf_r2.utils import register_hf_quantization_method

__all__ = ["HF_QUANT_METHOD", "HfR2QuantizationConfig", "HfR2Quantizer"]

HF_QUANT_METHOD = "hf_r2_quantization"
FORMAT_VERSION = 1


@dataclass
class HfR2QuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a finalized hf_r2 quantized checkpoint."""

    method_config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The hf_r2 method config (`QuantizationConfig.to_dict()`)."}
    )
    layers: list[str] = field(default_factory=list, metadata={"help": "Full names of the finalized layers."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "On-disk layout version."})
    quant_method: str = field(default=HF_QUANT_METHOD, metadata={"help": f"Always {HF_QUANT_METHOD!r}."})

    def __post_init__(self):
        if self.quant_method != HF_QUANT_METHOD:
            raise ValueError(f"quant_method must be {HF_QUANT_METHOD!r}, got {self.quant_method!r}.")
        if not isinstance(self.format_version, int) or not 1 <= self.format_version <= FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses hf_r2 quantization format {self.format_version!r}; this hf_r2 reads "
                f"1..{FORMAT_VERSION}: upgrade hf_r2."
            )
        if not self.layers or not all(isinstance(n, str) and n for n in self.layers):
            raise ValueError(f"layers must be a non-empty list of module names, got {self.layers!r}.")
        self.method = QuantizationConfig.from_dict(self.method_config)  # validates

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "method_config": dict(self.method_config),
            "layers": list(self.layers),
        }


def attach_hf_quantization_config(model: nn.Module, config: QuantizationConfig, layers: list[str]) -> None:
    """Sets `model.config.quantization_config` (transformers models only) so `save_pretrained` records it."""
    from transformers import PretrainedConfig

    if isinstance(getattr(model, "config", None), PretrainedConfig):
        model.config.quantization_config = HfR2QuantizationConfig(method_config=config.to_dict(), layers=list(layers))


class HfR2Quantizer(HfQuantizer):
    """Loads finalized hf_r2 quantized checkpoints (see the module docstring)."""

    # Only checkpoints quantized by hf_r2 load: quantizing happens in training or `calibrate`, not at load time.
    requires_calibration = True
    quantization_config: HfR2QuantizationConfig

    def __init__(self, quantization_config: HfR2QuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._layers: set[str] = set()

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, **kwargs):
        from hf_r2.quantization.model import finalize, quantize

        layers = self.quantization_config.layers
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(
                f"The quantized layers {missing[:5]} of this checkpoint do not exist in {type(model).__name__}: the "
                "checkpoint belongs to another architecture (load it with the class it was saved from)."
            )
        method = QuantizationConfig.from_dict(
            dict(self.quantization_config.method_config, target_modules=list(layers), exclude_modules=None)
        )
        finalize(quantize(model, method))
        self._layers = set(layers)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # Only the empty `weight` placeholder differs in shape from what the layer reports; claiming it keeps the
        # loader from flagging a size mismatch (the layer's `__setattr__` accepts nothing but the placeholder).
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and module_name in self._layers

    def _process_model_after_weight_loading(self, model, **kwargs):
        not_loaded = []
        for name in sorted(self._layers):
            module = model.get_submodule(name)
            for tensor_name, tensor in [*module.named_buffers(), *module.named_parameters()]:
                if not getattr(tensor, "_is_hf_initialized", False):
                    not_loaded.append(f"{name}.{tensor_name}")
        if not_loaded:
            raise ValueError(
                f"The checkpoint lacks {len(not_loaded)} tensor(s) of its quantized layers, e.g. {not_loaded[:5]}: "
                "corrupt or incomplete checkpoint (refusing to run with uninitialized weights)."
            )
        for name in sorted(self._layers):
            model.get_submodule(name).check_codes(name)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Integer weights are buffers and stay fixed; biases and unquantized layers can still be fine-tuned.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False


def register() -> None:
    """Registers the config and quantizer with transformers (idempotent; done on import)."""
    register_hf_quantization_method(HF_QUANT_METHOD, HfR2QuantizationConfig, HfR2Quantizer)


register()

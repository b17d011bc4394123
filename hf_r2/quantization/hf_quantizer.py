"""transformers integration: `from_pretrained` loads finalized hf_r2 quantized checkpoints.

Importing `hf_r2.quantization` registers the method `"hf_r2_quantization"` with transformers
(`register_quantization_config` / `register_quantizer`, see `register`). The flow:

1. `finalize(model)` on a transformers model sets `model.config.quantization_config` to a
   `HfR2QuantizationConfig` (the method's config and the finalized layer names), so `save_pretrained` writes it.
2. On `from_pretrained`, `HfR2Quantizer` rebuilds the layers on the meta device with `quantize` + `finalize`, the
   loader fills the codes (the 1-D `weight` entry, installed as `weight_int`), `weight_scale`, `weight_zero_point`
   and the input quantizers' tensors, and every one of them is checked to have come from the checkpoint: a missing
   tensor raises a `ValueError` naming it. Format-1 checkpoints (codes under `weight_int`, an empty `weight`
   placeholder) load too, and save back in their own format.

Without hf_r2 imported, transformers skips the unknown method and tries to load the 1-D codes (format 1: the empty
placeholder) into the dense weight: a size mismatch, which `from_pretrained` raises on (unless
`ignore_mismatched_sizes=True`).
"""

from __future__ import annotations

from hf_r2.quantization.config import (  # the config and attach_hf_quantization_config lived here before
    HF_QUANT_METHOD,
    HfR2QuantizationConfig,
    QuantizationConfig,
    attach_hf_quantization_config,
)
from hf_r2.quantization.model import finalize, quantize
from hf_r2.utils import CheckpointHfQuantizer, register_hf_quantization_method

__all__ = [
    "HF_QUANT_METHOD",
    "HfR2QuantizationConfig",
    "HfR2Quantizer",
    "attach_hf_quantization_config",
    "register",
]


class HfR2Quantizer(CheckpointHfQuantizer):
    """Loads finalized hf_r2 quantized checkpoints (see the module docstring)."""

    quantization_config: HfR2QuantizationConfig

    def __init__(self, quantization_config: HfR2QuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._layers: set[str] = set()

    def _process_model_before_weight_loading(self, model, **kwargs):
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
        for name in layers:  # the state dict then names its tensors as this checkpoint does
            model.get_submodule(name).checkpoint_format = self.quantization_config.format_version
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # Only `weight` (the 1-D codes, or format 1's empty placeholder) differs in shape from the layer's dense
        # weight; claiming it keeps the loader from flagging a size mismatch. The layer's `__setattr__` keeps the
        # codes for `_process_model_after_weight_loading` and accepts nothing else under `weight`.
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and module_name in self._layers

    def _process_model_after_weight_loading(self, model, **kwargs):
        not_loaded = []
        codes_by_layer = {}
        for name in sorted(self._layers):
            module = model.get_submodule(name)
            codes = module.__dict__.pop("_loaded_codes", None)
            if codes is not None:  # format 2 keys (whatever the config says): the codes came as `weight`
                codes_by_layer[name] = codes
                module.checkpoint_format = 2
            elif module.checkpoint_format >= 2:
                not_loaded.append(f"{name}.weight")
            for tensor_name, tensor in [*module.named_buffers(), *module.named_parameters()]:
                if tensor_name == "weight_int" and module.checkpoint_format >= 2:
                    continue  # stored as `weight`, checked above
                if not getattr(tensor, "_is_hf_initialized", False):
                    not_loaded.append(f"{name}.{tensor_name}")
        if not_loaded:
            raise ValueError(
                f"The checkpoint lacks {len(not_loaded)} tensor(s) of its quantized layers, e.g. {not_loaded[:5]}: "
                "corrupt or incomplete checkpoint (refusing to run with uninitialized weights)."
            )
        for name, codes in codes_by_layer.items():
            model.get_submodule(name).install_codes(codes, name)
        for name in sorted(self._layers):
            model.get_submodule(name).check_codes(name)
        return model

    @property
    def is_qat_trainable(self) -> bool:
        return False


def register() -> None:
    """Registers the config and quantizer with transformers (idempotent; done on import)."""
    register_hf_quantization_method(HF_QUANT_METHOD, HfR2QuantizationConfig, HfR2Quantizer)

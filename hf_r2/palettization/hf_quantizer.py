"""transformers integration: `from_pretrained` loads hf_r2 palettized checkpoints into palettized layers.

Importing `hf_r2.palettization` registers the quantization method `"hf_r2_palettization"` with transformers
(`register_quantization_config` / `register_quantizer`, see `register`); `import hf_r2` does it. The flow on
`from_pretrained`:

1. `config.json` holds `quantization_config = {"quant_method": "hf_r2_palettization", "format_version": 2,
   "layers": {name: {"n_bits", "cluster_dim", "shape"}}}` (written by `attach_palettization_config`).
2. Before the weights load, `PalettizationHfQuantizer` swaps every listed layer for its palettized class (meta device).
3. The loader assigns the stored tensors as they are (`weight` = packed uint8 indices, `weight_lut` = LUT): the
   quantizer claims both keys, so transformers' generic size check does not turn a bad tensor into a random one.
4. After loading, every palettized layer validates its tensors against the config and decodes its dense weight once;
   any inconsistency raises a `ValueError` naming the layer.

Without hf_r2 imported, transformers skips the unknown method and tries to copy the packed 1-D `weight` into the dense
2-D/4-D parameter: a size mismatch, which `from_pretrained` raises on (unless `ignore_mismatched_sizes=True`).
"""

from __future__ import annotations

from hf_r2.palettization.config import QUANT_METHOD, PalettizationQuantizationConfig
from hf_r2.palettization.format import output_channels_first_shape
from hf_r2.palettization.model import unpalettize
from hf_r2.palettization.palettized_layers import SUPPORTED_LAYER_TYPES, PalettizedMixin, palettized_class_for
from hf_r2.utils import CheckpointHfQuantizer, register_hf_quantization_method

__all__ = ["QUANT_METHOD", "PalettizationHfQuantizer", "PalettizationQuantizationConfig", "register"]


def _resolve_layer_names(model, names) -> dict[str, str]:
    """Maps checkpoint layer names to module names of `model`, allowing a head checkpoint in its base model and back."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    resolved = {}
    for name in names:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
        match = next((c for c in candidates if c in modules), None)
        if match is not None:
            resolved[name] = match
    return resolved


class PalettizationHfQuantizer(CheckpointHfQuantizer):
    """Loads hf_r2 palettized checkpoints (see the module docstring); registered as `"hf_r2_palettization"`."""

    quantization_config: PalettizationQuantizationConfig

    def __init__(self, quantization_config: PalettizationQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._layer_names: dict[str, str] = {}

    def _process_model_before_weight_loading(self, model, **kwargs):
        specs = self.quantization_config.layers
        self._layer_names = _resolve_layer_names(model, specs)
        if not self._layer_names:
            raise ValueError(
                f"None of the palettized layers of this checkpoint ({sorted(specs)[:5]}...) exists in "
                f"{type(model).__name__}: the checkpoint belongs to another architecture."
            )
        for ckpt_name, name in self._layer_names.items():
            spec = specs[ckpt_name]
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, child)
            if not isinstance(layer, SUPPORTED_LAYER_TYPES):
                raise ValueError(
                    f"quantization_config lists {ckpt_name!r} as palettized, but in {type(model).__name__} it is a "
                    f"{type(layer).__name__} (palettizable: Linear, Conv2d, Embedding, Conv1D)."
                )
            if list(output_channels_first_shape(layer)) != list(spec["shape"]):
                raise ValueError(
                    f"quantization_config gives palettized layer {ckpt_name!r} the shape {list(spec['shape'])}, but "
                    f"{type(model).__name__} builds it with shape {list(output_channels_first_shape(layer))} (output "
                    "channels first; config.json mismatch)."
                )
            new = palettized_class_for(layer).like(
                layer, spec["n_bits"], spec["cluster_dim"], device=layer.weight.device
            )
            new.layer_name = name
            if self.quantization_config.format_version < 2:  # written before checksums: none to load or verify
                del new._buffers["weight_checksum"]
            setattr(parent, child, new)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # Claiming the palettized tensors makes the loader assign them as stored (packed 1-D uint8 weight, LUT with
        # any number of rows) instead of flagging a size mismatch; `_process_model_after_weight_loading` validates.
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name in ("weight", "weight_lut", "weight_checksum") and module_name in self._layer_names.values()

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in self._layer_names.values():
            module = model.get_submodule(name)
            if not isinstance(module, PalettizedMixin):
                raise ValueError(f"palettized layer {name!r} was replaced during loading; cannot decode it.")
            packed = getattr(module, "_loaded_packed_weight", None)
            if packed is None:
                raise ValueError(
                    f"palettized layer {name!r}: the checkpoint has no packed indices ('.weight' as a 1-D uint8 "
                    "tensor) for it: the key is missing or holds a dense weight (corrupt checkpoint, or a config.json "
                    "that does not belong to these weights)."
                )
            if not getattr(module.weight_lut, "_is_hf_initialized", False):
                raise ValueError(
                    f"palettized layer {name!r}: the checkpoint has no LUT ('.weight_lut') for it (missing key): "
                    "corrupt or incomplete checkpoint."
                )
            del module._loaded_packed_weight
            lut = module.weight_lut.detach()
            module._load_palettized(packed, lut)  # validates sizes, ranges and padding first: the precise messages
            if "weight_checksum" in module._buffers:
                if not getattr(module.weight_checksum, "_is_hf_initialized", False):
                    raise ValueError(
                        f"palettized layer {name!r}: the checkpoint (format version "
                        f"{self.quantization_config.format_version}) has no checksum ('.weight_checksum') for it: "
                        "corrupt or incomplete checkpoint."
                    )
                module.verify_checksum(module.weight_checksum, packed, lut, name)
        return model

    def _dequantize(self, model, dtype=None):
        # `model.dequantize()`: plain layers holding the decoded weights (transformers then drops the config).
        unpalettize(model)
        return model if dtype is None else model.to(dtype)

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register() -> None:
    """Registers the config and quantizer with transformers (idempotent; done on import)."""
    register_hf_quantization_method(QUANT_METHOD, PalettizationQuantizationConfig, PalettizationHfQuantizer)

"""Quantization-aware training and post-training quantization for `nn.Linear` / `nn.Conv2d` (whole model).

Methods (one config each): LSQ (`LSQConfig`), EWGS (`EWGSConfig`), PACT activations with DoReFa weights
(`PACTConfig`) and round-to-nearest PTQ (`PTQConfig`). `quantize(model, config)` swaps layers in place for
fake-quantized ones that keep their parameter names; `finalize(model)` stores integer weights and scales.

Example:
    ```python
    from hf_r2.quantization import calibrate, finalize, get_quantization_config, quantize

    quantize(model, get_quantization_config("lsq", w_bits=2, a_bits=2))
    calibrate(model, [next(iter(train_loader))])  # optional for LSQ/PACT (first batch), required for PTQ activations
    ...  # train with any transformers.Trainer
    finalize(model)  # int8/uint8 weight codes + scale + zero point
    ```
"""

from hf_r2.quantization import hf_quantizer
from hf_r2.quantization.config import (
    HF_QUANT_METHOD,
    QUANTIZATION_CONFIGS,
    EWGSConfig,
    HfR2QuantizationConfig,
    LSQConfig,
    PACTConfig,
    PTQConfig,
    QuantizationConfig,
    attach_hf_quantization_config,
    get_quantization_config,
    quantization_methods,
    register_quantization_method,
)
from hf_r2.quantization.hf_quantizer import HfR2Quantizer
from hf_r2.quantization.layers import (
    QuantConv1D,
    QuantConv2d,
    QuantizedConv1D,
    QuantizedConv2d,
    QuantizedLinear,
    QuantLinear,
)
from hf_r2.quantization.model import (
    EWGSDeltaCallback,
    calibrate,
    estimate_ewgs_deltas,
    finalize,
    quantize,
    quantized_layers,
    quantizer_parameter_names,
    register_quantize_handler,
    trainer_callbacks,
    uncalibrated_input_quantizers,
    validate_quantization,
)
from hf_r2.quantization.quantizers import (
    DoReFaWeightQuantizer,
    LSQInputQuantizer,
    LSQWeightQuantizer,
    PACTInputQuantizer,
    RTNInputQuantizer,
    RTNWeightQuantizer,
)

__all__ = [
    "HF_QUANT_METHOD",
    "HfR2QuantizationConfig",
    "HfR2Quantizer",
    "QUANTIZATION_CONFIGS",
    "attach_hf_quantization_config",
    "DoReFaWeightQuantizer",
    "EWGSConfig",
    "EWGSDeltaCallback",
    "LSQConfig",
    "LSQInputQuantizer",
    "LSQWeightQuantizer",
    "PACTConfig",
    "PACTInputQuantizer",
    "PTQConfig",
    "QuantConv1D",
    "QuantConv2d",
    "QuantLinear",
    "QuantizationConfig",
    "QuantizedConv1D",
    "QuantizedConv2d",
    "QuantizedLinear",
    "RTNInputQuantizer",
    "RTNWeightQuantizer",
    "calibrate",
    "estimate_ewgs_deltas",
    "finalize",
    "get_quantization_config",
    "quantization_methods",
    "quantize",
    "quantized_layers",
    "quantizer_parameter_names",
    "register_quantization_method",
    "register_quantize_handler",
    "trainer_callbacks",
    "uncalibrated_input_quantizers",
    "validate_quantization",
]

# `from_pretrained` loads finalized quantized checkpoints once `hf_r2.quantization` is imported (`import hf_r2` does).
hf_quantizer.register()

"""Former name of `hf_r2.palettization.hf_quantizer` (the transformers loader), kept for existing imports."""

from hf_r2.palettization.hf_quantizer import (
    QUANT_METHOD,
    PalettizationHfQuantizer,
    PalettizationQuantizationConfig,
    register,
)

__all__ = ["QUANT_METHOD", "PalettizationHfQuantizer", "PalettizationQuantizationConfig", "register"]

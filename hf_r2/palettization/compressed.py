"""Former home of the palettized format, layers and helpers; kept so that existing imports keep working.

Everything here is re-exported from the module that now owns it: the on-disk format (`hf_r2.palettization.format`),
the compact layers (`hf_r2.palettization.palettized_layers`), `unpalettize` (`hf_r2.palettization.model`) and the
checkpoint config (`hf_r2.palettization.config`).
"""

from hf_r2.palettization.config import attach_palettization_config
from hf_r2.palettization.format import (
    PALETTIZATION_FORMAT_VERSION,
    decode_palettized,
    output_channels_first,
    output_channels_first_shape,
    pack_indices,
    packed_num_bytes,
    palettized_checksum,
    unpack_indices,
)
from hf_r2.palettization.model import unpalettize
from hf_r2.palettization.palettized_layers import (
    SUPPORTED_LAYER_TYPES,
    PalettizedConv1D,
    PalettizedConv2d,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedMixin,
    palettized_class_for,
    palettized_modules,
    to_palettized,
)

__all__ = [
    "PALETTIZATION_FORMAT_VERSION",
    "SUPPORTED_LAYER_TYPES",
    "PalettizedConv1D",
    "PalettizedConv2d",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedMixin",
    "attach_palettization_config",
    "decode_palettized",
    "output_channels_first",
    "output_channels_first_shape",
    "pack_indices",
    "packed_num_bytes",
    "palettized_checksum",
    "palettized_class_for",
    "palettized_modules",
    "to_palettized",
    "unpack_indices",
    "unpalettize",
]

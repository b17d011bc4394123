"""hf_r2: R² range regularization, DKM palettization and QAT for Hugging Face models.

The pipeline of the paper (Kundu et al., "R²: Range Regularization for Model Compression and Quantization"):

1. Train or fine-tune with a range loss: `R2Trainer` + `R2TrainingArguments(r2_type="soft_min_max", ...)`.
2. Compress: `hf_r2.palettization.palettize` (DKM) or `hf_r2.quantization.quantize` (LSQ, EWGS, PACT, PTQ),
   fine-tune, then `finalize`.
3. Inspect and publish: `weight_ranges`, `format_weight_range_table`, `hf_r2.hub.prepare_publish_folder`.

Importing `hf_r2` registers the `hf_r2_palettization` quantization method with transformers, so that
`AutoModel*.from_pretrained` loads compact palettized checkpoints.
"""

from . import palettization, quantization
from .analysis import format_weight_range_table, weight_ranges
from .palettization import quantizer as _palettization_quantizer  # noqa: F401  (registers the loader on import)
from .range_regularizer import R2Config, RangeRegularizer
from .trainer import R2Trainer, R2TrainingArguments

__version__ = "0.1.0"

__all__ = [
    "R2Config",
    "R2Trainer",
    "R2TrainingArguments",
    "RangeRegularizer",
    "format_weight_range_table",
    "palettization",
    "quantization",
    "weight_ranges",
]

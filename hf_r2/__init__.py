"""hf_r2: R² range regularization, DKM palettization and QAT for Hugging Face models."""

__version__ = "0.1.0"

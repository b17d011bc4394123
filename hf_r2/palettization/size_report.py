"""The size of palettized models the way the paper's Table 2 reports it.

`palettized_size_report(model_or_dir)` counts, like Table 2 of the paper ("Model size of compressed MobileNet-V1"),
the model size in MiB (2**20 bytes; the paper's "M bytes") when every palettizable layer (`nn.Linear`, `nn.Conv2d`,
`nn.Embedding`) is stored at 32, 4, 2 or 1 bits per weight ("quant all"), or all but the first and the last of them
("quant excl. F & L"). A `b`-bit layer costs `numel * b / cluster_dim` bits for its indices plus a `2**b x cluster_dim`
fp32 LUT; everything else in the state dict (other layers, biases, norms, buffers) stays at 32 bits per element. For a
saved palettized checkpoint it also gives the actual file size next to its ideal size (indices at exactly `b/d` bits
per weight, the stored LUTs, everything else at its stored dtype).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_r2.palettization.format import output_channels_first_shape
from hf_r2.palettization.palettized_layers import SUPPORTED_LAYER_TYPES, PalettizedMixin, palettized_modules
from hf_r2.utils import check_cluster_dim

__all__ = ["MIB", "PalettizedSizeReport", "palettized_size_report"]

MIB = float(1 << 20)


@dataclass(frozen=True)
class PalettizedSizeReport:
    """Model size at several bit widths, as in the paper's Table 2 (all sizes in MiB = 2**20 bytes).

    Attributes:
        model_name (`str`): Model class name.
        bits (`tuple[int]`): Bit widths of the rows (32 means uncompressed).
        quant_all_mib (`tuple[float]`): Size with every palettizable layer at each bit width.
        quant_excl_first_last_mib (`tuple[float]`): Same, first and last palettizable layers kept at 32 bits.
        first_layer (`str`), last_layer (`str`): Names of the first and last palettizable layers.
        cluster_dim (`int`): Vector dimension assumed for the rows (bits per weight: b / cluster_dim).
        num_palettizable_params (`int`): Weights in palettizable layers.
        num_elements (`int`): All state-dict elements of the dense model.
        palettized_layers (`int`): Layers actually palettized (0 for a dense model).
        ideal_mib (`float` or `None`): Ideal size of the actual palettization (palettized models only).
        file_mib (`float` or `None`): Size of the weight files on disk (directories only).
    """

    model_name: str
    bits: tuple[int, ...]
    quant_all_mib: tuple[float, ...]
    quant_excl_first_last_mib: tuple[float, ...]
    first_layer: str
    last_layer: str
    cluster_dim: int
    num_palettizable_params: int
    num_elements: int
    palettized_layers: int = 0
    ideal_mib: float | None = None
    file_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as a JSON-serializable dict."""
        return asdict(self)

    def to_table(self) -> str:
        """Renders the report as a plain-text table in the layout of the paper's Table 2."""
        lines = [
            f"Model size of {self.model_name} (MiB = 2**20 bytes; paper: 'M bytes'). "
            f"F: first layer ({self.first_layer}), L: last layer ({self.last_layer}); cluster_dim={self.cluster_dim}",
            f"{'BIT':<8} | {'Quant excl. F & L':>17} | {'Quant all':>9}",
            f"{'-' * 8}-+-{'-' * 17}-+-{'-' * 9}",
        ]
        for b, excl, full in zip(self.bits, self.quant_excl_first_last_mib, self.quant_all_mib, strict=True):
            lines.append(f"{f'{b} bit':<8} | {excl:>17.3f} | {full:>9.3f}")
        if self.ideal_mib is not None:
            lines.append(
                f"palettized layers: {self.palettized_layers}; ideal size of this palettization: "
                f"{self.ideal_mib:.3f} MiB"
            )
        if self.file_mib is not None and self.ideal_mib is not None:
            overhead = 100.0 * (self.file_mib / self.ideal_mib - 1.0)
            lines.append(f"actual weight files: {self.file_mib:.3f} MiB ({overhead:+.2f}% vs ideal)")
        elif self.file_mib is not None:
            lines.append(f"actual weight files: {self.file_mib:.3f} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def _state_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    """Every parameter and persistent buffer of the dense model, once each (tied tensors counted once).

    A palettized layer contributes its dense `weight` (not the packed indices) and not its LUT or checksum, so the
    counts are those of the dense model the layer stands for.
    """
    seen: set[int] = set()
    out = []
    for module_name, module in model.named_modules():
        tensors = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set
        ]
        for tensor_name, tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            if isinstance(module, PalettizedMixin) and tensor_name in ("weight_lut", "weight_checksum"):
                continue
            seen.add(id(tensor))
            out.append((module_name, module, tensor_name, tensor))
    return out


def _bytes_at(numel: int, b: int, cluster_dim: int) -> float:
    if b >= 32:
        return numel * 4.0
    return numel / cluster_dim * b / 8.0 + (1 << b) * cluster_dim * 4.0


def _meta_model_from_dir(directory: Path):
    import transformers

    with open(directory / "config.json", encoding="utf-8") as f:
        config_dict = json.load(f)
    architectures = config_dict.get("architectures") or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(f"{directory}/config.json names no transformers architecture ({architectures!r}).")
    config = transformers.AutoConfig.from_pretrained(directory)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        del config.quantization_config
    with torch.device("meta"):
        model = getattr(transformers, architectures[0])(config)
    if quant is not None:
        from hf_r2.palettization.quantizer import PalettizationHfQuantizer, PalettizationQuantizationConfig

        qconfig = PalettizationQuantizationConfig(**{k: v for k, v in dict(quant).items()})
        PalettizationHfQuantizer(qconfig, pre_quantized=True)._process_model_before_weight_loading(model)
    return model, quant


def _ideal_from_files(directory: Path, model: nn.Module) -> tuple[float, float]:
    """(ideal bytes, file bytes) of the safetensors weight files in `directory`."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"No .safetensors weight file in {directory}.")
    palettized = palettized_modules(model)
    ideal = 0.0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                module_name, _, tensor_name = key.rpartition(".")
                sliced = f.get_slice(key)
                numel = 1
                for s in sliced.get_shape():
                    numel *= s
                module = palettized.get(module_name)
                if module is not None and tensor_name == "weight":
                    ideal += module.num_vectors * module.n_bits / 8.0
                else:
                    dtype = _SAFETENSORS_DTYPES.get(sliced.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{path.name}: tensor {key!r} has unsupported dtype {sliced.get_dtype()}.")
                    ideal += numel * torch.empty(0, dtype=dtype).element_size()
    return ideal, float(sum(p.stat().st_size for p in files))


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def palettized_size_report(
    model_or_dir: nn.Module | str | os.PathLike, bits: tuple[int, ...] = (32, 4, 2, 1), cluster_dim: int = 1
) -> PalettizedSizeReport:
    """Reports the model size at several bit widths, as in the paper's Table 2, plus the actual checkpoint size.

    Args:
        model_or_dir (`nn.Module`, `str` or `os.PathLike`): A model (dense or palettized) or a `save_pretrained`
            folder (a palettized one is read without loading its weights).
        bits (`tuple[int]`, *optional*, defaults to `(32, 4, 2, 1)`): Rows of the table; 32 means uncompressed, others
            must be in 1..8.
        cluster_dim (`int`, *optional*, defaults to 1): Vector dimension assumed for the rows; layers whose output
            channels it does not divide are counted with 1.

    Returns:
        `PalettizedSizeReport`: Print it (or call `to_table()`) for the table.

    Example:
        ```python
        >>> from transformers import MobileNetV1Config, MobileNetV1ForImageClassification
        >>> with torch.device("meta"):
        ...     model = MobileNetV1ForImageClassification(MobileNetV1Config())
        >>> print(palettized_size_report(model))  # doctest: +SKIP
        ```
    """
    for b in bits:
        if b != 32 and not (isinstance(b, int) and 1 <= b <= 8):
            raise ValueError(f"bits must be 32 or in 1..8, got {b!r} in {bits!r}.")
    check_cluster_dim(cluster_dim)
    file_bytes = ideal_bytes = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        if not (directory / "config.json").is_file():
            raise ValueError(f"{directory} is not a save_pretrained folder (no config.json).")
        model, quant = _meta_model_from_dir(directory)
        ideal_bytes, file_bytes = _ideal_from_files(directory, model)
        if quant is None:
            ideal_bytes = None
    else:
        model = model_or_dir

    tensors = _state_tensors(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYER_TYPES)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear, nn.Conv2d, nn.Embedding or Conv1D layer to palettize."
        )
    # A layer whose output channels cluster_dim does not divide (a 2-label classifier at d=4) can only be palettized
    # with scalar vectors: count it at d=1.
    dims = {n: cluster_dim if output_channels_first_shape(m)[0] % cluster_dim == 0 else 1 for n, m in layers}
    first, last = layers[0][0], layers[-1][0]
    layer_names = {n for n, _ in layers}
    weight_numel = {n: m.weight.numel() for n, m in layers}
    other = sum(t.numel() for mn, _, tn, t in tensors if not (tn == "weight" and mn in layer_names))

    quant_all, quant_excl = [], []
    for b in bits:
        all_bytes = other * 4.0 + sum(_bytes_at(numel, b, dims[n]) for n, numel in weight_numel.items())
        excl_bytes = all_bytes
        for edge in {first, last}:
            excl_bytes += _bytes_at(weight_numel[edge], 32, 1) - _bytes_at(weight_numel[edge], b, dims[edge])
        quant_all.append(all_bytes / MIB)
        quant_excl.append(excl_bytes / MIB)

    palettized = palettized_modules(model)
    if palettized and ideal_bytes is None and file_bytes is None:
        ideal_bytes = 0.0
        for module_name, module, tensor_name, tensor in tensors:
            if tensor_name == "weight" and module_name in palettized:
                ideal_bytes += module.num_vectors * module.n_bits / 8.0 + module.weight_lut.numel() * (
                    module.weight_lut.element_size()
                )
                checksum = module._buffers.get("weight_checksum")
                if checksum is not None:  # format version 2: stored next to the indices
                    ideal_bytes += checksum.numel() * checksum.element_size()
            else:
                ideal_bytes += tensor.numel() * tensor.element_size()

    return PalettizedSizeReport(
        model_name=type(model).__name__,
        bits=tuple(bits),
        quant_all_mib=tuple(quant_all),
        quant_excl_first_last_mib=tuple(quant_excl),
        first_layer=first,
        last_layer=last,
        cluster_dim=cluster_dim,
        num_palettizable_params=sum(weight_numel.values()),
        num_elements=sum(t.numel() for *_, t in tensors),
        palettized_layers=len(palettized),
        ideal_mib=None if ideal_bytes is None else ideal_bytes / MIB,
        file_mib=None if file_bytes is None else file_bytes / MIB,
    )

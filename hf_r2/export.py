"""Core ML export that keeps palettized and quantized weights compressed on the device.

`export_coreml(model, example_inputs, "model.mlpackage")` converts a finalized hf_r2 model with coremltools and writes
an ML Program whose compressed layers stay compressed:

* a palettized layer (`PalettizedLinear` / `PalettizedConv2d` / `PalettizedEmbedding` / `PalettizedConv1D`, scalar
  or vector) becomes a `constexpr_lut_to_dense` op: its LUT plus one index per `cluster_dim`-vector;
* a quantized layer (`QuantizedLinear` / `QuantizedConv2d` / `QuantizedConv1D`) with a 4-, 7- or 8-bit grid and an
  integer zero point becomes a `constexpr_blockwise_shift_scale` op (int4/uint4/int8/uint8 codes, per-tensor or
  per-channel scale and offset); any other grid (1-3, 5, 6 bits, or DoReFa's half-integer zero point) becomes a
  `constexpr_lut_to_dense` op whose LUT holds the grid's `2**bits` dequantized levels (one LUT per output channel
  when the scale is per channel): iOS 18's integer op stores only 4- and 8-bit codes, and the LUT keeps a 2-bit grid
  at 2 bits instead of widening it.

How: coremltools' documented compression-info protocol ("Use compression info embedded in torch models" in its
conversion guide): buffers named `_COREML_/weight/<field>` on each compressed module (`compression_type`, `lut`,
`vector_axis`, `quantization_n_bits`, `quantization_scale`, `zero_point`) and `_COREML_/metadata_version` on the
root, registered on a private copy of the model (the caller's model is not modified), which `ct.convert` reads when
it builds each weight. The converter recomputes the indices (codes) from the dense weight and the LUT (scale), so
the exported weights are checked after conversion: the written package is read back, decompressed with
coremltools, and every compressed layer must equal the PyTorch weight exactly and be stored by its constexpr op.
Nothing is written to `path` otherwise.

Requires coremltools (`pip install hf-r2[coreml]`) and the iOS 18 / macOS 15 deployment target or newer: the
vector LUTs, per-channel LUTs and `constexpr_blockwise_shift_scale` are iOS 18 ops, and with an older target
coremltools silently stores dense weights for what it cannot express.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_r2.palettization.compressed import (
    PalettizedConv1D,
    PalettizedConv2d,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedMixin,
    unpalettize,
)
from hf_r2.palettization.layers import DKMLayerMixin
from hf_r2.quantization import functional as quant_functional
from hf_r2.quantization.functional import dequantize
from hf_r2.quantization.layers import (
    QuantConv1D,
    QuantConv2d,
    QuantizedConv1D,
    QuantizedConv2d,
    QuantizedLinear,
    QuantLinear,
)
from hf_r2.utils import atomic_path, replace_dir

__all__ = [
    "COREML_INSTALL_HINT",
    "COREML_LUT_BITS",
    "COREML_PACKAGE_NAME",
    "COREML_REPORT_NAME",
    "CoreMLCompressedWeight",
    "CoreMLExportReport",
    "CoreMLLayerExport",
    "coreml_export_plan",
    "check_coreml_export_request",
    "default_constant_inputs",
    "export_coreml",
    "export_coreml_to_dir",
    "read_coreml_compressed_weights",
]

COREML_INSTALL_HINT = "pip install hf-r2[coreml]"
COREML_PACKAGE_NAME = "model.mlpackage"  # what `export_coreml_to_dir` (the scripts' --export_coreml DIR) writes
COREML_REPORT_NAME = "coreml_export.json"
COREML_LUT_BITS = (1, 2, 3, 4, 6, 8)
"""Index widths of iOS 18's `constexpr_lut_to_dense`; a 5- or 7-bit palette is stored at 6 or 8 bits."""

_BLOCKWISE_BITS = {4: 4, 7: 8, 8: 8}
"""Quantized grids stored as integers by `constexpr_blockwise_shift_scale` (int4/uint4/int8/uint8): grid bits -> stored
bits. Every other grid is stored as a LUT of its levels, which is smaller than widening it to 4 or 8 bits."""

_SUPPORTED_LUT_DTYPES = (torch.float32, torch.float16)
_PALETTIZED_TYPES = (PalettizedLinear, PalettizedConv2d, PalettizedEmbedding, PalettizedConv1D)
_QUANTIZED_TYPES = (QuantizedLinear, QuantizedConv2d, QuantizedConv1D)
_METADATA_PREFIX = "_COREML_"
_WRAPPED_MODEL = "model"  # attribute of the export wrapper holding the model: Core ML names start with it
_PACKAGE_MARKER = "Manifest.json"


def _import_coremltools():
    try:
        import coremltools
    except ImportError as err:
        raise ImportError(
            f"hf_r2.export needs coremltools, an optional dependency of hf-r2: {COREML_INSTALL_HINT} "
            "(coremltools 9.0; it converts on Linux and macOS, Core ML predictions run on macOS only)."
        ) from err
    return coremltools


@dataclass
class CoreMLLayerExport:
    """How one compressed layer is stored in the Core ML package.

    Attributes:
        name (`str`): Module name in the PyTorch model.
        kind (`str`): `"palettized"` or `"quantized"`.
        op_type (`str`): `"constexpr_lut_to_dense"` or `"constexpr_blockwise_shift_scale"`.
        bits (`int`): Stored bits per index (LUT) or per integer code.
        cluster_dim (`int`): Vector size of a LUT entry (1 for scalar LUTs and integer codes).
        lut_rows (`int`): Rows of each stored LUT (`2**bits`; 0 for integer codes).
        num_luts (`int`): Number of LUTs (output channels for a per-channel quantization grid stored as LUTs).
        weight_shape (`tuple[int, ...]`): Shape of the dense weight.
        ideal_bytes (`float`): Indices or codes at exactly `bits` bits (`/ cluster_dim`) plus the LUTs or the scales
            and zero points, at their stored dtype.
        coreml_weight_name (`str`): Name of the weight in the Core ML program.
    """

    name: str
    kind: str
    op_type: str
    bits: int
    cluster_dim: int
    lut_rows: int
    num_luts: int
    weight_shape: tuple[int, ...]
    ideal_bytes: float
    coreml_weight_name: str = ""


@dataclass
class CoreMLExportReport:
    """What `export_coreml` wrote.

    Attributes:
        path (`str`): The `.mlpackage` folder.
        minimum_deployment_target (`str`): E.g. `"iOS18"`.
        compute_precision (`str`): `"float32"` or `"float16"`.
        layers (`dict[str, CoreMLLayerExport]`): Every compressed layer, by PyTorch module name.
        weight_file_bytes (`int`): Size of the package's weight file (`Data/com.apple.CoreML/weights/weight.bin`).
        package_bytes (`int`): Size of every file in the package.
        compressed_ideal_bytes (`float`): Sum of the layers' `ideal_bytes`.
        dense_bytes (`int`): Bytes of the weights stored dense (every other parameter the program keeps), as read
            back from the package.
        verified_layers (`int`): Compressed layers whose decompressed Core ML weight was checked equal to the
            PyTorch weight.
        max_abs_output_difference (`float` or `None`): Largest difference between the traced export module's outputs
            and the model's own on `example_inputs` (PyTorch side; Core ML predictions need macOS).
    """

    path: str
    minimum_deployment_target: str
    compute_precision: str
    layers: dict[str, CoreMLLayerExport] = field(default_factory=dict)
    weight_file_bytes: int = 0
    package_bytes: int = 0
    compressed_ideal_bytes: float = 0.0
    dense_bytes: int = 0
    verified_layers: int = 0
    max_abs_output_difference: float | None = None

    @property
    def ideal_bytes(self) -> float:
        """Compressed layers at their ideal size plus the dense weights."""
        return self.compressed_ideal_bytes + self.dense_bytes

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["ideal_bytes"] = self.ideal_bytes
        return result

    def summary(self) -> str:
        """One line for logs and model cards."""
        ops: dict[str, int] = {}
        for layer in self.layers.values():
            ops[layer.op_type] = ops.get(layer.op_type, 0) + 1
        counts = ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
        return (
            f"Core ML {self.minimum_deployment_target} package {self.path}: weight file "
            f"{self.weight_file_bytes / 2**20:.3f} MiB ({_percent(self.weight_file_bytes, self.ideal_bytes)} vs ideal "
            f"{self.ideal_bytes / 2**20:.3f} MiB); {len(self.layers)} compressed layers ({counts}), "
            f"{self.verified_layers} verified equal to the PyTorch weights."
        )


def _percent(actual: float, ideal: float) -> str:
    return f"{100 * (actual / ideal - 1):+.2f} %" if ideal else "n/a"


# ---------------------------------------------------------------------------------------------------------------
# Planning: which layers are compressed, and how Core ML stores each (pure torch, no coremltools needed)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _LayerPlan:
    report: CoreMLLayerExport
    metadata: dict[str, torch.Tensor]  # `_COREML_/weight/<field>` buffers, without the prefix
    weight: torch.Tensor  # the finalized dense weight, exactly what the export must reproduce


def _lut_bits(rows: int) -> int:
    """Smallest Core ML index width holding `rows` LUT rows."""
    return next(bits for bits in COREML_LUT_BITS if 1 << bits >= rows)


def _pad_lut_rows(lut: torch.Tensor, rows: int) -> torch.Tensor:
    """Pads the LUT axis (-2) to `rows` by repeating the last row: no index points at the padding, and repeating a
    real value (rather than coremltools' zero padding) cannot create a nearer match for any weight."""
    missing = rows - lut.shape[-2]
    if missing <= 0:
        return lut
    last = lut.narrow(-2, lut.shape[-2] - 1, 1)
    return torch.cat([lut, last.expand(*last.shape[:-2], missing, last.shape[-1])], dim=-2)


def _check_float_dtype(name: str, what: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _SUPPORTED_LUT_DTYPES:
        allowed = ", ".join(str(d) for d in _SUPPORTED_LUT_DTYPES)
        raise ValueError(
            f"Layer {name!r}: its {what} has dtype {tensor.dtype}, which Core ML cannot store compressed (allowed: "
            f"{allowed}). Cast the model first, e.g. `model.float()` (lossless from bfloat16)."
        )


def _output_axis(layer: nn.Module) -> int:
    """Axis of the output channels in `layer.weight`: 1 for transformers' `Conv1D` (stored `(in, out)`), else 0."""
    return 1 if isinstance(layer, Conv1D) else 0


def _palettized_plan(name: str, layer: PalettizedMixin) -> _LayerPlan:
    lut = layer.weight_lut.detach()
    _check_float_dtype(name, "LUT (weight_lut)", lut)
    weight = layer.weight.detach()
    if weight.dtype != lut.dtype:
        raise ValueError(
            f"Layer {name!r}: weight dtype {weight.dtype} differs from its LUT dtype {lut.dtype}; the palettized "
            "layer is inconsistent (cast the whole model, not single tensors)."
        )
    rank = weight.dim()
    bits = _lut_bits(lut.shape[0])
    core_lut = _pad_lut_rows(lut.reshape((1,) * rank + tuple(lut.shape)), 1 << bits)
    metadata = {"compression_type": torch.tensor([2]), "lut": core_lut.clone()}
    if layer.cluster_dim > 1:
        # hf_r2's vectors are `cluster_dim` consecutive output channels (`hf_r2.utils.weight_to_vectors`), which
        # the stored weight holds on axis 0 (axis 1 for Conv1D's `(in, out)` weight).
        metadata["vector_axis"] = torch.tensor(_output_axis(layer))
    num_indices = weight.numel() // layer.cluster_dim
    report = CoreMLLayerExport(
        name=name,
        kind="palettized",
        op_type="constexpr_lut_to_dense",
        bits=bits,
        cluster_dim=layer.cluster_dim,
        lut_rows=1 << bits,
        num_luts=1,
        weight_shape=tuple(weight.shape),
        ideal_bytes=num_indices * bits / 8 + core_lut.numel() * core_lut.element_size(),
    )
    return _LayerPlan(report, metadata, weight)


def _channel_shaped(name: str, what: str, tensor: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-tensor or per-output-channel parameter at the weight's rank: `(1, 1, ..)` or `(out, 1, ..)` (output
    channels on `axis`)."""
    shape = [1] * weight.dim()
    if tensor.numel() == 1:
        return tensor.reshape(shape)
    if tensor.numel() == weight.shape[axis]:
        shape[axis] = weight.shape[axis]
        return tensor.reshape(shape)
    raise ValueError(
        f"Layer {name!r}: {what} has {tensor.numel()} values; Core ML export supports a per-tensor or per-output-"
        f"channel ({weight.shape[axis]}) {what}."
    )


def _quantized_plan(name: str, layer: QuantizedLinear | QuantizedConv2d | QuantizedConv1D) -> _LayerPlan:
    layer.check_codes(name)
    scale = layer.weight_scale.detach()
    _check_float_dtype(name, "scale (weight_scale)", scale)
    weight = layer.weight.detach()
    axis = _output_axis(layer)
    scale = _channel_shaped(name, "weight_scale", scale, weight, axis)
    zero_point = layer.weight_zero_point.detach().to(scale.dtype)
    zero_point = _channel_shaped(name, "weight_zero_point", zero_point, weight, axis)
    zero_point = zero_point.expand(torch.broadcast_shapes(scale.shape, zero_point.shape))
    scale = scale.expand(zero_point.shape)
    bits = int(layer.weight_bits)
    q_min, q_max = (int(v) for v in layer.code_range)
    integral_zero_point = bool(torch.equal(zero_point, zero_point.round()))
    if bits in _BLOCKWISE_BITS and integral_zero_point and bool((scale > 0).all()):
        stored_bits = _BLOCKWISE_BITS[bits]
        metadata = {
            "compression_type": torch.tensor([3]),
            "quantization_n_bits": torch.tensor(stored_bits),
            "quantization_scale": scale.clone(),
            "zero_point": zero_point.clone(),
        }
        report = CoreMLLayerExport(
            name=name,
            kind="quantized",
            op_type="constexpr_blockwise_shift_scale",
            bits=stored_bits,
            cluster_dim=1,
            lut_rows=0,
            num_luts=0,
            weight_shape=tuple(weight.shape),
            # Codes, scales, and nonzero zero points (coremltools stores them as integers of the codes' width).
            ideal_bytes=(weight.numel() + (zero_point.numel() if bool(zero_point.any()) else 0)) * stored_bits / 8
            + scale.numel() * scale.element_size(),
        )
        return _LayerPlan(report, metadata, weight)
    # A LUT of the grid's dequantized levels, computed by the very `dequantize` the PyTorch layer uses: the Core ML
    # weight then equals the PyTorch one exactly, whatever the zero point.
    codes = torch.arange(q_min, q_max + 1, dtype=torch.int32, device=scale.device)
    flat_scale, flat_zero_point = scale.reshape(-1, 1), zero_point.reshape(-1, 1)
    levels = dequantize(codes.unsqueeze(0), flat_scale, flat_zero_point)  # (num_luts, 2**bits)
    lut_bits = _lut_bits(levels.shape[1])
    lut = levels.reshape(tuple(scale.shape) + (levels.shape[1], 1))
    lut = _pad_lut_rows(lut, 1 << lut_bits)
    metadata = {"compression_type": torch.tensor([2]), "lut": lut.contiguous()}
    report = CoreMLLayerExport(
        name=name,
        kind="quantized",
        op_type="constexpr_lut_to_dense",
        bits=lut_bits,
        cluster_dim=1,
        lut_rows=1 << lut_bits,
        num_luts=levels.shape[0],
        weight_shape=tuple(weight.shape),
        ideal_bytes=weight.numel() * lut_bits / 8 + lut.numel() * lut.element_size(),
    )
    return _LayerPlan(report, metadata, weight)


def coreml_export_plan(model: nn.Module) -> dict[str, CoreMLLayerExport]:
    """Checks that `model` can be exported compressed and returns how each compressed layer will be stored.

    Needs no coremltools: use it to check a model (or estimate its Core ML size) before converting.

    Raises:
        ValueError: Naming the layer, if the model still holds DKM or fake-quantized training layers (not
            finalized), a compressed layer of a type Core ML export does not support, a LUT or scale dtype Core ML
            cannot store, or if it holds no compressed layer at all.
    """
    return {name: plan.report for name, plan in _plan(model).items()}


def _plan(model: nn.Module) -> dict[str, _LayerPlan]:
    plans: dict[str, _LayerPlan] = {}
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, DKMLayerMixin):
            raise ValueError(
                f"Layer {label!r} is a {type(module).__name__}, a DKM training layer: the model is not finalized. Run "
                "hf_r2.palettization.finalize(model) first (Core ML needs the LUT and indices it produces)."
            )
        if isinstance(module, QuantLinear | QuantConv2d | QuantConv1D):
            raise ValueError(
                f"Layer {label!r} is a {type(module).__name__}, a fake-quantized training layer: the model is not "
                "finalized. Run hf_r2.quantization.finalize(model) first (Core ML needs its integer codes and scales)."
            )
        if isinstance(module, PalettizedMixin | QuantizedLinear | QuantizedConv2d | QuantizedConv1D):
            if type(module) not in _PALETTIZED_TYPES + _QUANTIZED_TYPES:
                allowed = ", ".join(t.__name__ for t in _PALETTIZED_TYPES + _QUANTIZED_TYPES)
                raise ValueError(
                    f"Layer {label!r} is a {type(module).__name__}, which Core ML export cannot hold compressed "
                    f"(supported: {allowed}); a subclass may use its weight in ways the converter does not see."
                )
            if isinstance(module, PalettizedMixin):
                plans[name] = _palettized_plan(label, module)
            else:
                plans[name] = _quantized_plan(label, module)
    if not plans:
        raise ValueError(
            f"{type(model).__name__} has no palettized or quantized layer, so a Core ML export would be dense. "
            "Finalize it first: hf_r2.palettization.finalize(model) (a transformers model; for a plain nn.Module "
            "build the layers with hf_r2.palettization.to_palettized) or hf_r2.quantization.finalize(model)."
        )
    return plans


# ---------------------------------------------------------------------------------------------------------------
# The export copy: plain layers holding the exact finalized weights plus coremltools' compression-info buffers
# ---------------------------------------------------------------------------------------------------------------


class _CoreMLQuantizedLinear(nn.Linear):
    """`QuantizedLinear` for tracing: the dequantized weight as a constant parameter, the input quantizer kept."""

    input_quantizer: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight, self.bias)


class _CoreMLQuantizedConv2d(nn.Conv2d):
    """`QuantizedConv2d` for tracing (see `_CoreMLQuantizedLinear`)."""

    input_quantizer: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.weight, self.bias)


class _CoreMLQuantizedConv1D(Conv1D):
    """`QuantizedConv1D` for tracing (see `_CoreMLQuantizedLinear`)."""

    input_quantizer: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return super().forward(x)


def _traceable_quantized(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    if isinstance(layer, QuantizedConv1D):
        new = _CoreMLQuantizedConv1D(layer.nf, layer.nx)
    elif isinstance(layer, QuantizedLinear):
        new = _CoreMLQuantizedLinear(layer.in_features, layer.out_features, bias=False, device="meta")
    else:
        new = _CoreMLQuantizedConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=False,
            padding_mode=layer.padding_mode,
            device="meta",
        )
    new.weight = nn.Parameter(weight.clone(), requires_grad=False)
    new.bias = layer.bias
    new.input_quantizer = layer.input_quantizer
    new.train(False)
    return new


@contextlib.contextmanager
def _autograd_free_quantizers():
    """Temporarily gives hf_r2's quantizer math plain-tensor forward functions while tracing.

    The straight-through round, EWGS round and LSQ gradient scale are `torch.autograd.Function`s, which
    `torch.jit.trace` records as opaque Python ops that coremltools cannot convert. Their forward values are
    `torch.round(x)` and `x`, so the input (activation) quantizers of a finalized model trace to ordinary round /
    clamp / multiply ops with the same outputs (`export_coreml` checks the traced outputs against the model's).
    """
    replacements = {
        "round_ste": lambda x: torch.round(x),
        "round_ewgs": lambda x, delta, levels: torch.round(x),
        "grad_scale": lambda x, scale: x,
    }
    saved = {name: getattr(quant_functional, name) for name in replacements}
    try:
        for name, function in replacements.items():
            setattr(quant_functional, name, function)
        yield
    finally:
        for name, function in saved.items():
            setattr(quant_functional, name, function)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class _ExportModule(nn.Module):
    """What is traced: the model called with keyword inputs, returning a tuple of tensors.

    For a transformers model it also applies two fixed-shape adaptations the Core ML converter needs (both checked
    against the model's own outputs by `export_coreml`): a 2-D `attention_mask` is passed as the 4-D mask the
    attention layers use (transformers' mask builders trace to ops coremltools 9.0 cannot convert), and
    `constant_inputs` (e.g. `position_ids`) are baked in as constants.
    """

    def __init__(
        self,
        model: nn.Module,
        input_names: Sequence[str],
        constant_inputs: Mapping[str, Any],
        expand_attention_mask: str | torch.dtype | None,
    ):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.constant_names = list(constant_inputs)
        self.python_constants = {}  # flags such as use_cache=False: passed as they are
        for index, (name, value) in enumerate(constant_inputs.items()):
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"constant_input_{index}", value.detach().clone(), persistent=False)
            else:
                self.python_constants[name] = value
        self.expand_attention_mask = expand_attention_mask

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.input_names, tensors, strict=True))
        for index, name in enumerate(self.constant_names):
            kwargs[name] = self.python_constants.get(name, getattr(self, f"constant_input_{index}", None))
        mask = kwargs.get("attention_mask")
        if self.expand_attention_mask is not None and mask is not None and mask.dim() == 2:
            keep = mask[:, None, None, :].bool()
            if self.expand_attention_mask == "bool":
                kwargs["attention_mask"] = keep
            else:  # an additive float mask: transformers' eager attention adds it to the scores
                dtype = self.expand_attention_mask
                kwargs["attention_mask"] = (~keep).to(dtype) * torch.finfo(dtype).min
        return _output_tensors(self.model(**kwargs))[1]


def _output_tensors(outputs: Any) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Names and tensors of a model's outputs (a tensor, a tuple, or a transformers `ModelOutput`)."""
    if isinstance(outputs, torch.Tensor):
        return ["output"], (outputs,)
    if isinstance(outputs, Mapping):
        items = [(k, v) for k, v in outputs.items() if isinstance(v, torch.Tensor)]
        return [k for k, _ in items], tuple(v for _, v in items)
    if isinstance(outputs, Sequence):
        tensors = tuple(v for v in outputs if isinstance(v, torch.Tensor))
        return [f"output_{i}" for i in range(len(tensors))], tensors
    raise TypeError(f"Cannot export a model whose forward returns {type(outputs).__name__}; return tensors.")


def _mask_mode(model: nn.Module) -> str | torch.dtype | None:
    """How `_ExportModule` passes a 2-D attention mask: `None` (as given: not a transformers model), `"bool"` (SDPA
    attention) or the float dtype of an additive mask (eager attention)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(config, "_attn_implementation", None) == "sdpa":
        return "bool"
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Conversion, verification, atomic write
# ---------------------------------------------------------------------------------------------------------------


def _coreml_name(name: str) -> str:
    """The name coremltools gives a torch parameter in the saved program (anything but [A-Za-z0-9_] becomes `_`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _resolve_target(ct, target: Any):
    if target is None:
        return ct.target.iOS18
    if isinstance(target, str):
        try:
            target = ct.target[target]
        except KeyError:
            target = None
    newer = sorted({t.name for t in ct.target if t >= ct.target.iOS18})
    if not isinstance(target, ct.target) or target < ct.target.iOS18:
        raise ValueError(
            f"minimum_deployment_target={getattr(target, 'name', target)!r} is too old for a compressed export: the "
            "vector and per-channel LUTs and the integer-weight op Core ML needs to keep hf_r2's weights compressed "
            f"are iOS 18 / macOS 15 ops, and older targets would store dense weights. Use one of {newer} "
            "(default iOS18)."
        )
    return target


def _example_inputs(example_inputs: Any) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = {"input": example_inputs}
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        raise TypeError(
            "example_inputs must be a dict of named tensors (the model's keyword arguments, e.g. input_ids and "
            "attention_mask) or one tensor (passed as `input`), so the Core ML inputs get the model's names."
        )
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise TypeError(f"example_inputs must be a non-empty dict of tensors, got {type(example_inputs).__name__}.")
    for key, value in example_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"example_inputs[{key!r}] must be a tensor, got {type(value).__name__}.")
    return dict(example_inputs)


def _tensor_type(ct, name: str, tensor: torch.Tensor):
    import numpy as np

    if tensor.is_floating_point():
        dtype = np.float16 if tensor.dtype == torch.float16 else np.float32
    elif tensor.dtype == torch.bool:
        dtype = bool
    else:
        dtype = np.int32  # Core ML has no int64 inputs
    return ct.TensorType(name=name, shape=tuple(tensor.shape), dtype=dtype)


def _check_package_path(path: Path) -> None:
    if path.suffix != ".mlpackage":
        raise ValueError(f"path must end with .mlpackage (a Core ML ML Program package), got {str(path)!r}.")
    if path.exists() and not (path.is_dir() and (path / _PACKAGE_MARKER).is_file()):
        raise FileExistsError(
            f"{str(path)!r} exists and is not a Core ML package (no {_PACKAGE_MARKER}); refusing to replace it."
        )


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@dataclass
class CoreMLCompressedWeight:
    """One compressed weight of a saved Core ML program, decompressed by coremltools.

    Attributes:
        name (`str`): Weight (constexpr op output) name in the program.
        op_type (`str`): `constexpr_lut_to_dense` or `constexpr_blockwise_shift_scale`.
        value (`numpy.ndarray`): The dense weight, decompressed by the op's own coremltools implementation.
        stored (`dict[str, numpy.ndarray]`): The op's stored tensors (`indices` + `lut`, or `data` + `scale` [+
            `offset`]), as written in the weight file.
    """

    name: str
    op_type: str
    value: Any
    stored: dict[str, Any]


def read_coreml_compressed_weights(package: str | os.PathLike) -> tuple[dict[str, CoreMLCompressedWeight], dict]:
    """Reads a saved `.mlpackage` back and decompresses every constexpr weight with coremltools.

    The program's ops come from its spec (`coremltools.utils.load_spec`), the stored tensors from the weight file
    (`coremltools.optimize.coreml.get_weights_metadata`), and the dense values from the iOS 18 op definitions'
    own `decompress`. (`coremltools.optimize.coreml.decompress_weights` would re-run the converter's constant
    folding, which removes a compressed table whose lookup has constant indices, e.g. BERT's position embeddings.)

    Args:
        package (`str` or `os.PathLike`): The `.mlpackage` folder.

    Returns:
        `tuple`: (`{weight name: CoreMLCompressedWeight}`, `{name: CoreMLWeightMetaData}` of every stored tensor).

    Raises:
        ValueError: If a constexpr op is of a type this reader does not decompress.
    """
    ct = _import_coremltools()
    import coremltools.optimize.coreml as cto
    import numpy as np
    from coremltools.converters.mil.mil.ops.defs.iOS18 import (
        constexpr_blockwise_shift_scale,
        constexpr_lut_to_dense,
    )

    spec = ct.utils.load_spec(str(package))
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    stored = cto.get_weights_metadata(ct.models.MLModel(str(package), skip_model_load=True), weight_threshold=0)
    params: dict[str, dict[str, Any]] = {}
    for metadata in stored.values():
        for child in metadata.child_ops:
            if child.op_type.startswith("constexpr"):
                params[child.name] = {arg: stored[weight].val for arg, weight in child.params_name_mapping.items()}
    weights = {}
    for op in operations:
        if not op.type.startswith("constexpr"):
            continue
        name = op.outputs[0].name
        args = dict(params.get(name, {}))
        for arg, binding in op.inputs.items():  # scalars (vector_axis) are immediate values in the spec
            for argument in binding.arguments:
                if arg not in args and argument.HasField("value"):
                    args[arg] = np.asarray(argument.value.immediateValue.tensor.ints.values, dtype=np.int32)
        if op.type == "constexpr_lut_to_dense":
            axis = args.get("vector_axis")
            axis = None if axis is None or axis.size == 0 else int(axis.reshape(-1)[0])
            value = constexpr_lut_to_dense.decompress(args["indices"], args["lut"], axis)
        elif op.type == "constexpr_blockwise_shift_scale":
            value = constexpr_blockwise_shift_scale.decompress(args["data"], args["scale"], args.get("offset"))
        else:
            raise ValueError(f"Core ML weight {name!r} is stored by a {op.type} op, which this reader does not handle.")
        weights[name] = CoreMLCompressedWeight(name, op.type, value, args)
    return weights, stored


def _verify_package(package: Path, plans: dict[str, _LayerPlan], precision: str) -> tuple[int, int]:
    """Checks the written package: every compressed layer stored by its constexpr op and equal to the PyTorch weight.

    Returns:
        `(verified_layers, dense_bytes)`: dense bytes are the floating tensors stored outside constexpr ops.
    """
    import numpy as np

    weights, stored = read_coreml_compressed_weights(package)
    problems = []
    for name, plan in plans.items():
        found = weights.get(plan.report.coreml_weight_name)
        if found is None and precision == "float16":
            # The float16 pass casts the weight (LUT or scale) and renames its op.
            found = weights.get(plan.report.coreml_weight_name + "_cast_fp16")
            if found is not None:
                plan.report.coreml_weight_name = found.name
        if found is None or found.op_type != plan.report.op_type:
            what = f"a {found.op_type} op" if found else "a dense constant (or no weight of that name)"
            problems.append(f"{name!r}: expected {plan.report.op_type}, found {what}")
            continue
        expected = plan.weight.to(torch.float16 if precision == "float16" else plan.weight.dtype).cpu().numpy()
        value = np.asarray(found.value)
        if value.shape != expected.shape:
            problems.append(f"{name!r}: decompressed weight has shape {value.shape}, expected {expected.shape}")
        elif value.dtype != expected.dtype or not np.array_equal(value, expected):
            diff = float(np.abs(value.astype(np.float64) - expected.astype(np.float64)).max())
            problems.append(f"{name!r}: decompressed {value.dtype} weight differs by up to {diff:.3g}")
    if problems:
        raise RuntimeError(
            "The converted Core ML program does not hold every compressed layer compressed and equal to the PyTorch "
            "weights: " + "; ".join(problems) + ". Nothing was written to the output path."
        )
    dense_bytes = 0
    for metadata in stored.values():
        if any(child.op_type.startswith("constexpr") for child in metadata.child_ops):
            continue
        value = np.asarray(metadata.val)
        if value.dtype.kind == "f":
            dense_bytes += value.nbytes
    return len(plans), dense_bytes


def export_coreml(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    *,
    minimum_deployment_target: Any = None,
    compute_precision: str = "float32",
    constant_inputs: Mapping[str, Any] | None = None,
    output_names: Sequence[str] | None = None,
    atol: float = 1e-4,
) -> CoreMLExportReport:
    """Converts a finalized palettized or quantized model into a Core ML `.mlpackage` whose weights stay compressed.

    The model is traced on a private copy (the caller's model is left as it was) with fixed input shapes, converted
    by coremltools with the compressed layers described through its compression-info protocol, written to a
    temporary package next to `path`, read back and checked, and only then moved to `path` (an existing package
    there is replaced in one step).

    Args:
        model (`nn.Module`): A model finalized by `hf_r2.palettization.finalize` (palettized layers) and/or
            `hf_r2.quantization.finalize` (quantized layers); other layers stay dense.
        example_inputs (`dict[str, torch.Tensor]` or `torch.Tensor`): Keyword inputs of `model.forward`; their names,
            shapes and dtypes become the Core ML inputs (int64 becomes int32). A single tensor is passed as `input`.
        path (`str` or `os.PathLike`): Output folder, ending in `.mlpackage`.
        minimum_deployment_target (`coremltools.target` or `str`, *optional*, defaults to `iOS18`): `iOS18`,
            `macOS15` or newer; older targets are refused (they cannot hold the compressed weights).
        compute_precision (`str`, *optional*, defaults to `"float32"`): `"float32"` keeps every weight and LUT value
            bit-identical to PyTorch; `"float16"` runs activations in float16 and stores LUTs and dense weights in
            float16 (the indices, codes and the verification are unchanged, against the float16-rounded weights).
        constant_inputs (`dict[str, Any]`, *optional*): Keyword inputs baked into the program as constants rather
            than Core ML inputs: tensors, e.g. `{"position_ids": torch.arange(seq_len)[None]}` for BERT-style models,
            whose default position ids trace to an op coremltools 9.0 cannot convert with numpy 2, or flags such as
            `use_cache=False`.
        output_names (`list[str]`, *optional*): Core ML output names; default: the model's (`logits`, ...).
        atol (`float`, *optional*, defaults to 1e-4): Largest allowed difference between the traced export module and
            the model on `example_inputs` (PyTorch side), which guards the fixed-shape adaptations.

    Returns:
        `CoreMLExportReport`: Per-layer storage, sizes, and what was verified.

    Raises:
        ImportError: Without coremltools (`pip install hf-r2[coreml]`).
        ValueError: For a model that is not finalized, a layer or LUT dtype Core ML cannot hold compressed (naming the
            layer), an older deployment target, a bad path, or outputs that change under the export adaptations.
        RuntimeError: If the converted program stores a compressed layer dense or with different values (nothing
            is written then).

    Example:
        ```python
        >>> from hf_r2.export import export_coreml
        >>> inputs = tokenizer(["a sentence"], padding="max_length", max_length=128, return_tensors="pt")
        >>> report = export_coreml(model, dict(inputs), "out/model.mlpackage")
        >>> print(report.summary())
        ```
    """
    ct = _import_coremltools()
    target = _resolve_target(ct, minimum_deployment_target)
    if compute_precision not in ("float32", "float16"):
        raise ValueError(f"compute_precision must be 'float32' or 'float16', got {compute_precision!r}.")
    path = Path(path)
    _check_package_path(path)
    inputs = _example_inputs(example_inputs)
    constants = dict(constant_inputs or {})
    overlap = sorted(set(constants) & set(inputs))
    if overlap:
        raise ValueError(f"{overlap} are both in example_inputs and constant_inputs; give each input once.")
    plans = _plan(model)

    # A private CPU copy: the caller's model (its device, training mode, layers) is left as it was.
    export_model = copy.deepcopy(model).cpu().eval()
    inputs = {name: tensor.cpu() for name, tensor in inputs.items()}
    constants = {name: v.cpu() if isinstance(v, torch.Tensor) else v for name, v in constants.items()}
    example = tuple(inputs.values())
    with torch.no_grad():
        # The model's own outputs, without the export adaptations (constant inputs, 4-D mask), to check them against.
        names, expected = _output_tensors(export_model(**inputs))
    for plan in plans.values():
        plan.weight = plan.weight.cpu()
        plan.metadata = {key: value.cpu() for key, value in plan.metadata.items()}
    _build_export_layers(export_model, plans)
    wrapper = _ExportModule(
        export_model, list(inputs), constants, _mask_mode(model) if "attention_mask" in inputs else None
    )
    wrapper.register_buffer(f"{_METADATA_PREFIX}/metadata_version", torch.tensor(1))
    for name, plan in plans.items():
        plan.report.coreml_weight_name = _coreml_name(f"{_WRAPPED_MODEL}.{name}.weight")

    with torch.no_grad():
        wrapper.eval()
        with _autograd_free_quantizers():
            traced = torch.jit.trace(wrapper, example, check_trace=False, strict=False)
        outputs = traced(*example)
    if len(outputs) != len(expected):
        raise ValueError(f"The export module returns {len(outputs)} outputs, the model {len(expected)}.")
    max_diff = max(
        (float((o.float() - e.float()).abs().max()) for o, e in zip(outputs, expected, strict=True)), default=0.0
    )
    if not max_diff <= atol:
        raise ValueError(
            f"The traced export module's outputs differ from the model's by {max_diff:.3g} (> atol={atol}) on "
            "example_inputs: a constant input or the attention-mask adaptation does not fit this model."
        )
    if output_names is None:
        output_names = names
    output_names = list(output_names)
    if len(output_names) != len(outputs):
        raise ValueError(f"output_names has {len(output_names)} names for {len(outputs)} outputs.")

    mlmodel = ct.convert(
        traced,
        inputs=[_tensor_type(ct, name, tensor) for name, tensor in inputs.items()],
        outputs=[ct.TensorType(name=name) for name in output_names],
        minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT32 if compute_precision == "float32" else ct.precision.FLOAT16,
        convert_to="mlprogram",
    )
    mlmodel.author = "hf_r2"
    mlmodel.short_description = "hf_r2 export: palettized / quantized weights kept compressed"

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp")
    tmp_dir.mkdir()
    try:
        tmp_package = tmp_dir / path.name
        mlmodel.save(str(tmp_package))
        verified, dense_bytes = _verify_package(tmp_package, plans, compute_precision)
        replace_dir(tmp_package, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    weight_file = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    layers = {name: plan.report for name, plan in plans.items()}
    return CoreMLExportReport(
        path=str(path),
        minimum_deployment_target=target.name,
        compute_precision=compute_precision,
        layers=layers,
        weight_file_bytes=weight_file.stat().st_size if weight_file.exists() else 0,
        package_bytes=_folder_bytes(path),
        compressed_ideal_bytes=sum(layer.ideal_bytes for layer in layers.values()),
        dense_bytes=dense_bytes,
        verified_layers=verified,
        max_abs_output_difference=max_diff,
    )


def _build_export_layers(export_model: nn.Module, plans: dict[str, _LayerPlan]) -> None:
    """Turns the copy's compressed layers into plain traceable layers carrying coremltools' compression info."""
    quantized = {name: module for name, module in export_model.named_modules() if isinstance(module, _QUANTIZED_TYPES)}
    for name, layer in quantized.items():
        _set_submodule(export_model, name, _traceable_quantized(layer, plans[name].weight))
    # Palettized layers back to their plain class, holding the decoded weight (also drops the copy's
    # quantization_config, which the export does not need).
    unpalettize(export_model)
    for name, plan in plans.items():
        module = export_model.get_submodule(name)
        module.weight.requires_grad_(False)
        for key, value in plan.metadata.items():
            module.register_buffer(f"{_METADATA_PREFIX}/weight/{key}", value.to(module.weight.device))


def _signature_has(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def default_constant_inputs(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Constant inputs a BERT-family transformers model needs for export: its own default `position_ids`.

    BERT, MobileBERT and friends slice `embeddings.position_ids[:, :seq_len]` when no position ids are given, which
    traces to an op coremltools 9.0 cannot convert (with numpy 2); passing that same slice as a constant gives the
    same outputs (`export_coreml` checks it). Models that compute position ids from the tokens (RoBERTa) are
    returned nothing.
    """
    if "position_ids" in example_inputs or not _signature_has(model, "position_ids"):
        return {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    position_ids = getattr(embeddings, "position_ids", None)
    reference = next(iter(example_inputs.values()))
    if model_type not in _ABSOLUTE_POSITION_MODELS or position_ids is None or reference.dim() < 2:
        return {}
    return {"position_ids": position_ids[:, : reference.shape[1]].clone()}


_ABSOLUTE_POSITION_MODELS = frozenset({"bert", "mobilebert", "distilbert", "electra", "albert"})


def check_coreml_export_request(export_dir: str | os.PathLike | None, compression_method: str | None) -> None:
    """Checks an example script's `--export_coreml DIR` before training, so a run does not fail at its very end.

    Args:
        export_dir (`str` or `os.PathLike`, *optional*): The flag's value; `None` checks nothing.
        compression_method (`str`, *optional*): The script's compression method (`"dkm"`, `"lsq"`, ...), `None` if
            the run compresses nothing.

    Raises:
        ValueError: Without a compression method (a dense model has nothing to keep compressed), or if `export_dir` is
            an existing file.
        ImportError: Without coremltools (`pip install hf-r2[coreml]`).
    """
    if export_dir is None:
        return
    if compression_method is None:
        raise ValueError(
            f"--export_coreml {export_dir} exports the compressed model, but this run compresses nothing: add "
            "--dkm_bits (palettization) or --quant_method (quantization)."
        )
    if Path(export_dir).exists() and not Path(export_dir).is_dir():
        raise ValueError(f"--export_coreml {export_dir} is an existing file; give a folder.")
    _import_coremltools()


def export_coreml_to_dir(
    model: nn.Module, example_inputs: Mapping[str, torch.Tensor] | torch.Tensor, export_dir: str | os.PathLike, **kwargs
) -> CoreMLExportReport:
    """`export_coreml` into `export_dir/model.mlpackage` plus `export_dir/coreml_export.json` (the report).

    What the example scripts' `--export_coreml DIR` runs. BERT-family models get their default position ids as a
    constant (`default_constant_inputs`). Other keyword arguments go to `export_coreml`.
    """
    export_dir = Path(export_dir)
    inputs = _example_inputs(example_inputs)
    kwargs.setdefault("constant_inputs", default_constant_inputs(model, inputs))
    report = export_coreml(model, inputs, export_dir / COREML_PACKAGE_NAME, **kwargs)
    with atomic_path(export_dir / COREML_REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=list) + "\n")
    return report

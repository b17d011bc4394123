"""One config dataclass per quantization method, and the name -> config registry used by the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from transformers import PretrainedConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_r2.utils import check_bits

QUANTIZATION_CONFIGS: dict[str, type[QuantizationConfig]] = {}


def register_quantization_method(name: str):
    """Class decorator registering a config class under `name` (the `--quant_method` value)."""

    def wrap(cls):
        if name in QUANTIZATION_CONFIGS:
            raise ValueError(f"Quantization method {name!r} is already registered.")
        cls.method = name
        QUANTIZATION_CONFIGS[name] = cls
        return cls

    return wrap


@dataclass
class QuantizationConfig:
    """Fields every method shares.

    Selection follows `hf_r2.utils.select_modules`: by default every `nn.Linear` and `nn.Conv2d` is quantized, first
    and last layers included (as in the R² paper); `exclude_modules` removes layers by name.
    """

    method: ClassVar[str] = ""
    #: Whether the method trains with fake quantization (QAT: applied before training) rather than rounding a trained
    #: model (post-training: applied after training). The example scripts' flags read it.
    quantization_aware: ClassVar[bool] = True

    w_bits: int = field(default=4, metadata={"help": "Weight bit width, 1..8."})
    a_bits: int | None = field(
        default=None,
        metadata={"help": "Bit width of each quantized layer's input activation, 1..8; None quantizes weights only."},
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Layers to quantize: names (suffix match) or one regex (full match). Default: every Linear/Conv2d."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Layers to leave in full precision, same syntax as target_modules."}
    )
    version: int = field(default=1, metadata={"help": "Config format version, for forward compatibility."})

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | list | tuple):
                raise ValueError(f"{name} must be a string (regex), a list of names or None, got {value!r}.")
        if self.version != 1:
            raise ValueError(f"Unsupported {type(self).__name__} version {self.version!r}; this hf_r2 reads version 1.")

    def to_dict(self) -> dict[str, Any]:
        """Serializable dict, with the method name under `quant_method`."""
        return {"quant_method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        """Inverse of `to_dict`: builds the config of the method named in `data["quant_method"]`."""
        data = dict(data)
        return get_quantization_config(data.pop("quant_method"), **data)


def _check_signed(value, name: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None (decide from the first batch), got {value!r}.")


@register_quantization_method("lsq")
@dataclass
class LSQConfig(QuantizationConfig):
    """Learned step size quantization (Esser et al., 2020) of weights (signed) and optionally activations.

    The activation grid is unsigned (`[0, 2^b - 1]`) when the input is non-negative (e.g. after a ReLU) and signed
    otherwise; `a_signed=None` decides from the first batch each layer sees.
    """

    a_signed: bool | None = field(
        default=None,
        metadata={"help": "Signed activation grid; None decides from the first batch (signed if it has negatives)."},
    )
    eps: float = field(default=1e-8, metadata={"help": "Smallest step size (keeps the learned step positive)."})

    def __post_init__(self):
        super().__post_init__()
        if self.w_bits < 2:
            raise ValueError(
                f"{type(self).__name__} quantizes weights on a signed grid [-2^(b-1), 2^(b-1)-1], which needs "
                f"w_bits >= 2 (got w_bits={self.w_bits}); use PACTConfig (DoReFa) or PTQConfig for 1-bit weights."
            )
        _check_signed(self.a_signed, "a_signed")
        if self.a_signed and self.a_bits == 1:
            raise ValueError("a_signed=True needs a_bits >= 2 (a signed 1-bit grid is {-s, 0}), got a_bits=1.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}.")


@register_quantization_method("ewgs")
@dataclass
class EWGSConfig(LSQConfig):
    """LSQ quantizer trained with element-wise gradient scaling (Lee et al., 2021).

    The round's gradient becomes `g * (1 + delta * sign(g) * (x_n - x_q))` with `x_n` in the paper's normalized
    `[0, 1]` domain. `delta` is the starting value; `hf_r2.quantization.estimate_ewgs_deltas` (or
    `EWGSDeltaCallback` in a Trainer) updates it per quantizer from a Hutchinson Hessian-trace estimate as the paper
    does: `delta = (Tr(H) / N) / (3 * std(g))`.
    """

    delta: float = field(default=1e-3, metadata={"help": "EWGS gradient-scaling factor (>= 0; 0 is the plain STE)."})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.delta, int | float) or not self.delta >= 0:
            raise ValueError(f"delta must be a number >= 0, got {self.delta!r}.")


@register_quantization_method("pact")
@dataclass
class PACTConfig(QuantizationConfig):
    """PACT activations (Choi et al., 2018) with DoReFa weights.

    Activations are clipped at a learnable `alpha` per layer, `y = clip(x, 0, alpha)`, and quantized to `a_bits`.
    `alpha`'s L2 penalty `alpha_l2 / 2 * alpha^2` is applied inside the layer, as a gradient hook adding
    `alpha_l2 * alpha` to alpha's gradient, so no trainer change is needed (it is added once per backward pass: with
    `k` gradient-accumulation steps, pass `alpha_l2 / k`). Inputs with negatives (not after a ReLU) use the symmetric
    extension `clip(x, -alpha, alpha)`.
    """

    alpha_init: float = field(default=10.0, metadata={"help": "Initial clipping level alpha (PACT's default, 10)."})
    alpha_l2: float = field(
        default=1e-4, metadata={"help": "L2 coefficient lambda of alpha's penalty lambda/2 * alpha^2 (>= 0)."}
    )
    a_signed: bool | None = field(
        default=None,
        metadata={"help": "Clip to [-alpha, alpha] instead of [0, alpha]; None decides from the first batch."},
    )
    dorefa_rescale: bool = field(
        default=True,
        metadata={
            "help": "Multiply DoReFa weights (in [-1, 1]) by the layer's max|w| so pretrained layers keep their "
            "scale; False is the paper's plain [-1, 1] for layers followed by a norm."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.alpha_init, int | float) or not self.alpha_init > 0:
            raise ValueError(f"alpha_init must be > 0, got {self.alpha_init!r}.")
        if not isinstance(self.alpha_l2, int | float) or not self.alpha_l2 >= 0:
            raise ValueError(f"alpha_l2 must be >= 0, got {self.alpha_l2!r}.")
        _check_signed(self.a_signed, "a_signed")


@register_quantization_method("ptq")
@dataclass
class PTQConfig(QuantizationConfig):
    """Round-to-nearest post-training quantization, min/max ranges (torch.ao's MinMaxObserver conventions).

    Weights: per-tensor or per-output-channel, symmetric or asymmetric, from the current weights. Activations
    (`a_bits`): per-tensor ranges from `hf_r2.quantization.calibrate(model, batches)`.
    """

    quantization_aware: ClassVar[bool] = False

    per_channel: bool = field(default=True, metadata={"help": "One weight scale per output channel (else per tensor)."})
    symmetric: bool = field(default=True, metadata={"help": "Symmetric (signed, zero point 0) weight grid."})
    a_symmetric: bool = field(default=False, metadata={"help": "Symmetric activation grid (else asymmetric)."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("per_channel", "symmetric", "a_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.symmetric and self.w_bits < 2:
            raise ValueError(
                "A symmetric 1-bit grid {-2s, 0} rounds every weight to 0: use w_bits >= 2 or symmetric=False "
                f"(got w_bits={self.w_bits}, symmetric=True)."
            )
        if self.a_symmetric and self.a_bits == 1:
            raise ValueError("A symmetric 1-bit activation grid is degenerate: use a_bits >= 2 or a_symmetric=False.")


def quantization_methods(*, quantization_aware: bool | None = None) -> list[str]:
    """The registered `--quant_method` names, in registration order.

    Args:
        quantization_aware (`bool`, *optional*): Only the QAT methods (`True`) or only the post-training ones
            (`False`); all by default.
    """
    return [
        name
        for name, cls in QUANTIZATION_CONFIGS.items()
        if quantization_aware is None or cls.quantization_aware == quantization_aware
    ]


def get_quantization_config(method: str, **kwargs) -> QuantizationConfig:
    """Builds the config of a method by name, for command-line use.

    Args:
        method (`str`): One of `lsq`, `ewgs`, `pact`, `ptq` (case-insensitive).
        **kwargs: Fields of that method's config; unknown fields raise.

    Example:
        ```python
        config = get_quantization_config("lsq", w_bits=2, a_bits=2)
        ```
    """
    key = method.lower() if isinstance(method, str) else method
    if key not in QUANTIZATION_CONFIGS:
        raise ValueError(f"Unknown quantization method {method!r}; choose one of {sorted(QUANTIZATION_CONFIGS)}.")
    cls = QUANTIZATION_CONFIGS[key]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}.")
    return cls(**kwargs)


HF_QUANT_METHOD = "hf_r2_quantization"
#: On-disk layout of finalized quantized checkpoints. 2: each layer's integer codes are its 1-D `weight` entry (the key
#: convention of palettized checkpoints too); 1: codes under `weight_int` next to an empty `weight` placeholder.
FORMAT_VERSION = 2


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
    if isinstance(getattr(model, "config", None), PretrainedConfig):
        model.config.quantization_config = HfR2QuantizationConfig(method_config=config.to_dict(), layers=list(layers))

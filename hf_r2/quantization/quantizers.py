"""Quantizer modules: what a fake-quantized layer applies to its weight and to its input.

* Weight quantizers map a weight to its fake-quantized value and expose `encode` (codes, scale, zero point).
* Input (activation) quantizers fake-quantize a layer's input; those that learn (LSQ, PACT) initialize lazily from
  the first batch, those that do not (PTQ) need `calibrate`.

The layers that hold them are in `hf_r2.quantization.layers`.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_r2.quantization.functional import (
    add_l2_grad,
    channel_minmax,
    dequantize,
    dorefa_weight_encode,
    lsq_encode,
    lsq_grad_scale,
    lsq_init_step,
    minmax_qparams,
    pact_encode,
    rtn_encode,
    signed_range,
    unsigned_range,
)

__all__ = [
    "DoReFaWeightQuantizer",
    "LSQInputQuantizer",
    "LSQWeightQuantizer",
    "PACTInputQuantizer",
    "RTNInputQuantizer",
    "RTNWeightQuantizer",
    "WeightQuantizer",
]


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Averages `t` across processes so that lazily initialized parameters agree between DDP ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def _all_reduce_min_max(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        lo, hi = lo.clone(), hi.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return lo, hi


def _check_symmetric_bits(bits: int, symmetric: bool) -> None:
    if symmetric and bits < 2:
        raise ValueError(f"A symmetric {bits}-bit grid rounds everything to 0; use bits >= 2 or symmetric=False.")


class _EWGSDeltaMixin:
    """EWGS's delta as a Python float for the backward pass, mirrored in a persistent buffer (`ewgs_delta_state`).

    `estimate_ewgs_deltas` / `EWGSDeltaCallback` update the delta during training; the buffer puts it in the state
    dict, so a run resumed from a checkpoint continues with the delta estimated before it instead of the config's
    starting value. `None` (plain LSQ) registers no buffer.
    """

    def _init_ewgs(self, delta: float | None, device: torch.device | None = None) -> None:
        self._ewgs_delta = None if delta is None else float(delta)
        if delta is not None:
            # float32, not float64: some devices (MPS) have no float64.
            self.register_buffer("ewgs_delta_state", torch.tensor(float(delta), dtype=torch.float32, device=device))

    @property
    def ewgs_delta(self) -> float | None:
        return self._ewgs_delta

    @ewgs_delta.setter
    def ewgs_delta(self, value: float | None) -> None:
        if getattr(self, "ewgs_delta_state", None) is None:
            raise AttributeError("ewgs_delta can only be changed on an EWGS quantizer (built with a delta).")
        self._ewgs_delta = float(value)
        self.ewgs_delta_state.fill_(self._ewgs_delta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if getattr(self, "ewgs_delta_state", None) is not None:
            self._ewgs_delta = float(self.ewgs_delta_state)


class WeightQuantizer(nn.Module):
    """Base class: `forward(w)` is `dequantize(*self.encode(w))`; `code_range` bounds the integer codes."""

    bits: int

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        raise NotImplementedError

    @property
    def code_range(self) -> tuple[int, int]:
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return dequantize(*self.encode(weight))


class LSQWeightQuantizer(_EWGSDeltaMixin, WeightQuantizer):
    """Signed LSQ weight quantizer with a learned per-tensor step; `ewgs_delta` switches on EWGS gradients."""

    def __init__(self, weight: torch.Tensor, bits: int, *, eps: float = 1e-8, ewgs_delta: float | None = None):
        super().__init__()
        self.bits = bits
        self.q_n, self.q_p = signed_range(bits)
        self.eps = eps
        self._init_ewgs(ewgs_delta, weight.device)
        self.num_elements = weight.numel()
        self.step = nn.Parameter(lsq_init_step(weight, self.q_p).to(weight.dtype).reshape(()))
        self._capture = False
        self._captured: torch.Tensor | None = None

    @property
    def code_range(self) -> tuple[int, int]:
        return -self.q_n, self.q_p

    def encode(self, weight):
        g = lsq_grad_scale(self.num_elements, self.q_p)
        codes, s = lsq_encode(weight, self.step, self.q_n, self.q_p, g, eps=self.eps, ewgs_delta=self.ewgs_delta)
        if self._capture:
            self._captured = codes
        return codes, s, 0.0

    def extra_repr(self) -> str:
        ewgs = "" if self.ewgs_delta is None else f", ewgs_delta={self.ewgs_delta:.3g}"
        return f"bits={self.bits}{ewgs}"


class DoReFaWeightQuantizer(WeightQuantizer):
    """DoReFa weight quantizer (PACT's weight side); no learned parameters."""

    def __init__(self, bits: int, *, rescale: bool = True):
        super().__init__()
        self.bits = bits
        self.rescale = rescale

    @property
    def code_range(self) -> tuple[int, int]:
        return 0, 2**self.bits - 1

    def encode(self, weight):
        return dorefa_weight_encode(weight, self.bits, rescale=self.rescale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, rescale={self.rescale}"


class RTNWeightQuantizer(WeightQuantizer):
    """Round-to-nearest min/max weight quantizer (per tensor or per output channel, symmetric or asymmetric)."""

    def __init__(self, bits: int, *, per_channel: bool = True, symmetric: bool = True):
        super().__init__()
        _check_symmetric_bits(bits, symmetric)
        self.bits = bits
        self.per_channel = per_channel
        self.symmetric = symmetric

    @property
    def code_range(self) -> tuple[int, int]:
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if self.symmetric else (0, 2**self.bits - 1)

    def encode(self, weight):
        lo, hi = channel_minmax(weight, self.per_channel)
        scale, zero_point, q_min, q_max = minmax_qparams(lo, hi, self.bits, symmetric=self.symmetric)
        return rtn_encode(weight, scale, zero_point, q_min, q_max), scale, zero_point

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, symmetric={self.symmetric}"


class _LazySignedMixin:
    """Shared bookkeeping for input quantizers whose grid (signed or not) is decided from the first batch."""

    def _init_signed(self, signed: bool | None) -> None:
        # -1: decide from the first batch; persisted so that a reloaded model keeps the decision.
        self.register_buffer("signed", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))

    def _resolve_signed(self, x: torch.Tensor) -> bool:
        if self.signed.item() < 0:
            has_negative = _all_reduce_mean((x.detach().min() < 0).float()) > 0
            self.signed.fill_(int(has_negative))
        return bool(self.signed.item())


class LSQInputQuantizer(_EWGSDeltaMixin, _LazySignedMixin, nn.Module):
    """LSQ activation quantizer: learned step, `2 mean|x| / sqrt(Q_P)` from the first batch, grid signed or not."""

    def __init__(self, bits: int, *, signed: bool | None = None, eps: float = 1e-8, ewgs_delta: float | None = None):
        super().__init__()
        self.bits = bits
        self.eps = eps
        self._init_ewgs(ewgs_delta)
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_signed(signed)
        self._capture = False
        self._captured: torch.Tensor | None = None

    def _range(self) -> tuple[int, int]:
        if self.signed.item() > 0:
            if self.bits < 2:
                raise ValueError(
                    "LSQ/EWGS input with negative values needs a signed grid, which needs a_bits >= 2 (got a_bits=1)."
                )
            return signed_range(self.bits)
        return unsigned_range(self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self._resolve_signed(x)
            with torch.no_grad():
                self.step.copy_(_all_reduce_mean(lsq_init_step(x, self._range()[1]).to(self.step)))
                self.initialized.fill_(True)
        q_n, q_p = self._range()
        # LSQ's N for activations: features per example.
        g = lsq_grad_scale(max(x.numel() // max(x.shape[0], 1), 1), q_p)
        codes, s = lsq_encode(x, self.step, q_n, q_p, g, eps=self.eps, ewgs_delta=self.ewgs_delta)
        if self._capture:
            self._captured = codes
        return dequantize(codes, s.to(x.dtype))

    def extra_repr(self) -> str:
        ewgs = "" if self.ewgs_delta is None else f", ewgs_delta={self.ewgs_delta:.3g}"
        return f"bits={self.bits}{ewgs}"


class PACTInputQuantizer(_LazySignedMixin, nn.Module):
    """PACT activation quantizer: clip at a learned `alpha` with an L2 penalty on `alpha` applied in backward."""

    def __init__(self, bits: int, *, alpha_init: float = 10.0, alpha_l2: float = 0.0, signed: bool | None = None):
        super().__init__()
        self.bits = bits
        self.alpha_l2 = alpha_l2
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self._init_signed(signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signed = self._resolve_signed(x)
        alpha = add_l2_grad(self.alpha, self.alpha_l2) if self.alpha_l2 and self.alpha.requires_grad else self.alpha
        return dequantize(*pact_encode(x, alpha.to(x.dtype), self.bits, signed=signed))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha_l2={self.alpha_l2}"


class RTNInputQuantizer(nn.Module):
    """Round-to-nearest activation quantizer with a per-tensor range observed by `calibrate`."""

    def __init__(self, bits: int, *, symmetric: bool = False):
        super().__init__()
        _check_symmetric_bits(bits, symmetric)
        self.bits = bits
        self.symmetric = symmetric
        self.calibrating = False
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.min_val)) and bool(torch.isfinite(self.max_val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            lo, hi = _all_reduce_min_max(x.detach().min().float(), x.detach().max().float())
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
            return x
        if not self.calibrated:
            raise RuntimeError(
                "This PTQ input quantizer has no activation range yet: run "
                "hf_r2.quantization.calibrate(model, batches) before using the model."
            )
        scale, zero_point, q_min, q_max = minmax_qparams(
            self.min_val.to(x.dtype), self.max_val.to(x.dtype), self.bits, symmetric=self.symmetric
        )
        return dequantize(rtn_encode(x, scale, zero_point, q_min, q_max), scale, zero_point)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}"

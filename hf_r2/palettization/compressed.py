"""Compact palettized layers: a LUT plus b-bit packed indices, decoded once into a frozen dense weight.

After DKM `finalize`, every palettized layer holds at most `2**n_bits` distinct `cluster_dim`-vectors. The layers here
store exactly that information and nothing more:

* `weight_lut` (persistent buffer, shape `(k, cluster_dim)`, `k <= 2**n_bits`, the weight's own dtype so decoding is
  lossless) and
* the LUT row of every vector (`hf_r2.utils.weight_to_vectors` layout), packed at `n_bits` bits per vector into a
  `uint8` buffer (`pack_indices` / `unpack_indices`).

`weight` stays a dense `nn.Parameter` (frozen, `requires_grad=False`) decoded once from the LUT and indices, so the
forward pass is the parent class's own (`nn.Linear.forward`, ...) and costs nothing extra; analysis code that reads
`layer.weight` sees real values. Only the state dict differs: its `weight` entry holds the packed `uint8` indices.
That makes `save_pretrained` write the compact form, and makes any loader that does not know the format (transformers
without `import hf_r2`, a plain `nn.Linear`) fail with a shape mismatch instead of loading random weights.

Format version 2 adds, per layer, `weight_checksum` (persistent `int64` buffer of 3 entries, `palettized_checksum`):
CRC-32s of the packed index bytes and of the LUT, written at save time and verified on load, so a flipped bit in
either is refused instead of loading as a slightly different model. Version 1 checkpoints (no checksum) still load,
without that check.

Bit layout of the packed indices (versions 1 and 2): the indices form one little-endian bit stream; index `i` occupies
stream bits `i * n_bits ... (i + 1) * n_bits - 1` (its least significant bit first) and stream bit `j` is bit `j % 8`
of byte `j // 8`. The unused high bits of the last byte are zero. Hence `ceil(num_vectors * n_bits / 8)` bytes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_r2.utils import check_cluster_dim, vectors_to_weight

__all__ = [
    "PALETTIZATION_FORMAT_VERSION",
    "PalettizedConv1D",
    "PalettizedConv2d",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedMixin",
    "attach_palettization_config",
    "decode_palettized",
    "pack_indices",
    "output_channels_first",
    "packed_num_bytes",
    "palettized_checksum",
    "palettized_modules",
    "to_palettized",
    "unpack_indices",
    "unpalettize",
]

PALETTIZATION_FORMAT_VERSION = 2
"""Version of the on-disk layout described in this module's docstring; stored in `quantization_config`. 2: a CRC-32
of each layer's packed indices and LUT (`weight_checksum`); 1: no checksum."""

# Indices processed per chunk by pack/unpack: bounds the temporary bit matrix to ~`_CHUNK * 8 * 4` bytes. A multiple of
# 8, so every chunk starts on a byte boundary for any n_bits.
_CHUNK = 1 << 20


def _check_n_bits(n_bits: Any) -> int:
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}.")
    return n_bits


def packed_num_bytes(num_indices: int, n_bits: int) -> int:
    """Returns the number of bytes `pack_indices` produces for `num_indices` indices of `n_bits` bits."""
    _check_n_bits(n_bits)
    if num_indices < 0:
        raise ValueError(f"num_indices must be >= 0, got {num_indices}.")
    return (num_indices * n_bits + 7) // 8


def pack_indices(indices: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Packs integer indices in `[0, 2**n_bits)` into a `uint8` bit stream of `n_bits` bits per index.

    Args:
        indices (`torch.Tensor`): 1-D integer tensor.
        n_bits (`int`): Bits per index, 1-8.

    Returns:
        `torch.Tensor`: 1-D `uint8` tensor of `packed_num_bytes(len(indices), n_bits)` bytes (layout: module docstring).

    Raises:
        ValueError: If `n_bits` is not in 1..8, `indices` is not a 1-D integer tensor, or a value is out of range.
    """
    _check_n_bits(n_bits)
    if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(
            f"indices must be a 1-D integer tensor, got dtype {indices.dtype} and shape {tuple(indices.shape)}."
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 1 << n_bits):
        raise ValueError(
            f"indices must lie in [0, {1 << n_bits}) for n_bits={n_bits}, got range "
            f"[{int(indices.min())}, {int(indices.max())}]."
        )
    if n_bits == 8:
        return indices.to(torch.uint8, copy=True)
    chunks = [_pack_chunk(indices[start : start + _CHUNK], n_bits) for start in range(0, indices.numel(), _CHUNK)]
    if len(chunks) == 1:
        return chunks[0]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=indices.device)


def _pack_chunk(indices: torch.Tensor, n_bits: int) -> torch.Tensor:
    device = indices.device
    values = indices.to(torch.int32)
    if 8 % n_bits == 0:
        # 1, 2 or 4 bits: whole indices per byte, so one shift-and-sum per byte suffices.
        per_byte = 8 // n_bits
        values = torch.cat([values, values.new_zeros(-values.numel() % per_byte)])
        shifts = torch.arange(per_byte, device=device, dtype=torch.int32) * n_bits
        return (values.view(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)
    bits = ((values.unsqueeze(1) >> torch.arange(n_bits, device=device, dtype=torch.int32)) & 1).reshape(-1)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)])
    return (bits.view(-1, 8) << torch.arange(8, device=device, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, num_indices: int, n_bits: int) -> torch.Tensor:
    """Inverse of `pack_indices`.

    Args:
        packed (`torch.Tensor`): 1-D `uint8` tensor of exactly `packed_num_bytes(num_indices, n_bits)` bytes.
        num_indices (`int`): How many indices the stream holds.
        n_bits (`int`): Bits per index, 1-8.

    Returns:
        `torch.LongTensor`: The `num_indices` indices.

    Raises:
        ValueError: If `packed` is not 1-D `uint8` or its length does not match `num_indices` and `n_bits`.
    """
    expected = packed_num_bytes(num_indices, n_bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed indices must be a 1-D uint8 tensor, got dtype {packed.dtype}, shape {tuple(packed.shape)}."
        )
    if packed.numel() != expected:
        raise ValueError(
            f"packed indices hold {packed.numel()} bytes, but {num_indices} indices at n_bits={n_bits} need {expected}."
        )
    if n_bits == 8:
        return packed.long()
    chunks = []
    for start in range(0, num_indices, _CHUNK):  # _CHUNK is a multiple of 8: each chunk starts on a byte boundary
        count = min(_CHUNK, num_indices - start)
        first_byte = start * n_bits // 8
        chunks.append(_unpack_chunk(packed[first_byte : first_byte + (count * n_bits + 7) // 8], count, n_bits))
    if len(chunks) == 1:
        return chunks[0]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long, device=packed.device)


def _unpack_chunk(packed: torch.Tensor, count: int, n_bits: int) -> torch.Tensor:
    device = packed.device
    values = packed.to(torch.int32)
    if 8 % n_bits == 0:
        # 1, 2 or 4 bits: one table lookup per byte gives its 8 // n_bits indices.
        shifts = torch.arange(8 // n_bits, device=device) * n_bits
        table = (torch.arange(256, device=device).unsqueeze(1) >> shifts) & ((1 << n_bits) - 1)
        return table.index_select(0, values).reshape(-1)[:count]
    bits = ((values.unsqueeze(1) >> torch.arange(8, device=device, dtype=torch.int32)) & 1).reshape(-1)
    weights = 1 << torch.arange(n_bits, device=device, dtype=torch.int32)
    return (bits[: count * n_bits].view(count, n_bits) * weights).sum(dim=1).long()


def output_channels_first(layer: nn.Module, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """`layer.weight` (or `tensor`, shaped like it) seen with the output channels first.

    Every layer stores its weight output-channels-first except transformers' `Conv1D` (GPT-2 and friends: `nn.Linear`
    with the weight stored as `(in, out)`), whose weight is transposed here. The vector layout
    (`hf_r2.utils.weight_to_vectors`), `cluster_dim` and a checkpoint's `shape` all refer to this view. The inverse
    is the same call (a transpose is its own inverse).
    """
    tensor = layer.weight if tensor is None else tensor
    return tensor.t() if isinstance(layer, Conv1D) else tensor


def output_channels_first_shape(layer: nn.Module) -> tuple[int, ...]:
    """Shape of `output_channels_first(layer)`, without touching the weight's values (works on the meta device)."""
    shape = tuple(layer.weight.shape)
    return shape[::-1] if isinstance(layer, Conv1D) else shape


# LUT dtypes a checksum records (its third entry), so a LUT cast on load (`from_pretrained(..., dtype=...)`) is told
# apart from a corrupt one.
_CHECKSUM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def palettized_checksum(packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The format-version-2 checksum of a palettized layer: `int64` tensor `[crc_indices, crc_lut, lut_dtype]`.

    `crc_indices` is the CRC-32 of the packed index bytes, `crc_lut` the CRC-32 of the LUT's values as float64 (exact
    for every float dtype, so it does not depend on the device or memory layout), `lut_dtype` the position of the
    stored LUT dtype in `(float32, float16, bfloat16, float64)`. CRC-32 detects every error of up to 3 flipped bits and
    every burst of up to 32 bits.
    """
    if lut.dtype not in _CHECKSUM_DTYPES:
        raise ValueError(f"A palettized LUT must be one of {_CHECKSUM_DTYPES}, got {lut.dtype}.")
    crc_indices = zlib.crc32(packed.detach().contiguous().cpu().numpy().tobytes())
    crc_lut = zlib.crc32(lut.detach().cpu().double().contiguous().numpy().tobytes())
    return torch.tensor([crc_indices, crc_lut, _CHECKSUM_DTYPES.index(lut.dtype)], dtype=torch.int64)


def _layer_label(name: str | None) -> str:
    return f"palettized layer {name!r}" if name else "palettized layer"


def decode_palettized(
    packed: torch.Tensor,
    lut: torch.Tensor,
    shape: Sequence[int],
    n_bits: int,
    cluster_dim: int,
    *,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates a stored (packed indices, LUT) pair and decodes the dense weight.

    Args:
        packed (`torch.Tensor`): 1-D `uint8` packed indices.
        lut (`torch.Tensor`): Floating LUT of shape `(k, cluster_dim)` with `1 <= k <= 2**n_bits`.
        shape (`Sequence[int]`): Shape of the dense weight.
        n_bits (`int`): Bits per index, 1-8.
        cluster_dim (`int`): Vector dimension d.
        name (`str`, *optional*): Layer name, used in error messages.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: The dense weight (in the LUT's dtype) and the unpacked indices.

    Raises:
        ValueError: Naming the layer and the problem, if the dtypes, sizes, index range or padding bits are wrong.
    """
    label = _layer_label(name)
    shape = tuple(int(s) for s in shape)
    _check_n_bits(n_bits)
    check_cluster_dim(cluster_dim, shape, name=label)
    num_vectors = math.prod(shape) // cluster_dim
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"{label}: the packed indices (checkpoint key '.weight') must be a 1-D uint8 tensor, got dtype "
            f"{packed.dtype} and shape {tuple(packed.shape)}. The checkpoint is corrupt or not palettized."
        )
    expected_bytes = packed_num_bytes(num_vectors, n_bits)
    if packed.numel() != expected_bytes:
        raise ValueError(
            f"{label}: the packed indices hold {packed.numel()} bytes, but a weight of shape {shape} with "
            f"n_bits={n_bits}, cluster_dim={cluster_dim} ({num_vectors} indices) needs {expected_bytes}: the "
            "quantization_config and the tensors disagree (corrupt or edited checkpoint)."
        )
    if not lut.is_floating_point():
        raise ValueError(f"{label}: the LUT ('.weight_lut') must be a floating tensor, got dtype {lut.dtype}.")
    if lut.dim() != 2 or lut.shape[1] != cluster_dim or not 1 <= lut.shape[0] <= 1 << n_bits:
        raise ValueError(
            f"{label}: the LUT ('.weight_lut') has shape {tuple(lut.shape)}, expected (k, {cluster_dim}) with "
            f"1 <= k <= 2**n_bits = {1 << n_bits} (n_bits={n_bits}, cluster_dim={cluster_dim})."
        )
    if not torch.isfinite(lut).all():
        raise ValueError(f"{label}: the LUT ('.weight_lut') contains non-finite values.")
    used_bits = num_vectors * n_bits
    if used_bits % 8 and int(packed[-1]) >> (used_bits % 8):
        raise ValueError(f"{label}: the padding bits of the last packed byte are not zero (corrupt indices).")
    indices = unpack_indices(packed, num_vectors, n_bits)
    if indices.numel() and int(indices.max()) >= lut.shape[0]:
        bad = int(torch.nonzero(indices >= lut.shape[0])[0])
        raise ValueError(
            f"{label}: index {int(indices[bad])} of vector {bad} is out of range for a LUT with {lut.shape[0]} rows "
            "(corrupt indices or truncated LUT)."
        )
    dense = vectors_to_weight(lut[indices], shape, cluster_dim)
    return dense, indices


class PalettizedMixin:
    """Shared state and (de)serialization of the palettized layers; mixed into `nn.Linear`, `nn.Conv2d`, ...

    Attributes:
        n_bits (`int`): Bits per stored index.
        cluster_dim (`int`): Dimension of the palettized vectors.
        layer_name (`str` or `None`): Full module name, set by `attach_palettization_config`, for error messages.
    """

    n_bits: int
    cluster_dim: int
    layer_name: str | None
    weight: nn.Parameter
    weight_lut: torch.Tensor
    weight_packed_indices: torch.Tensor

    def _init_palettization(self, n_bits: int, cluster_dim: int, device: Any, dtype: Any) -> None:
        _check_n_bits(n_bits)
        check_cluster_dim(cluster_dim, self.dense_shape, name=type(self).__name__)
        self.n_bits = n_bits
        self.cluster_dim = cluster_dim
        self.layer_name = None
        self.weight.requires_grad_(False)
        num_bytes = packed_num_bytes(self.num_vectors, n_bits)
        self.register_buffer("weight_lut", torch.zeros(1 << n_bits, cluster_dim, device=device, dtype=dtype))
        # Kept only to write the checkpoint; the forward pass uses the decoded `weight`.
        self.register_buffer(
            "weight_packed_indices", torch.zeros(num_bytes, device=device, dtype=torch.uint8), persistent=False
        )
        # Format version 2: recomputed from the stored tensors whenever the state dict is written
        # (`_save_to_state_dict`), so a later dtype change of the LUT cannot leave a stale value; removed for the layers
        # of a version-1 checkpoint.
        self.register_buffer("weight_checksum", torch.zeros(3, device=device, dtype=torch.int64))

    def __setattr__(self, name: str, value: Any) -> None:
        # transformers' loader assigns every checkpoint tensor with setattr. The packed indices arrive under `weight`
        # (1-D: never a valid dense Linear/Conv2d/Embedding weight) and must not replace the dense-shaped weight
        # placeholder, which the model's own `_init_weights` still inspects (fan-in, ...) before hf_r2 decodes it.
        if name == "weight" and isinstance(value, torch.Tensor) and value.dim() == 1 and hasattr(self, "n_bits"):
            # A plain attribute, not the `weight_packed_indices` buffer: transformers re-creates non-persistent
            # buffers after loading. The quantizer validates and decodes it once loading is done.
            super().__setattr__("_loaded_packed_weight", value.detach())
            return
        super().__setattr__(name, value)

    @property
    def num_vectors(self) -> int:
        """Number of `cluster_dim`-vectors (stored indices) of the weight."""
        return self.weight.numel() // self.cluster_dim

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Shape of the decoded dense weight, output channels first (`output_channels_first_shape`)."""
        return tuple(self._dense_shape)

    def set_palettization(self, lut: torch.Tensor, indices: torch.Tensor) -> None:
        """Stores `lut` and `indices` and decodes the frozen dense `weight` from them (once).

        Args:
            lut (`torch.Tensor`): `(k, cluster_dim)` floating LUT, `k <= 2**n_bits`; cast to the weight's dtype.
            indices (`torch.LongTensor`): LUT row of each vector, `(num_vectors,)`.
        """
        lut = lut.detach().to(device=self.weight.device, dtype=self.weight.dtype)
        packed = pack_indices(indices.detach().reshape(-1).to(self.weight.device), self.n_bits)
        self._load_palettized(packed, lut)

    def _load_palettized(self, packed: torch.Tensor, lut: torch.Tensor) -> None:
        dense, _ = decode_palettized(packed, lut, self.dense_shape, self.n_bits, self.cluster_dim, name=self.layer_name)
        self.weight = nn.Parameter(output_channels_first(self, dense).contiguous(), requires_grad=False)
        self.weight_lut = lut
        self.weight_packed_indices = packed

    def decode_weight(self) -> torch.Tensor:
        """Decodes the dense weight again from the stored LUT and packed indices, shaped like `weight` (does not touch
        `weight`)."""
        dense, _ = decode_palettized(
            self.weight_packed_indices,
            self.weight_lut,
            self.dense_shape,
            self.n_bits,
            self.cluster_dim,
            name=self.layer_name,
        )
        return output_channels_first(self, dense)

    def indices(self) -> torch.Tensor:
        """Returns the unpacked LUT row of every vector, `(num_vectors,)` `LongTensor`."""
        return unpack_indices(self.weight_packed_indices, self.num_vectors, self.n_bits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 (torch hook)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        # Placeholders (meta device, e.g. while transformers is loading) have nothing to check.
        if not weight.is_meta and weight.is_floating_point() and not torch.equal(weight.detach(), self.decode_weight()):
            raise RuntimeError(
                f"{_layer_label(self.layer_name)}: `weight` no longer matches its LUT and indices, so it was modified "
                "after palettization (trained, or edited in place). Its checkpoint would be wrong; run DKM `finalize` "
                "again (or call `set_palettization`) before saving."
            )
        packed = self.weight_packed_indices
        destination[prefix + "weight"] = packed if keep_vars else packed.detach()
        if "weight_checksum" in self._buffers and not weight.is_meta:
            destination[prefix + "weight_checksum"] = palettized_checksum(packed, self.weight_lut).to(packed.device)

    @staticmethod
    def verify_checksum(stored: torch.Tensor, packed: torch.Tensor, lut: torch.Tensor, name: str) -> None:
        """Raises a `ValueError` naming the layer unless `stored` (`palettized_checksum`) matches `packed` and `lut`.

        The LUT part is checked when the LUT still has its stored dtype; a LUT cast on load (`dtype=` of
        `from_pretrained`) cannot be compared byte for byte, and only the indices are checked then.
        """
        label = f"palettized layer {name!r}"
        stored = stored.detach().cpu()
        if stored.dtype != torch.int64 or tuple(stored.shape) != (3,) or not 0 <= int(stored[2]) < len(
            _CHECKSUM_DTYPES
        ):
            raise ValueError(
                f"{label}: the checksum ('.weight_checksum') is malformed (dtype {stored.dtype}, shape "
                f"{tuple(stored.shape)}): corrupt checkpoint."
            )
        actual = palettized_checksum(packed, lut.to(_CHECKSUM_DTYPES[int(stored[2])]))
        what = []
        if int(stored[0]) != int(actual[0]):
            what.append("packed indices ('.weight')")
        if lut.dtype == _CHECKSUM_DTYPES[int(stored[2])] and int(stored[1]) != int(actual[1]):
            what.append("LUT ('.weight_lut')")
        if what:
            raise ValueError(
                f"{label}: the checksum of its {' and '.join(what)} does not match the one stored at save time: a "
                "flipped bit, a corrupt or an edited file. Refusing to load a silently different model."
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key, lut_key = prefix + "weight", prefix + "weight_lut"
        packed, lut = state_dict.get(weight_key), state_dict.get(lut_key)
        if packed is None or lut is None:
            # Let torch report the missing key(s) the usual way.
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        name = self.layer_name or prefix.rstrip(".")
        try:
            dense, _ = decode_palettized(packed, lut, self.dense_shape, self.n_bits, self.cluster_dim, name=name)
            stored = state_dict.get(prefix + "weight_checksum")
            if stored is not None and "weight_checksum" in self._buffers:
                self.verify_checksum(stored, packed, lut, name)
        except ValueError as err:
            error_msgs.append(str(err))
            return
        # torch copies the checkpoint into the existing tensors: give it the decoded weight and a LUT buffer of the
        # stored number of rows (k may be below 2**n_bits). `load_state_dict` already works on its own copy of the dict.
        state_dict[weight_key] = output_channels_first(self, dense)
        if self.weight_lut.shape != lut.shape:
            self.weight_lut = torch.empty(lut.shape, dtype=self.weight_lut.dtype, device=self.weight_lut.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.weight_packed_indices = packed.detach().to(self.weight.device).clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_bits={self.n_bits}, cluster_dim={self.cluster_dim}"


class PalettizedLinear(PalettizedMixin, nn.Linear):
    """`nn.Linear` whose weight is stored as a LUT and packed `n_bits`-bit indices (see the module docstring).

    Args:
        in_features (`int`), out_features (`int`), bias (`bool`): As for `nn.Linear`.
        n_bits (`int`): Bits per index, 1-8.
        cluster_dim (`int`): Dimension of the palettized vectors; divides `out_features`.
    """

    def __init__(self, in_features, out_features, bias=True, *, n_bits, cluster_dim=1, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._dense_shape = (out_features, in_features)
        self._init_palettization(n_bits, cluster_dim, device, dtype)

    @classmethod
    def like(cls, layer: nn.Linear, n_bits: int, cluster_dim: int, device: Any = "meta") -> PalettizedLinear:
        """Builds an empty palettized layer with the structure of `layer` (weights on `device`)."""
        return cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            n_bits=n_bits,
            cluster_dim=cluster_dim,
            device=device,
            dtype=layer.weight.dtype,
        )


class PalettizedConv2d(PalettizedMixin, nn.Conv2d):
    """`nn.Conv2d` whose weight is stored as a LUT and packed indices; vectors run along the output channels."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        *,
        n_bits,
        cluster_dim=1,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._dense_shape = tuple(self.weight.shape)
        self._init_palettization(n_bits, cluster_dim, device, dtype)

    @classmethod
    def like(cls, layer: nn.Conv2d, n_bits: int, cluster_dim: int, device: Any = "meta") -> PalettizedConv2d:
        """Builds an empty palettized layer with the structure of `layer` (weights on `device`)."""
        return cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            n_bits=n_bits,
            cluster_dim=cluster_dim,
            device=device,
            dtype=layer.weight.dtype,
        )


class PalettizedEmbedding(PalettizedMixin, nn.Embedding):
    """`nn.Embedding` whose table is stored as a LUT and packed indices; vectors run along the rows (tokens)."""

    def __init__(
        self, num_embeddings, embedding_dim, padding_idx=None, *, n_bits, cluster_dim=1, device=None, dtype=None
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self._dense_shape = (num_embeddings, embedding_dim)
        self._init_palettization(n_bits, cluster_dim, device, dtype)

    @classmethod
    def like(cls, layer: nn.Embedding, n_bits: int, cluster_dim: int, device: Any = "meta") -> PalettizedEmbedding:
        """Builds an empty palettized layer with the structure of `layer` (weights on `device`)."""
        if layer.max_norm is not None:
            # nn.Embedding renormalizes its table in place during forward when max_norm is set: the weight would
            # drift from its LUT.
            raise ValueError("Palettizing an nn.Embedding with max_norm is not supported (it rewrites its weights).")
        return cls(
            layer.num_embeddings,
            layer.embedding_dim,
            padding_idx=layer.padding_idx,
            n_bits=n_bits,
            cluster_dim=cluster_dim,
            device=device,
            dtype=layer.weight.dtype,
        )


class PalettizedConv1D(PalettizedMixin, Conv1D):
    """transformers' `Conv1D` (GPT-2: a Linear whose weight is stored `(in, out)`) with a LUT and packed indices.

    The indices and `cluster_dim` follow the output-channels-first view `weight.t()`, exactly as for a
    `PalettizedLinear` of the same size (the same bytes for the same linear map); `weight` keeps Conv1D's `(in, out)`
    shape.
    """

    def __init__(self, nf, nx, *, n_bits, cluster_dim=1, device=None, dtype=None):
        with torch.device(device if device is not None else torch.get_default_device()):
            super().__init__(nf, nx)
        if dtype is not None:
            self.to(dtype)
        self._dense_shape = (nf, nx)
        self._init_palettization(n_bits, cluster_dim, device, dtype)

    @classmethod
    def like(cls, layer: Conv1D, n_bits: int, cluster_dim: int, device: Any = "meta") -> PalettizedConv1D:
        """Builds an empty palettized layer with the structure of `layer` (weights on `device`)."""
        return cls(layer.nf, layer.nx, n_bits=n_bits, cluster_dim=cluster_dim, device=device, dtype=layer.weight.dtype)


# Most specific first: the palettized classes are themselves subclasses of the plain ones.
_PALETTIZED_CLASSES: tuple[tuple[type[nn.Module], type[PalettizedMixin]], ...] = (
    (Conv1D, PalettizedConv1D),
    (nn.Linear, PalettizedLinear),
    (nn.Conv2d, PalettizedConv2d),
    (nn.Embedding, PalettizedEmbedding),
)
SUPPORTED_LAYER_TYPES = tuple(plain for plain, _ in _PALETTIZED_CLASSES)


def palettized_class_for(layer: nn.Module) -> type[PalettizedMixin]:
    """Returns the palettized class for a plain `nn.Linear` / `nn.Conv2d` / `nn.Embedding` (or a subclass)."""
    for plain, palettized in _PALETTIZED_CLASSES:
        if isinstance(layer, plain):
            return palettized
    allowed = ", ".join(p.__name__ for p, _ in _PALETTIZED_CLASSES)
    raise TypeError(f"Cannot palettize a {type(layer).__name__}; supported layers: {allowed}.")


def to_palettized(
    layer: nn.Linear | nn.Conv2d | nn.Embedding,
    lut: torch.Tensor,
    indices: torch.Tensor,
    n_bits: int,
    cluster_dim: int,
) -> PalettizedLinear | PalettizedConv2d | PalettizedEmbedding:
    """Builds the compact palettized version of `layer` from a hard assignment.

    The new layer shares `layer`'s bias (and every other setting) and its frozen `weight` is the decoded
    `lut[indices]` in the `hf_r2.utils.weight_to_vectors` layout, cast to `layer.weight.dtype`: the caller's weight
    values are not used, so the result is exactly the palettized model that `save_pretrained` will store.

    Args:
        layer (`nn.Linear`, `nn.Conv2d` or `nn.Embedding`): The layer to replace (left untouched).
        lut (`torch.Tensor`): `(k, cluster_dim)` centroids, `1 <= k <= 2**n_bits`.
        indices (`torch.LongTensor`): `(num_vectors,)` LUT row of each vector of `layer.weight`.
        n_bits (`int`): Bits per index, 1-8.
        cluster_dim (`int`): Vector dimension; divides the output channels.

    Returns:
        The palettized layer, on `layer`'s device, ready to be set in place of `layer` in its parent.

    Raises:
        ValueError / TypeError: On an unsupported layer or inconsistent `lut` / `indices` / `n_bits` / `cluster_dim`.

    Example:
        ```python
        >>> layer = nn.Linear(4, 2)
        >>> lut = torch.tensor([[-0.5], [0.5]])
        >>> indices = (layer.weight.reshape(-1) > 0).long()
        >>> palettized = to_palettized(layer, lut, indices, n_bits=1, cluster_dim=1)
        >>> sorted(palettized.weight.unique().tolist())
        [-0.5, 0.5]
        ```
    """
    cls = palettized_class_for(layer)
    if isinstance(layer, PalettizedMixin):
        raise TypeError(f"{type(layer).__name__} is already palettized.")
    _check_n_bits(n_bits)
    check_cluster_dim(cluster_dim, output_channels_first_shape(layer), name=f"{type(layer).__name__}.weight")
    num_vectors = layer.weight.numel() // cluster_dim
    if not isinstance(lut, torch.Tensor) or not lut.is_floating_point() or lut.dim() != 2:
        raise ValueError(f"lut must be a 2-D floating tensor (k, cluster_dim), got {getattr(lut, 'shape', lut)!r}.")
    if lut.shape[1] != cluster_dim or not 1 <= lut.shape[0] <= 1 << n_bits:
        raise ValueError(
            f"lut has shape {tuple(lut.shape)}, expected (k, {cluster_dim}) with 1 <= k <= {1 << n_bits} "
            f"(n_bits={n_bits})."
        )
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.numel() != num_vectors:
        raise ValueError(
            f"indices must be an integer tensor with one entry per vector ({num_vectors} for a weight of shape "
            f"{tuple(layer.weight.shape)} and cluster_dim={cluster_dim}), got {getattr(indices, 'shape', indices)!r}."
        )
    indices = indices.reshape(-1)
    if num_vectors and (int(indices.min()) < 0 or int(indices.max()) >= lut.shape[0]):
        raise ValueError(
            f"indices must lie in [0, {lut.shape[0]}) (the LUT rows), got range [{int(indices.min())}, "
            f"{int(indices.max())}]."
        )
    new = cls.like(layer, n_bits, cluster_dim, device="meta")
    device = layer.weight.device
    new.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=layer.weight.dtype, device=device), False)
    new.weight_lut = torch.empty(0, device=device)
    new.weight_packed_indices = torch.empty(0, dtype=torch.uint8, device=device)
    new.weight_checksum = torch.zeros(3, dtype=torch.int64, device=device)  # its value is computed at save time
    if getattr(layer, "bias", None) is not None:
        new.bias = layer.bias
    new.train(layer.training)
    new.set_palettization(lut, indices)
    return new


def palettized_modules(model: nn.Module) -> dict[str, PalettizedMixin]:
    """Returns the palettized layers of `model` by full name, in `named_modules` order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PalettizedMixin)}


def attach_palettization_config(model: nn.Module, layers: Mapping[str, Mapping[str, Any]] | None = None):
    """Records the palettized layers in `model.config.quantization_config`, so `save_pretrained` writes a checkpoint
    that `from_pretrained` (after `import hf_r2`) loads back into the same palettized layers.

    Args:
        model (`PreTrainedModel`): A model whose palettized layers were built with `to_palettized`.
        layers (`dict[str, dict]`, *optional*): `{"layer name": {"n_bits": b, "cluster_dim": d}}` for every palettized
            layer; checked against the layers themselves. Defaults to what the model holds.

    Returns:
        `PalettizationQuantizationConfig`: The attached config.

    Raises:
        ValueError: If a listed layer is missing or not palettized, its bits/dims disagree with the layer, a
            palettized layer is not listed, or a palettized weight is tied to another module.
    """
    from hf_r2.palettization.quantizer import PalettizationQuantizationConfig

    if getattr(model, "config", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no `config`: attach_palettization_config needs a transformers PreTrainedModel."
        )
    found = palettized_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no palettized layer: run DKM finalize (or to_palettized) first.")
    if layers is None:
        layers = {name: {"n_bits": m.n_bits, "cluster_dim": m.cluster_dim} for name, m in found.items()}
    unknown = sorted(set(layers) - set(found))
    if unknown:
        raise ValueError(f"layers {unknown} are not palettized layers of {type(model).__name__}.")
    unlisted = sorted(set(found) - set(layers))
    if unlisted:
        raise ValueError(f"palettized layers {unlisted} are missing from `layers`; list every palettized layer.")
    tied = _tied_weight_names(model)
    specs = {}
    for name, module in found.items():
        spec = dict(layers[name])
        for key in ("n_bits", "cluster_dim"):
            if key not in spec or spec[key] != getattr(module, key):
                raise ValueError(
                    f"layers[{name!r}][{key!r}] is {spec.get(key)!r} but the layer has {key}={getattr(module, key)}."
                )
        if f"{name}.weight" in tied:
            raise ValueError(
                f"The weight of {name!r} is tied to another module's weight; palettizing tied weights is not "
                "supported (exclude the layer or untie the weights)."
            )
        module.layer_name = name
        specs[name] = {"n_bits": module.n_bits, "cluster_dim": module.cluster_dim, "shape": list(module.dense_shape)}
    config = PalettizationQuantizationConfig(layers=specs)
    model.config.quantization_config = config
    return config


def unpalettize(model: nn.Module) -> nn.Module:
    """Turns every palettized layer of `model` back into its plain class, in place.

    Each layer keeps its decoded dense weight, now trainable again, and drops its LUT and packed indices; the model's
    `quantization_config` is removed, so `save_pretrained` then writes an ordinary dense checkpoint (e.g. for export
    tools that expect plain layers). For a model loaded with `from_pretrained`, `model.dequantize()` does the same.

    Returns:
        `nn.Module`: `model`.
    """
    for module in palettized_modules(model).values():
        plain = next(base for base, palettized in _PALETTIZED_CLASSES if isinstance(module, palettized))
        for buffer in ("weight_lut", "weight_packed_indices", "weight_checksum"):
            module._buffers.pop(buffer, None)
            module._non_persistent_buffers_set.discard(buffer)
        for attribute in ("n_bits", "cluster_dim", "layer_name", "_dense_shape", "_loaded_packed_weight"):
            module.__dict__.pop(attribute, None)
        module.__class__ = plain
        module.weight.requires_grad_(True)
    config = getattr(model, "config", None)
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is not None and dict(quantization_config).get("quant_method") == "hf_r2_palettization":
        del config.quantization_config
    return model


def _tied_weight_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())

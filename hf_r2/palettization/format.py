"""The on-disk format of palettized weights: packed indices, their checksum, and the decoding that validates both.

After DKM `finalize`, every palettized layer holds at most `2**n_bits` distinct `cluster_dim`-vectors, stored as

* `weight_lut` (shape `(k, cluster_dim)`, `k <= 2**n_bits`, the weight's own dtype so decoding is lossless) and
* the LUT row of every vector (`hf_r2.utils.weight_to_vectors` layout), packed at `n_bits` bits per vector into a
  `uint8` tensor (`pack_indices` / `unpack_indices`), saved under the layer's `weight` key.

The layers that hold this format are in `hf_r2.palettization.palettized_layers`.

Format version 2 adds, per layer, `weight_checksum` (`int64` tensor of 3 entries, `palettized_checksum`): CRC-32s of
the packed index bytes and of the LUT, written at save time and verified on load, so a flipped bit in either is refused
instead of loading as a slightly different model. Version 1 checkpoints (no checksum) still load, without that check.

Bit layout of the packed indices (versions 1 and 2): the indices form one little-endian bit stream; index `i` occupies
stream bits `i * n_bits ... (i + 1) * n_bits - 1` (its least significant bit first) and stream bit `j` is bit `j % 8`
of byte `j // 8`. The unused high bits of the last byte are zero. Hence `ceil(num_vectors * n_bits / 8)` bytes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_r2.utils import check_bits, check_cluster_dim, vectors_to_weight

__all__ = [
    "CHECKSUM_DTYPES",
    "PALETTIZATION_FORMAT_VERSION",
    "decode_palettized",
    "output_channels_first",
    "output_channels_first_shape",
    "pack_indices",
    "packed_num_bytes",
    "palettized_checksum",
    "palettized_layer_label",
    "unpack_indices",
]

PALETTIZATION_FORMAT_VERSION = 2
"""Version of the on-disk layout described in this module's docstring; stored in `quantization_config`. 2: a CRC-32
of each layer's packed indices and LUT (`weight_checksum`); 1: no checksum."""

# Indices processed per chunk by pack/unpack: bounds the temporary bit matrix to ~`_CHUNK * 8 * 4` bytes. A multiple of
# 8, so every chunk starts on a byte boundary for any n_bits.
_CHUNK = 1 << 20


def packed_num_bytes(num_indices: int, n_bits: int) -> int:
    """Returns the number of bytes `pack_indices` produces for `num_indices` indices of `n_bits` bits."""
    check_bits(n_bits, "n_bits")
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
    check_bits(n_bits, "n_bits")
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
CHECKSUM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def palettized_checksum(packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The format-version-2 checksum of a palettized layer: `int64` tensor `[crc_indices, crc_lut, lut_dtype]`.

    `crc_indices` is the CRC-32 of the packed index bytes, `crc_lut` the CRC-32 of the LUT's values as float64 (exact
    for every float dtype, so it does not depend on the device or memory layout), `lut_dtype` the position of the
    stored LUT dtype in `(float32, float16, bfloat16, float64)`. CRC-32 detects every error of up to 3 flipped bits and
    every burst of up to 32 bits.
    """
    if lut.dtype not in CHECKSUM_DTYPES:
        raise ValueError(f"A palettized LUT must be one of {CHECKSUM_DTYPES}, got {lut.dtype}.")
    crc_indices = zlib.crc32(packed.detach().contiguous().cpu().numpy().tobytes())
    crc_lut = zlib.crc32(lut.detach().cpu().double().contiguous().numpy().tobytes())
    return torch.tensor([crc_indices, crc_lut, CHECKSUM_DTYPES.index(lut.dtype)], dtype=torch.int64)


def palettized_layer_label(name: str | None) -> str:
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
    label = palettized_layer_label(name)
    shape = tuple(int(s) for s in shape)
    check_bits(n_bits, "n_bits")
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

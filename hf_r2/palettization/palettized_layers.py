"""Compact palettized layers: a LUT plus b-bit packed indices, decoded once into a frozen dense weight.

The layers store exactly what DKM `finalize` leaves (the format of `hf_r2.palettization.format`): `weight_lut`
(persistent buffer) and the packed indices. `weight` stays a dense `nn.Parameter` (frozen, `requires_grad=False`)
decoded once from the LUT and indices, so the forward pass is the parent class's own (`nn.Linear.forward`, ...) and
costs nothing extra; analysis code that reads `layer.weight` sees real values. Only the state dict differs: its
`weight` entry holds the packed `uint8` indices. That makes `save_pretrained` write the compact form, and makes any
loader that does not know the format (transformers without `import hf_r2`, a plain `nn.Linear`) fail with a shape
mismatch instead of loading random weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_r2.palettization.format import (
    CHECKSUM_DTYPES,
    decode_palettized,
    output_channels_first,
    output_channels_first_shape,
    pack_indices,
    packed_num_bytes,
    palettized_checksum,
    palettized_layer_label,
    unpack_indices,
)
from hf_r2.utils import check_bits, check_cluster_dim, layer_shell

__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "PalettizedConv1D",
    "PalettizedConv2d",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedMixin",
    "palettized_class_for",
    "palettized_modules",
    "plain_class_for",
    "to_palettized",
]


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
        check_bits(n_bits, "n_bits")
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

    @classmethod
    def like(cls, layer: nn.Module, n_bits: int, cluster_dim: int, device: Any = "meta") -> PalettizedMixin:
        """Builds an empty palettized layer with the structure of `layer` (a `layer_shell`: it shares `layer`'s bias;
        weight, LUT and packed indices are new tensors on `device`, to be filled by `set_palettization` or a loader).
        """
        if getattr(layer, "max_norm", None) is not None:
            # nn.Embedding renormalizes its table in place during forward when max_norm is set: the weight would
            # drift from its LUT.
            raise ValueError("Palettizing an nn.Embedding with max_norm is not supported (it rewrites its weights).")
        new = layer_shell(cls, layer)
        dtype = layer.weight.dtype
        new.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=dtype, device=device), requires_grad=False)
        new._dense_shape = output_channels_first_shape(layer)
        new._init_palettization(n_bits, cluster_dim, device, dtype)
        return new

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
                f"{palettized_layer_label(self.layer_name)}: `weight` no longer matches its LUT and indices, so it was "
                "modified after palettization (trained, or edited in place). Its checkpoint would be wrong; run DKM "
                "`finalize` again (or call `set_palettization`) before saving."
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
        if stored.dtype != torch.int64 or tuple(stored.shape) != (3,) or not 0 <= int(stored[2]) < len(CHECKSUM_DTYPES):
            raise ValueError(
                f"{label}: the checksum ('.weight_checksum') is malformed (dtype {stored.dtype}, shape "
                f"{tuple(stored.shape)}): corrupt checkpoint."
            )
        actual = palettized_checksum(packed, lut.to(CHECKSUM_DTYPES[int(stored[2])]))
        what = []
        if int(stored[0]) != int(actual[0]):
            what.append("packed indices ('.weight')")
        if lut.dtype == CHECKSUM_DTYPES[int(stored[2])] and int(stored[1]) != int(actual[1]):
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


class PalettizedEmbedding(PalettizedMixin, nn.Embedding):
    """`nn.Embedding` whose table is stored as a LUT and packed indices; vectors run along the rows (tokens)."""

    def __init__(
        self, num_embeddings, embedding_dim, padding_idx=None, *, n_bits, cluster_dim=1, device=None, dtype=None
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self._dense_shape = (num_embeddings, embedding_dim)
        self._init_palettization(n_bits, cluster_dim, device, dtype)


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


def plain_class_for(layer: PalettizedMixin) -> type[nn.Module]:
    """Returns the plain class a palettized layer stands for (`PalettizedLinear` -> `nn.Linear`, ...)."""
    return next(plain for plain, palettized in _PALETTIZED_CLASSES if isinstance(layer, palettized))


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
    check_bits(n_bits, "n_bits")
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
    new = cls.like(layer, n_bits, cluster_dim, device=layer.weight.device)
    new.set_palettization(lut, indices)
    return new


def palettized_modules(model: nn.Module) -> dict[str, PalettizedMixin]:
    """Returns the palettized layers of `model` by full name, in `named_modules` order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PalettizedMixin)}

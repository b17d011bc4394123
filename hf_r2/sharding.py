"""Reading whole weights from sharded models: FSDP2 DTensor shards and FSDP1 (`use_orig_params=True`) flat pieces.

A range (max − min, a soft-min-max, a margin hinge) of a shard is not the layer's, so R² and the range logging gather
each sharded weight before measuring it. Both gathers are differentiable: every rank computes the same range term
on the same whole weight (as under DDP), and the backward hands each rank the gradient of its own piece.

* FSDP2 (`fully_shard`): a parameter is a `DTensor` outside the forward; `DTensor.full_tensor()` gathers it.
* FSDP1 with `use_orig_params=True`: outside the forward a parameter is a 1-D view of this rank's slice of the
  unit's `FlatParameter` (FSDP marks such parameters with the attribute `_fsdp_flattened`). The flat parameter is
  the concatenation of the unit's flattened parameters, cut into equal consecutive slices, one per rank, so each
  parameter's pieces are consecutive in rank order (a rank may hold none of it: a size-0 piece) and their
  concatenation is the whole flattened parameter. `gather_flat_shards` all-gathers them over the default process
  group (`FULL_SHARD` / `SHARD_GRAD_OP`; hybrid sharding, which shards within a subgroup, is detected by the sizes
  not adding up and refused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed support

    class DTensor:  # never an instance
        pass


__all__ = ["DTensor", "DenseGrad", "gather_flat_shards", "is_flat_shard", "refuse_sharded_layers", "whole_weight"]

#: The attribute FSDP1 sets on every original parameter it flattened into a `FlatParameter`.
FSDP_FLATTENED = "_fsdp_flattened"


def is_flat_shard(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is this rank's 1-D piece of an FSDP1 parameter (a weight of 2 or more dimensions, flattened).

    Inside the forward (and for `SHARD_GRAD_OP` / `NO_SHARD` after it) FSDP1 exposes whole, correctly shaped views
    instead, which are read as they are.
    """
    return bool(getattr(tensor, FSDP_FLATTENED, False)) and tensor.dim() == 1


class DenseGrad(torch.autograd.Function):
    """Identity whose backward densifies a sparse gradient (the L∞ / margin gradients are sparse; DTensor's gather and
    the views FSDP1 hands out cannot take a sparse one)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.to_dense() if grad.is_sparse else grad


class _GatherFlatShards(torch.autograd.Function):
    """All-gathers FSDP1 flat pieces into whole weights (two collectives for all of them); backward: each rank keeps
    the slice of the (rank-identical) gradient that belongs to its own piece."""

    @staticmethod
    def forward(ctx, shapes: Sequence[Sequence[int] | None], *pieces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        device = pieces[0].device
        local_sizes = torch.tensor([p.numel() for p in pieces], dtype=torch.int64, device=device)
        gathered_sizes = [torch.empty_like(local_sizes) for _ in range(world)]
        dist.all_gather(gathered_sizes, local_sizes)
        sizes = torch.stack(gathered_sizes).cpu()  # (world, n_pieces)
        totals = sizes.sum(dim=1).tolist()
        flat = torch.cat([p.detach().reshape(-1) for p in pieces])
        buffer = flat.new_zeros(max(totals))  # all_gather needs one size on every rank (gloo)
        buffer[: flat.numel()] = flat
        buffers = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(buffers, buffer)
        per_rank = [
            buf[:total].split(sizes[r].tolist()) for r, (buf, total) in enumerate(zip(buffers, totals, strict=True))
        ]
        wholes = []
        for i, (piece, shape) in enumerate(zip(pieces, shapes, strict=True)):
            whole = torch.cat([per_rank[r][i] for r in range(world)]).to(piece.dtype)
            if shape is not None:
                if whole.numel() != math.prod(shape):
                    raise RuntimeError(
                        f"The FSDP1 pieces of a weight of shape {tuple(shape)} add up to {whole.numel()} elements over "
                        f"the {world} ranks of the default process group: the weight is not sharded over all ranks "
                        "(hybrid sharding?). hf_r2 gathers FULL_SHARD / SHARD_GRAD_OP weights only; use FSDP2."
                    )
                whole = whole.view(shape)
            wholes.append(whole)
        starts = sizes.cumsum(dim=0) - sizes  # where each rank's piece starts in each flattened weight
        ctx.slices = [(int(starts[rank, i]), int(sizes[rank, i])) for i in range(len(pieces))]
        return tuple(wholes)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        out: list[torch.Tensor | None] = [None]
        for grad, (start, size) in zip(grads, ctx.slices, strict=True):
            if grad is None:
                out.append(None)
            else:
                grad = grad.to_dense() if grad.is_sparse else grad
                out.append(grad.reshape(-1)[start : start + size].clone())
        return tuple(out)


def gather_flat_shards(
    pieces: Sequence[torch.Tensor], shapes: Sequence[Sequence[int] | None]
) -> tuple[torch.Tensor, ...]:
    """The whole weights behind FSDP1 flat pieces (a collective: call it on every rank with the same weights).

    Args:
        pieces (`Sequence[torch.Tensor]`): This rank's 1-D pieces (`is_flat_shard`), possibly of size 0.
        shapes (`Sequence`): The whole shape of each weight, or `None` for the flattened whole.

    Returns:
        `tuple[torch.Tensor, ...]`: The whole weights, differentiable: the backward hands each rank the gradient of
        its own piece (the gradient of the whole must be the same on every rank, as it is when every rank computes the
        same function of the same whole weights).
    """
    if not pieces:
        return ()
    return _GatherFlatShards.apply(list(shapes), *pieces)


def whole_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` gathered whole if a sharding engine split it (a collective then: call it on every rank), else itself.

    An FSDP1 piece comes back flattened (its shape is FSDP's private state): the range, std, min and max are the same.
    """
    if isinstance(weight, DTensor):
        return weight.full_tensor()
    if is_flat_shard(weight):
        return gather_flat_shards([weight], [None])[0]
    return weight


def refuse_sharded_layers(layers: Mapping[str, nn.Module], what: str) -> None:
    """Raises before `what` changes anything if FSDP shards a parameter of one of `layers`.

    Finalizing a compression (DKM's hard assignment, integer weight codes) needs each layer's whole weight, and swaps
    layers in a way a sharded model cannot follow.

    Raises:
        ValueError: Naming the first sharded layer and the way out.
    """
    sharded = [
        name
        for name, layer in layers.items()
        if any(isinstance(p, DTensor) or is_flat_shard(p) for p in layer.parameters(recurse=False))
    ]
    if sharded:
        more = f" and {len(sharded) - 1} more" if len(sharded) > 1 else ""
        raise ValueError(
            f"{what} needs whole weights, but FSDP shards {sharded[0]!r}{more}. Gather a full state dict "
            "(torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            f"full_state_dict=True))), load it into an unsharded copy of the model and {what} that copy "
            "(tests/scripts/fsdp_parity.py does), or train the compression under DDP."
        )

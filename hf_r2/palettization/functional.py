"""The math of DKM (differentiable k-means, Cho et al., ICLR 2022) as pure functions.

Notation: `vectors` is an `(N, d)` tensor (a layer's weight in the layout of `hf_r2.utils.weight_to_vectors`),
`centroids` a `(k, d)` tensor with `k = 2**n_bits`. One DKM iteration computes the attention
`A = softmax(-||w_i - c_j||^2 / tau)` (N x k; squared Euclidean distance, as in coremltools' DKM, so `tau` has the
units of a squared weight) and moves the centroids to `C' = A^T W / A^T 1`; after the last iteration
the layer uses the soft-clustered weight `A C`.

Autograd through these iterations, as written, keeps a few N x k tensors alive per iteration and per layer until the
backward pass. The two backends here keep none:

* `dkm_exact` (`_DKMExact`): a `torch.autograd.Function` that saves only the weight and the k x d centroids of every
  iteration and recomputes each iteration's attention in backward, chunk by chunk. Its gradient is the exact gradient of
  the unrolled iterations (same math as autograd, reordered); peak extra memory is one chunk.
* `dkm_grid` (`_DKMGrid`, scalar weights only): every quantity of scalar DKM is a sum over the weights of a function of
  one scalar, so the weights are splatted once (linear "cloud-in-cell" weights) onto a uniform grid of `M` points
  spanning `[min w, max w]`, the iterations run on the `M` grid points (M x k instead of N x k), and the soft weight is
  read back by linear interpolation. Forward and backward are then O(N) with a small constant, independent of
  `2**n_bits` and of the iteration count. Its backward is the gradient of this discretised function (interpolation
  slope for the direct path, the derivative of the splat weights for the path through the centroids); the grid bounds
  are treated as constants. The error against `dkm_exact` shrinks as the grid spacing falls below the temperature.
"""

from __future__ import annotations

import contextlib
import math

import torch

_TINY = 1e-30
_CHUNK_ELEMENTS = 1 << 20
# A layer's whole attention (k x N) is kept for reuse within one forward or backward call only up to this size.
_KEEP_ELEMENTS = 1 << 22


def cluster_distances(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances `(N, k)` between `(N, d)` vectors and `(k, d)` centroids (DKM's distance)."""
    if vectors.shape[1] == 1:
        return (vectors - centroids.reshape(1, -1)).square()
    return (vectors[:, None, :] - centroids[None, :, :]).square().sum(-1)


def _attention_t(vectors: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    """DKM's attention, transposed: `(k, N)`.

    Logits `(2 w_i.c_j - ||c_j||^2) / temperature`: the dropped `-||w_i||^2` is constant along the softmax, and what is
    left is one matrix product instead of an (N, k, d) difference. The softmax runs along dim 0 of a `(k, N)` tensor:
    on CPU that is up to 20x faster than along the short last dim of `(N, k)` (k = 4: 2.6 ms against 51 ms per 1M).
    """
    bias = centroids.square().sum(1, keepdim=True).div_(-temperature)
    return torch.softmax(torch.addmm(bias, centroids, vectors.T, alpha=2.0 / temperature), dim=0)


def soft_assignment(vectors: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    """DKM's attention `softmax(-||w_i - c_j||^2 / temperature)` over the centroids, shape `(N, k)`."""
    return _attention_t(vectors, centroids, temperature).T


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index `(N,)` of the nearest centroid of each vector (the hard assignment of `finalize`).

    Scalar vectors use a binary search among the sorted centroids' midpoints, O(N log k) with no N x k tensor.
    """
    if vectors.shape[1] == 1:
        values, order = centroids.reshape(-1).sort()
        midpoints = (values[1:] + values[:-1]) / 2
        return order[torch.bucketize(vectors.reshape(-1).contiguous(), midpoints)]
    rows = max(1, _CHUNK_ELEMENTS // max(1, centroids.numel()))
    return torch.cat([torch.cdist(v, centroids).argmin(dim=1) for v in vectors.split(rows)])


def init_centroids(
    vectors: torch.Tensor,
    n_clusters: int,
    method: str = "kmeans++",
    *,
    generator: torch.Generator | None = None,
    max_samples: int = 1 << 16,
) -> torch.Tensor:
    """Initial `(n_clusters, d)` centroids.

    Args:
        vectors (`torch.Tensor`): `(N, d)` data.
        n_clusters (`int`): Number of centroids.
        method (`str`, *optional*, defaults to `"kmeans++"`): `"kmeans++"` (D² sampling on at most `max_samples`
            vectors) or `"quantile"` (the `(j + 0.5) / k` quantiles of each coordinate).
        generator (`torch.Generator`, *optional*): Random source of the sampling.
        max_samples (`int`, *optional*): Subsample size for k-means++.
    """
    vectors = vectors.detach().float()
    if vectors.shape[0] < n_clusters:
        raise ValueError(f"Cannot make {n_clusters} clusters from {vectors.shape[0]} vectors.")
    if method == "quantile":
        sample = vectors
        if sample.shape[0] > 1 << 24:  # torch.quantile's input limit
            sample = sample[torch.randperm(sample.shape[0], generator=generator)[: 1 << 24]]
        q = (torch.arange(n_clusters, dtype=torch.float32) + 0.5) / n_clusters
        return torch.quantile(sample, q, dim=0).reshape(n_clusters, -1).contiguous()
    if method != "kmeans++":
        raise ValueError(f"init method must be 'kmeans++' or 'quantile', got {method!r}.")
    if vectors.shape[0] > max_samples:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=generator)[:max_samples]]
    first = torch.randint(vectors.shape[0], (1,), generator=generator)
    chosen = [vectors[first].reshape(-1)]
    closest = ((vectors - chosen[0]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        total = closest.sum()
        if total <= 0:  # fewer distinct vectors than clusters: duplicate an existing centroid
            chosen.append(chosen[-1])
            continue
        # inverse-CDF sampling: torch.multinomial is ~30x slower for one draw from a long distribution
        target = torch.rand((), generator=generator, dtype=closest.dtype) * total
        pick = torch.searchsorted(closest.cumsum(0), target.reshape(1)).clamp_(max=closest.shape[0] - 1)
        chosen.append(vectors[pick].reshape(-1))
        closest = torch.minimum(closest, ((vectors - chosen[-1]) ** 2).sum(1))
    return torch.stack(chosen)


def kmeans(
    vectors: torch.Tensor,
    n_clusters: int,
    iters: int = 20,
    init: str = "kmeans++",
    *,
    generator: torch.Generator | None = None,
    max_samples: int = 1 << 16,
) -> torch.Tensor:
    """Hard (Lloyd) k-means: `init_centroids`, then `iters` assignment/mean steps. Returns `(n_clusters, d)` centroids.

    Empty clusters keep their previous centroid. At most `max_samples` vectors (a random subset) are used: this is an
    initialisation, which DKM refines on all weights.
    """
    vectors = vectors.detach().float()
    if vectors.shape[0] > max_samples:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=generator)[:max_samples]]
    centroids = init_centroids(vectors, n_clusters, init, generator=generator)
    for _ in range(iters):
        index = nearest_centroid(vectors, centroids)
        counts = torch.bincount(index, minlength=n_clusters).to(vectors.dtype)
        if vectors.shape[1] == 1:  # bincount is several times faster than index_add_ here
            sums = torch.bincount(index, weights=vectors[:, 0], minlength=n_clusters)[:, None]
        else:
            sums = torch.zeros_like(centroids).index_add_(0, index, vectors)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def _update(num: torch.Tensor, den: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    # A centroid whose attention mass underflowed keeps its place instead of becoming 0/0.
    return torch.where(den[:, None] > _TINY, num / den.clamp_min(_TINY)[:, None], previous)


def _chunk_rows(n_clusters: int, dim: int) -> int:
    return max(1, _CHUNK_ELEMENTS // (n_clusters * dim))


def _float32_region(tensor: torch.Tensor):
    """A context with autocast off for `tensor`'s device type (a no-op when autocast is not on).

    DKM's distances, softmaxes and centroid sums run in float32 even inside a bf16/fp16 autocast region (`--bf16`):
    autocast would otherwise run the matrix products in half precision next to float32 tensors (a dtype error in
    `addmm_`), and half precision would lose the small attention weights that move the centroids.
    """
    device_type = tensor.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class _Float32Function(torch.autograd.Function):
    """An autograd Function whose `_forward` / `_backward` run with autocast off (`_float32_region`), in float32 or
    in the inputs' wider dtype (float64 in the reference tests)."""

    @classmethod
    def forward(cls, ctx, vectors, centroids, *args):
        with _float32_region(vectors):
            return cls._forward(ctx, _at_least_float32(vectors), _at_least_float32(centroids), *args)

    @classmethod
    def backward(cls, ctx, grad_out, grad_centroids):
        with _float32_region(grad_out):
            return cls._backward(ctx, _at_least_float32(grad_out), grad_centroids)


class _DKMExact(_Float32Function):
    """Unrolled DKM iterations with an exact, recomputing, chunked backward (see the module docstring).

    Attention tensors are `(k, rows)` (see `_attention_t`).
    """

    @staticmethod
    def _forward(ctx, vectors, centroids, temperature, iters, eps):
        rows = _chunk_rows(*centroids.shape)
        # The last iteration's attention is also the output's: keep it when it is small instead of recomputing it.
        keep = eps <= 0 and centroids.shape[0] * vectors.shape[0] <= _KEEP_ELEMENTS
        history, dens, kept = [centroids], [], []
        current = centroids
        for i in range(iters):
            num = torch.zeros_like(centroids)
            den = torch.zeros(centroids.shape[0], dtype=centroids.dtype, device=centroids.device)
            for v in vectors.split(rows):
                attention = _attention_t(v, current, temperature)
                num.addmm_(attention, v)
                den += attention.sum(1)
                if keep and i == iters - 1:
                    kept.append(attention)
            new = _update(num, den, current)
            history.append(new)
            dens.append(den)
            converged = eps > 0 and (new - current).abs().max().item() <= eps
            current = new
            if converged:
                break
        last, final = history[-2], history[-1]
        if kept:
            out = torch.cat([attention.T @ final for attention in kept])
        else:
            out = torch.cat([_attention_t(v, last, temperature).T @ final for v in vectors.split(rows)])
        del kept
        ctx.save_for_backward(vectors, *history, *dens)
        ctx.temperature, ctx.n_iters = temperature, len(dens)
        final = final.clone()
        ctx.mark_non_differentiable(final)
        return out, final

    @staticmethod
    def _backward(ctx, grad_out, _grad_centroids):
        saved = ctx.saved_tensors
        n_iters, tau = ctx.n_iters, ctx.temperature
        vectors, history, dens = saved[0], saved[1 : n_iters + 2], saved[n_iters + 2 :]
        rows = _chunk_rows(*history[0].shape)
        grad_vectors = torch.zeros_like(vectors)
        # The output A_T C_T also depends on C_T, which depends on every weight: collect dL/dC_T first.
        grad_c = torch.zeros_like(history[0])
        keep = history[0].shape[0] * vectors.shape[0] <= _KEEP_ELEMENTS
        kept = []
        for v, g in zip(vectors.split(rows), grad_out.split(rows), strict=True):
            attention = _attention_t(v, history[-2], tau)
            grad_c.addmm_(attention, g)
            if keep:
                kept.append(attention)
        for t in range(n_iters, 0, -1):
            previous, current, den = history[t - 1], history[t], dens[t - 1]
            live = den > _TINY
            grad_live = torch.where(live[:, None], grad_c, 0.0)
            inv_den = 1.0 / den.clamp_min(_TINY)
            grad_num = grad_live * inv_den[:, None]
            grad_den = -(grad_live * current).sum(1, keepdim=True) * inv_den[:, None]
            grad_previous = torch.where(live[:, None], 0.0, grad_c)  # dead centroids were copied through
            for i, v in enumerate(vectors.split(rows)):
                sl = slice(i * rows, i * rows + v.shape[0])
                attention = kept[i] if t == n_iters and kept else _attention_t(v, previous, tau)
                # through num = A^T V and den = A^T 1
                grad_att = torch.addmm(grad_den, grad_num, v.T)
                if t == n_iters:  # through the output A_T C_T
                    grad_att.addmm_(current, grad_out[sl].T)
                grad_v = attention.T @ grad_num
                # softmax backward, then the logits -||v_i - c_j||^2 / tau: d/dv_i = -2 (v_i - c_j) / tau and
                # d/dc_j = +2 (v_i - c_j) / tau; the sums over j and i avoid an (N, k, d) tensor
                weighted = attention * (grad_att - (attention * grad_att).sum(0, keepdim=True))
                weighted.mul_(-2.0 / tau)
                grad_v += v * weighted.sum(0)[:, None] - weighted.T @ previous
                grad_previous -= weighted @ v - weighted.sum(1, keepdim=True) * previous
                grad_vectors[sl] += grad_v
            grad_c = grad_previous
            kept = []
        return grad_vectors, (grad_c if ctx.needs_input_grad[1] else None), None, None, None


def dkm_exact(
    vectors: torch.Tensor, centroids: torch.Tensor, temperature: float, iters: int, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKM with exact gradients and memory bounded by one chunk of the N x k attention.

    Args:
        vectors (`torch.Tensor`): `(N, d)` weights (float32); gradients flow to them through all iterations.
        centroids (`torch.Tensor`): `(k, d)` starting centroids (warm start).
        temperature (`float`): Softmax temperature tau.
        iters (`int`): Maximum number of iterations (>= 1).
        eps (`float`, *optional*): Stop once no centroid moved by more than `eps`.

    Returns:
        `(soft_vectors, new_centroids)`: `A C` of shape `(N, d)` (differentiable) and the last centroids (detached).
    """
    return _DKMExact.apply(vectors, centroids, float(temperature), int(iters), float(eps))


def _grid_attention(grid: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    return _attention_t(grid[:, None], centroids[:, None], temperature)  # (k, M)


class _DKMGrid(_Float32Function):
    """Scalar DKM on a uniform grid: O(N) forward and backward (see the module docstring).

    The grid holds the splatted weight `mass` (M,) at the points `grid` (M,); the centroid update on it is
    `C'_j = sum_b mass_b grid_b A_bj / sum_b mass_b A_bj`, and the soft value at each grid point `phi = A_T C_T`.
    Everything on the grid is M x k and saved (a few hundred KiB per layer); backward is written out by hand, as
    autograd replaying it cost more than the O(N) work.
    """

    @staticmethod
    def _forward(ctx, weights, centroids, temperature, iters, eps, grid_size, bounds, report):
        lo, hi = bounds if bounds is not None else (x.item() for x in torch.aminmax(weights))
        step = (hi - lo) / (grid_size - 1) if hi > lo else 1.0
        # Weights outside `bounds` (the tails) sit where the attention is saturated: their soft value is the end
        # point's, and they enter the centroid sums at the end point with their offset from it added to `weighted`.
        tails = None
        if report is not None:
            report["saturated"] = True
        if bounds is not None:
            tail_low, tail_high = (weights - lo).clamp_max(0).sum(), (weights - hi).clamp_min(0).sum()
            if tail_low.item() < 0 or tail_high.item() > 0:
                tails = (weights < lo, weights > hi, tail_low, tail_high)
        position = (weights - lo).mul_(1.0 / step)
        if tails is not None:
            position.clamp_(0, grid_size - 1)
        # int32 indices: half the memory of int64, and bincount / indexing accept them
        index = position.to(torch.int32).clamp_(0, grid_size - 2)
        frac = position.sub_(index)
        upper = torch.bincount(index, weights=frac, minlength=grid_size)
        mass = torch.bincount(index, minlength=grid_size).to(weights.dtype) - upper
        mass[1:] += upper[:-1]
        grid = torch.arange(grid_size, dtype=weights.dtype, device=weights.device).mul_(step).add_(lo)
        weighted = grid * mass
        if tails is not None:
            weighted[0] += tails[2]
            weighted[-1] += tails[3]
        history, dens, attentions = [centroids.reshape(-1)], [], []
        for _ in range(iters):
            attention = _grid_attention(grid, history[-1], temperature)
            den = attention @ mass
            new = _update((attention @ weighted)[:, None], den, history[-1][:, None])[:, 0]
            converged = eps > 0 and (new - history[-1]).abs().max().item() <= eps
            history.append(new)
            dens.append(den)
            attentions.append(attention)
            if converged:
                break
        if tails is not None and report is not None:
            report["saturated"] = all(
                _saturated(attention, centroids) for attention, centroids in zip(attentions, history, strict=False)
            )
        phi = history[-1] @ attentions[-1]
        delta = phi[1:] - phi[:-1]
        # index_select is ~4x faster than phi[index] with int32 indices on CPU
        out = phi.index_select(0, index).addcmul_(frac, delta.index_select(0, index))
        ctx.save_for_backward(index, frac, mass, grid, phi, *history, *dens, *attentions)
        ctx.temperature, ctx.step, ctx.n_iters = temperature, step, len(dens)
        ctx.tails = tails
        ctx.all_live = [bool(den.min() > _TINY) for den in dens]
        final = history[-1].reshape(-1, 1).clone()
        ctx.mark_non_differentiable(final)
        return out, final

    @staticmethod
    def _backward(ctx, grad_out, _grad_centroids):
        index, frac, mass, grid, phi, *rest = ctx.saved_tensors
        n, tau, grid_size = ctx.n_iters, ctx.temperature, grid.shape[0]
        history, dens, attentions = rest[: n + 1], rest[n + 1 : 2 * n + 1], rest[2 * n + 1 :]
        # splat the output gradient onto the grid (transpose of the interpolation)
        upper = grad_out * frac
        grad_phi = torch.bincount(index, weights=grad_out - upper, minlength=grid_size)
        grad_phi[1:] += torch.bincount(index, weights=upper, minlength=grid_size)[:-1]
        # phi = A_T C_T
        grad_c = attentions[-1] @ grad_phi
        grad_mass = torch.zeros_like(mass)
        tails = ctx.tails
        grad_tail_low = grad_tail_high = 0.0
        for t in range(n, 0, -1):
            attention, previous, current, den = attentions[t - 1], history[t - 1], history[t], dens[t - 1]
            inv_den = den.clamp_min(_TINY).reciprocal_()
            all_live = ctx.all_live[t - 1]
            live = None if all_live else den > _TINY
            grad_live = grad_c if all_live else torch.where(live, grad_c, 0.0)
            # d L / d(mass_b A_bj) through num_j = sum_b mass_b grid_b A_bj and den_j = sum_b mass_b A_bj
            per_point = torch.outer(grad_live * inv_den, grid).sub_((grad_live * current * inv_den)[:, None])
            grad_mass += (attention * per_point).sum(0)
            grad_att = per_point.mul_(mass)
            if tails is not None:  # through the tails' offsets added to num at the two end points
                coef = grad_live * inv_den
                grad_tail_low = grad_tail_low + coef @ attention[:, 0]
                grad_tail_high = grad_tail_high + coef @ attention[:, -1]
                grad_att[:, 0] += coef * tails[2]
                grad_att[:, -1] += coef * tails[3]
            if t == n:
                grad_att.add_(torch.outer(current, grad_phi))
            # softmax backward, then the logits -(grid_b - c_j)^2 / tau: d/dc_j = 2 (grid_b - c_j) / tau
            grad_logit = attention * (grad_att - (attention * grad_att).sum(0, keepdim=True))
            grad_c_new = (grad_logit * (grid - previous[:, None])).sum(1).mul_(2.0 / tau)
            grad_c = grad_c_new if all_live else grad_c_new.add_(torch.where(live, 0.0, grad_c))
        # direct path: slope of the interpolation; centroid path: d(splat weights)/dw = -+1/step
        slope = (phi[1:] - phi[:-1]).div_(ctx.step)
        mass_slope = (grad_mass[1:] - grad_mass[:-1]).div_(ctx.step)
        grad_weights = slope.index_select(0, index).mul_(grad_out).add_(mass_slope.index_select(0, index))
        if tails is not None:  # saturated: a tail weight moves only the end centroid's sum, by its own offset
            below, above = tails[0], tails[1]
            grad_weights = torch.where(below, grad_tail_low, torch.where(above, grad_tail_high, grad_weights))
        return grad_weights, None, None, None, None, None, None, None


# A tail weight's attention may differ from the grid end point's by at most this much (float32's resolution).
_SATURATION_TOLERANCE = 1e-6
# Logit gap (exp(-20) = 2e-9) that puts the narrowed grid's end points into the saturated tails.
_SATURATION_LOGIT = 20.0


def _saturated(attention: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether the grid's first / last point give the smallest / largest centroid all their attention (to
    `_SATURATION_TOLERANCE`): then every weight beyond them has that same one-hot attention, as `_DKMGrid` assumes."""
    low, high = centroids.argmin(), centroids.argmax()
    return bool(attention[low, 0] >= 1 - _SATURATION_TOLERANCE and attention[high, -1] >= 1 - _SATURATION_TOLERANCE)


def grid_bounds(bounds: tuple[float, float], centroids: torch.Tensor, temperature: float) -> tuple[float, float]:
    """The part of `[min w, max w]` the grid must resolve: the weights beyond it are in saturated tails.

    Below the smallest centroid `c` with nearest neighbour `c + g`, the logit lead of `c` over every other centroid at
    `w = c - m` is at least `g (g + 2 m) / temperature`; `m = (20 temperature / g - g) / 2` makes it 20 (attention
    1 - 2e-9). The margin is doubled and a quarter of the centroids' spread added, as the centroids move within a step;
    `dkm_grid` checks the saturation on the iterations it ran (`report`).

    Args:
        bounds (`tuple[float, float]`): Smallest and largest weight.
        centroids (`torch.Tensor`): The current centroids `(k, 1)`.
        temperature (`float`): Softmax temperature.
    """
    lo, hi = bounds
    values = centroids.reshape(-1).sort().values.tolist()
    if len(values) < 2:
        return bounds
    gap_low, gap_high = values[1] - values[0], values[-1] - values[-2]
    if gap_low <= 0 or gap_high <= 0:
        return bounds
    pad = 0.25 * (values[-1] - values[0])
    margin_low = max(0.0, _SATURATION_LOGIT * temperature / gap_low - gap_low) + pad
    margin_high = max(0.0, _SATURATION_LOGIT * temperature / gap_high - gap_high) + pad
    return max(lo, values[0] - margin_low), min(hi, values[-1] + margin_high)


def grid_points_needed(
    bounds: tuple[float, float], centroids: torch.Tensor, temperature: float, points_per_width: float = 16.0
) -> int:
    """Grid size at which `dkm_grid` resolves the attention's transitions with `points_per_width` points each.

    Between neighbouring centroids `c < c'` the attention logit difference is linear in `w` with slope
    `2 (c' - c) / temperature`, so each transition is about `temperature / (2 (c' - c))` wide; the widest gap gives the
    sharpest transition.

    Args:
        bounds (`tuple[float, float]`): Smallest and largest weight.
        centroids (`torch.Tensor`): The current centroids.
        temperature (`float`): Softmax temperature.
        points_per_width (`float`, *optional*): Grid points per transition width.
    """
    lo, hi = bounds
    values = centroids.reshape(-1).sort().values
    gap = (values[1:] - values[:-1]).max().item() if values.numel() > 1 else 0.0
    if hi <= lo or gap <= 0:
        return 2
    width = temperature / (2.0 * gap)
    return int(math.ceil(points_per_width * (hi - lo) / width)) + 1


def dkm_grid(
    weights: torch.Tensor,
    centroids: torch.Tensor,
    temperature: float,
    iters: int,
    eps: float = 0.0,
    grid_size: int = 4096,
    bounds: tuple[float, float] | None = None,
    report: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar DKM in O(N) per step on a `grid_size`-point grid (see the module docstring for the approximation).

    Args:
        weights (`torch.Tensor`): Flat `(N,)` float32 weights.
        centroids (`torch.Tensor`): `(k, 1)` starting centroids.
        temperature, iters, eps: As in `dkm_exact`.
        grid_size (`int`, *optional*): Grid points (>= 2).
        bounds (`tuple[float, float]`, *optional*): The grid's span; default `(weights.min(), weights.max())`.
            Narrower bounds (`grid_bounds`) treat the weights beyond them as saturated tails (see `_DKMGrid`).
        report (`dict`, *optional*): With narrowed bounds, receives `"saturated"`: whether every iteration's
            attention was saturated at both grid ends; if `False`, the result for the tails is not DKM's and the
            caller must recompute (the layers fall back to the full span or to `dkm_exact`).

    Returns:
        `(soft_weights, new_centroids)` of shapes `(N,)` and `(k, 1)`.
    """
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}.")
    return _DKMGrid.apply(
        weights, centroids, float(temperature), int(iters), float(eps), int(grid_size), bounds, report
    )

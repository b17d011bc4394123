"""Tests of the pure R² functions against slow float64 references written out element by element."""

from __future__ import annotations

import math

import pytest
import torch

from hf_r2 import regularizers as R

# Weight shapes of the three layer kinds; output channels (dim 0) are divisible by 1, 2 and 4.
SHAPES = {"linear": (8, 6), "conv2d": (8, 3, 2, 2), "embedding": (12, 5)}
CLUSTER_DIMS = (1, 2, 4)


# ---- slow references: Python floats and loops only ------------------------------------------------------------------


def ref_coordinates(values: list[float], shape: tuple[int, ...], d: int) -> list[list[float]]:
    """Coordinate c of every d-dimensional vector: output channel g*d + c at input position p, for all g, p."""
    out, rest = shape[0], math.prod(shape[1:])
    coords = [[] for _ in range(d)]
    for g in range(out // d):
        for p in range(rest):
            for c in range(d):
                coords[c].append(values[(g * d + c) * rest + p])
    return coords


def ref_linf(values, shape, d, params=None):
    return sum(max(abs(x) for x in col) for col in ref_coordinates(values, shape, d))


def ref_margin(values, shape, d, params):
    total = 0.0
    for col, m in zip(ref_coordinates(values, shape, d), params, strict=True):
        total += abs(m) + sum(max(abs(x) - abs(m), 0.0) for x in col)
    return total


def ref_soft_min_max(values, shape, d, params):
    total = 0.0
    for col, a in zip(ref_coordinates(values, shape, d), params, strict=True):
        hi, lo = max(col), min(col)
        e_max = [math.exp(a * (x - hi)) for x in col]
        e_min = [math.exp(-a * (x - lo)) for x in col]
        s_max = sum(x * e for x, e in zip(col, e_max, strict=True)) / sum(e_max)
        s_min = sum(x * e for x, e in zip(col, e_min, strict=True)) / sum(e_min)
        total += s_max - s_min + math.exp(-a)
    return total


REFERENCES = {"linf": ref_linf, "margin": ref_margin, "soft_min_max": ref_soft_min_max}


def ref_grad(fn, values, shape, d, params, h=1e-6):
    """Central finite differences in float64 of a reference, w.r.t. every weight and every parameter."""
    grad_w = []
    for i in range(len(values)):
        up, down = list(values), list(values)
        up[i] += h
        down[i] -= h
        grad_w.append((fn(up, shape, d, params) - fn(down, shape, d, params)) / (2 * h))
    grad_p = []
    for j in range(len(params or [])):
        up, down = list(params), list(params)
        up[j] += h
        down[j] -= h
        grad_p.append((fn(values, shape, d, up) - fn(values, shape, d, down)) / (2 * h))
    return grad_w, grad_p


def make_case(r2_type: str, shape: tuple[int, ...], d: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.5
    if r2_type == "margin":
        # Around 1.3 std: some weights outside the margin, most inside.
        param = (0.4 + 0.5 * torch.rand(d, generator=generator)) * (1 if seed % 2 else -1)
    elif r2_type == "soft_min_max":
        param = torch.tensor([0.7, 3.0, 12.0, 0.2][:d])
    else:
        param = None
    return weight, param


def call(r2_type, weight, param, d):
    fn = R.REGULARIZERS[r2_type]
    return fn(weight, d) if param is None else fn(weight, param, d)


# ---- values and gradients vs the references -------------------------------------------------------------------------


@pytest.mark.parametrize("d", CLUSTER_DIMS)
@pytest.mark.parametrize("layer", list(SHAPES))
@pytest.mark.parametrize("r2_type", list(R.R2_TYPES))
def test_value_and_gradient_match_reference(r2_type, layer, d):
    shape = SHAPES[layer]
    weight, param = make_case(r2_type, shape, d, seed=d)
    weight.requires_grad_(True)
    if param is not None:
        param.requires_grad_(True)

    loss = call(r2_type, weight, param, d)
    loss.backward()

    values = weight.detach().double().reshape(-1).tolist()
    params = None if param is None else param.detach().double().tolist()
    expected = REFERENCES[r2_type](values, shape, d, params)
    grad_w, grad_p = ref_grad(REFERENCES[r2_type], values, shape, d, params)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    f64 = torch.float64
    torch.testing.assert_close(weight.grad.reshape(-1).double(), torch.tensor(grad_w, dtype=f64), rtol=1e-4, atol=1e-4)
    if param is not None:
        torch.testing.assert_close(param.grad.double(), torch.tensor(grad_p, dtype=f64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("r2_type", ["margin", "soft_min_max"])
def test_scalar_parameter_equals_one_element_parameter(r2_type):
    weight, param = make_case(r2_type, (8, 6), 1)
    assert call(r2_type, weight, param[0], 1).item() == call(r2_type, weight, param, 1).item()
    assert call(r2_type, weight, float(param[0]), 1).item() == pytest.approx(call(r2_type, weight, param, 1).item())


# ---- properties ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2])
def test_soft_min_max_approaches_hard_range_as_alpha_grows(d):
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    cols = R.weight_coordinates(weight, d)
    hard = (cols.amax(0) - cols.amin(0)).sum().item()
    gaps = []
    for alpha in (1.0, 10.0, 100.0, 1000.0):
        loss = R.soft_min_max(weight, torch.full((d,), alpha), d).item()
        gaps.append(abs(loss - d * math.exp(-alpha) - hard))
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-3 * hard
    # For small alpha both soft extrema tend to the mean: the loss tends to e^(-alpha) per coordinate.
    assert R.soft_min_max(weight, torch.full((d,), 1e-4), d).item() == pytest.approx(d * math.exp(-1e-4), abs=1e-3)


@pytest.mark.parametrize("shift", [-3.0, 0.25, 10.0])
def test_soft_min_max_range_is_shift_invariant(shift):
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    alpha = torch.tensor(2.5)
    assert R.soft_min_max(weight + shift, alpha).item() == pytest.approx(R.soft_min_max(weight, alpha).item(), abs=1e-5)


def test_linf_gradient_only_on_extreme_element():
    weight = torch.randn(6, 7, generator=torch.Generator().manual_seed(5))
    weight[2, 3] = -9.0  # the extreme element, negative
    weight.requires_grad_(True)
    R.linf(weight).backward()
    expected = torch.zeros_like(weight)
    expected[2, 3] = -1.0
    assert torch.equal(weight.grad, expected)


def test_margin_gradient_zero_inside_margin():
    weight = torch.randn(10, 10, generator=torch.Generator().manual_seed(6))
    m = torch.tensor(1.0, requires_grad=True)
    weight.requires_grad_(True)
    R.margin(weight, m).backward()
    inside = weight.detach().abs() < 1.0
    assert inside.any() and (~inside).any()
    assert torch.all(weight.grad[inside] == 0)
    assert torch.equal(weight.grad[~inside], weight.detach()[~inside].sign())
    assert m.grad.item() == 1.0 - (~inside).sum().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r2_type", list(R.R2_TYPES))
def test_stable_for_low_precision_and_large_alpha(r2_type, dtype):
    weight = (torch.randn(16, 32, generator=torch.Generator().manual_seed(7)) * 3).to(dtype).requires_grad_(True)
    param = {"linf": None, "margin": torch.tensor(0.5), "soft_min_max": torch.tensor(1e4)}[r2_type]
    if param is not None:
        param.requires_grad_(True)
    loss = call(r2_type, weight, param, 1)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(weight.grad).all()
    if param is not None:
        assert torch.isfinite(param.grad).all()
    if r2_type == "soft_min_max":  # at alpha = 1e4 the soft range is the hard range
        w = weight.detach().float()
        assert loss.item() == pytest.approx((w.max() - w.min()).item(), rel=1e-3)


def test_init_helpers():
    weight = torch.randn(8, 50, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(R.init_margin(weight), 2 * weight.std(correction=0).reshape(1))
    per_coord = R.init_margin(weight, cluster_dim=2, std_multiple=3.0)
    even, odd = weight[0::2].std(correction=0), weight[1::2].std(correction=0)  # output channels 0, 2, 4.. / 1, 3..
    torch.testing.assert_close(per_coord, 3 * torch.stack([even, odd]))
    assert R.init_alpha(weight, 4, 0.1).tolist() == pytest.approx([0.1] * 4)
    assert set(R.REGULARIZERS) == {"linf", "margin", "soft_min_max"}


# ---- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r2_type", list(R.R2_TYPES))
def test_cluster_dim_not_dividing_raises(r2_type):
    weight, param = make_case(r2_type, (6, 4), 1)
    if param is not None:
        param = param.expand(4).clone()
    with pytest.raises(ValueError, match="cluster_dim=4 does not divide the 6 output channels"):
        call(r2_type, weight, param, 4)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_cluster_dim_below_one_raises(bad):
    with pytest.raises(ValueError, match=f"cluster_dim must be an integer >= 1, got {bad}"):
        R.linf(torch.randn(4, 4), bad)


def test_parameter_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"margin must be a scalar or have shape \(2,\).*got shape \(3,\)"):
        R.margin(torch.randn(4, 4), torch.ones(3), 2)
    with pytest.raises(ValueError, match="std_multiple must be a finite number >= 0, got nan"):
        R.init_margin(torch.randn(4, 4), 1, float("nan"))


@pytest.mark.parametrize("d", [1, 2])
def test_scale_free_forms_match_float64_reference(d):
    """scale = σ (the detached per-coordinate std): margin |m| σ, temperature α / σ, penalty σ e^(-α)."""
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(11)) * 0.03
    sigma = R.coordinate_std(weight, d)
    cols = R.weight_coordinates(weight, d).double()
    torch.testing.assert_close(sigma.double(), cols.std(dim=0, correction=0))
    m, a = torch.full((d,), 1.5), torch.full((d,), 3.0)
    expected_margin = sum(
        1.5 * s + torch.clamp(cols[:, c].abs() - 1.5 * s, min=0).sum() for c, s in enumerate(sigma.double())
    )
    expected_smm = 0.0
    for c, s in enumerate(sigma.double()):
        col = cols[:, c]
        p, q = torch.softmax(3.0 / s * col, 0), torch.softmax(-3.0 / s * col, 0)
        expected_smm = expected_smm + (p * col).sum() - (q * col).sum() + s * math.exp(-3.0)
    assert R.margin(weight, m, d, scale=sigma).item() == pytest.approx(expected_margin.item(), rel=1e-5)
    assert R.soft_min_max(weight, a, d, scale=sigma).item() == pytest.approx(expected_smm.item(), rel=1e-5)
    # The scale is a constant of the step: no gradient reaches the weight through it.
    w = weight.clone().requires_grad_(True)
    R.margin(w, m, d, scale=R.coordinate_std(w, d)).backward()
    inside = R.weight_coordinates(weight, d).abs() <= 1.5 * sigma
    assert torch.all(R.weight_coordinates(w.grad, d)[inside] == 0)
    assert R.coordinate_std(torch.zeros(4, 4)).item() == pytest.approx(R.MIN_SCALE)  # a constant layer stays finite

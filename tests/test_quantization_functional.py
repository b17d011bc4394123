"""Quantizer numerics against slow, written-out references of the papers' formulas."""

import math

import numpy as np
import pytest
import torch

from hf_r2.quantization import (
    DoReFaWeightQuantizer,
    LSQInputQuantizer,
    LSQWeightQuantizer,
    PACTInputQuantizer,
    RTNInputQuantizer,
    RTNWeightQuantizer,
)
from hf_r2.quantization.functional import dequantize, dorefa_weight_encode, lsq_encode, round_ewgs

# Tiny tensors: one thread (conftest.py) avoids oversubscription on the shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _heavy_tailed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x.view(-1)[:3] = torch.tensor([6.0, -7.0, 5.0])  # outliers, so clipping happens
    return x


def _n_levels(t: torch.Tensor) -> int:
    return torch.unique(t.detach()).numel()


# ---------------------------------------------------------------------------------------------------------------
# At most 2^b levels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_and_ewgs_weights_take_at_most_2_pow_b_levels(bits):
    w = _heavy_tailed(64, 32)
    for delta in (None, 0.5):
        q = LSQWeightQuantizer(w, bits, ewgs_delta=delta)
        assert 2 <= _n_levels(q(w)) <= 2**bits
        codes, _, _ = q.encode(w)
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_inputs_take_at_most_2_pow_b_levels(bits, signed):
    x = _heavy_tailed(16, 50)
    x = x if signed else x.relu()
    q = LSQInputQuantizer(bits)
    if signed and bits == 1:
        with pytest.raises(ValueError, match="a_bits >= 2"):  # a signed 1-bit grid would be {-s, 0}
            q(x)
        return
    y = q(x)
    assert bool(q.signed) == signed
    assert 2 <= _n_levels(y) <= 2**bits
    if not signed:
        assert y.min() >= 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_pact_inputs_take_at_most_2_pow_b_levels(bits, signed):
    x = _heavy_tailed(16, 50)
    q = PACTInputQuantizer(bits, alpha_init=2.0, signed=signed)
    y = q(x)
    assert 2 <= _n_levels(y) <= 2**bits
    assert y.abs().max() <= 2.0 + 1e-6


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_weights_take_at_most_2_pow_b_levels(bits):
    w = _heavy_tailed(32, 16)
    for rescale in (False, True):
        y = DoReFaWeightQuantizer(bits, rescale=rescale)(w)
        assert 2 <= _n_levels(y) <= 2**bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_weights_and_inputs_take_at_most_2_pow_b_levels(bits, symmetric):
    if symmetric and bits == 1:
        with pytest.raises(ValueError, match="symmetric 1-bit"):
            RTNWeightQuantizer(bits, symmetric=True)
        return
    w = _heavy_tailed(8, 40)
    per_tensor = RTNWeightQuantizer(bits, per_channel=False, symmetric=symmetric)(w)
    assert 2 <= _n_levels(per_tensor) <= 2**bits
    per_channel = RTNWeightQuantizer(bits, per_channel=True, symmetric=symmetric)(w)
    for row in per_channel:
        assert _n_levels(row) <= 2**bits
    act = RTNInputQuantizer(bits, symmetric=symmetric)
    act.calibrating = True
    act(w)
    act.calibrating = False
    assert 2 <= _n_levels(act(w)) <= 2**bits


# ---------------------------------------------------------------------------------------------------------------
# LSQ: forward, step-size gradient with its scale g, straight-through estimator
# ---------------------------------------------------------------------------------------------------------------


def _lsq_reference(x, s, q_n, q_p, g, grad_out, delta=0.0):
    """Element by element: LSQ's (eq. 3) step gradient times g; EWGS-scaled round when delta > 0."""
    out = torch.empty_like(x)
    dx = torch.empty_like(x)
    ds = 0.0
    levels = q_n + q_p
    for i in range(x.numel()):
        v = x.view(-1)[i].item() / s
        go = grad_out.view(-1)[i].item()
        if v <= -q_n:
            code, d_step, d_x = -q_n, -q_n, 0.0
        elif v >= q_p:
            code, d_step, d_x = q_p, q_p, 0.0
        else:
            code = round(v)  # Python rounds half to even, like torch.round
            e = 1 + delta * math.copysign(1.0, go) * (v - code) / levels if go != 0 else 1.0
            d_step, d_x = code - e * v, e
        out.view(-1)[i] = code * s
        dx.view(-1)[i] = go * d_x
        ds += go * d_step
    return out, dx, ds * g


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lsq_weight_gradients_match_the_closed_form_with_scale_g(bits):
    w = _heavy_tailed(12, 10).requires_grad_(True)
    grad_out = torch.randn(12, 10, generator=torch.Generator().manual_seed(1))
    q = LSQWeightQuantizer(w, bits)
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    s = q.step.item()
    assert s == pytest.approx(2 * w.detach().abs().mean().item() / math.sqrt(q_p))  # LSQ initialization
    out = q(w)
    (out * grad_out).sum().backward()
    g = 1 / math.sqrt(w.numel() * q_p)
    ref_out, ref_dx, ref_ds = _lsq_reference(w.detach(), s, q_n, q_p, g, grad_out)
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(w.grad, ref_dx)
    assert q.step.grad.item() == pytest.approx(ref_ds, rel=1e-5, abs=1e-7)
    # Without g the step gradient would be sqrt(N * Q_P) times larger: the scale matters.
    assert abs(ref_ds / g) > 10 * abs(ref_ds)


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_input_gradients_use_features_per_example_in_g(signed):
    bits = 3
    x = _heavy_tailed(4, 5, 6)
    # abs, not relu: the paper's gradient is discontinuous at the clip points (x = 0 here), where any choice is fine.
    x = (x if signed else x.abs()).requires_grad_(True)
    grad_out = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(2))
    q = LSQInputQuantizer(bits)
    out = q(x)
    q_n, q_p = (4, 3) if signed else (0, 7)
    s = q.step.item()
    assert s == pytest.approx(2 * x.detach().abs().mean().item() / math.sqrt(q_p))
    (out * grad_out).sum().backward()
    g = 1 / math.sqrt(5 * 6 * q_p)  # N = features of one example
    ref_out, ref_dx, ref_ds = _lsq_reference(x.detach(), s, q_n, q_p, g, grad_out)
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(x.grad, ref_dx)
    assert q.step.grad.item() == pytest.approx(ref_ds, rel=1e-5, abs=1e-7)


def test_lsq_step_stays_positive():
    w = _heavy_tailed(6, 6)
    q = LSQWeightQuantizer(w, 2)
    pos = q(w)
    with torch.no_grad():
        q.step.neg_()
    torch.testing.assert_close(q(w), pos)  # the effective step is |step|
    with torch.no_grad():
        q.step.zero_()
    assert torch.isfinite(q(w)).all()  # clamped at eps, no division by zero


# ---------------------------------------------------------------------------------------------------------------
# EWGS
# ---------------------------------------------------------------------------------------------------------------


def test_ewgs_with_delta_zero_is_the_straight_through_estimator():
    w = _heavy_tailed(10, 10)
    grad_out = torch.randn(10, 10, generator=torch.Generator().manual_seed(3))
    grads = []
    for delta in (None, 0.0):
        wt = w.clone().requires_grad_(True)
        q = LSQWeightQuantizer(w, 2, ewgs_delta=delta)
        (q(wt) * grad_out).sum().backward()
        grads.append((wt.grad, q.step.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("delta", [0.3, 2.0])
def test_ewgs_gradients_match_the_formula(delta):
    bits = 2
    w = _heavy_tailed(8, 9).requires_grad_(True)
    grad_out = torch.randn(8, 9, generator=torch.Generator().manual_seed(4))
    q = LSQWeightQuantizer(w, bits, ewgs_delta=delta)
    (q(w) * grad_out).sum().backward()
    q_n, q_p = 2, 1
    g = 1 / math.sqrt(w.numel() * q_p)
    _, ref_dx, ref_ds = _lsq_reference(w.detach(), q.step.item(), q_n, q_p, g, grad_out, delta=delta)
    torch.testing.assert_close(w.grad, ref_dx)
    assert q.step.grad.item() == pytest.approx(ref_ds, rel=1e-5, abs=1e-7)
    _, ste_dx, _ = _lsq_reference(w.detach(), q.step.item(), q_n, q_p, g, grad_out)
    assert not torch.allclose(w.grad, ste_dx)


def test_round_ewgs_scales_each_element_in_the_normalized_domain():
    x = torch.tensor([0.2, 0.7, -1.4, 2.5], requires_grad=True)
    grad = torch.tensor([1.0, -2.0, 0.5, 1.0])
    round_ewgs(x, 0.6, 3).backward(grad)
    pairs = zip(x.tolist(), grad.tolist(), strict=True)
    expected = [gi * (1 + 0.6 * math.copysign(1, gi) * (xi - round(xi)) / 3) for xi, gi in pairs]
    torch.testing.assert_close(x.grad, torch.tensor(expected))


# ---------------------------------------------------------------------------------------------------------------
# PACT and DoReFa
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_pact_forward_and_gradients(bits):
    alpha0 = 1.5
    x = _heavy_tailed(10, 12).requires_grad_(True)
    grad_out = torch.randn(10, 12, generator=torch.Generator().manual_seed(5))
    q = PACTInputQuantizer(bits, alpha_init=alpha0, alpha_l2=0.0, signed=False)
    out = q(x)
    (out * grad_out).sum().backward()
    levels = 2**bits - 1
    xs, gs = x.detach().view(-1).tolist(), grad_out.view(-1).tolist()
    ref_out = [round(min(max(v, 0.0), alpha0) * levels / alpha0) * alpha0 / levels for v in xs]
    ref_dx = [go if 0 <= v < alpha0 else 0.0 for v, go in zip(xs, gs, strict=True)]
    ref_da = sum(go for v, go in zip(xs, gs, strict=True) if v >= alpha0)  # PACT eq. 3: 1 where x >= alpha, else 0
    torch.testing.assert_close(out.detach().view(-1), torch.tensor(ref_out))
    torch.testing.assert_close(x.grad.view(-1), torch.tensor(ref_dx))
    assert q.alpha.grad.item() == pytest.approx(ref_da, rel=1e-5)


def test_pact_signed_alpha_gradient_and_l2_penalty():
    alpha0, lam = 1.2, 0.05
    x = _heavy_tailed(10, 12)
    grad_out = torch.randn(10, 12, generator=torch.Generator().manual_seed(6))
    q = PACTInputQuantizer(2, alpha_init=alpha0, alpha_l2=lam, signed=True)
    (q(x) * grad_out).sum().backward()
    xs, gs = x.view(-1).tolist(), grad_out.view(-1).tolist()
    pairs = list(zip(xs, gs, strict=True))
    ref = sum(go for v, go in pairs if v >= alpha0) - sum(go for v, go in pairs if v <= -alpha0)
    # The L2 term lambda/2 * alpha^2 adds lambda * alpha to the gradient.
    assert q.alpha.grad.item() == pytest.approx(ref + lam * alpha0, rel=1e-5)


def test_pact_detects_signed_inputs_from_the_first_batch():
    q = PACTInputQuantizer(2)
    q(torch.rand(3, 4))
    assert int(q.signed) == 0
    q2 = PACTInputQuantizer(2)
    q2(torch.randn(3, 4))
    assert int(q2.signed) == 1


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("rescale", [False, True])
def test_dorefa_weight_forward_and_gradient(bits, rescale):
    w = (_heavy_tailed(7, 5) * 0.5).requires_grad_(True)
    grad_out = torch.randn(7, 5, generator=torch.Generator().manual_seed(7))
    out = DoReFaWeightQuantizer(bits, rescale=rescale)(w)
    (out * grad_out).sum().backward()
    levels = 2**bits - 1
    wd = w.detach()
    t = torch.tanh(wd)
    m = t.abs().max().item()
    c = wd.abs().max().item() if rescale else 1.0
    ref_out = [c * (2 * round(levels * (ti / (2 * m) + 0.5)) / levels - 1) for ti in t.view(-1).tolist()]
    torch.testing.assert_close(out.detach().view(-1), torch.tensor(ref_out))
    # With a straight-through round, w_q = c * tanh(w) / max|tanh(w)|; its gradient, the max's term included:
    tl, gl = t.view(-1).tolist(), grad_out.view(-1).tolist()
    k = max(range(len(tl)), key=lambda i: abs(tl[i]))
    cross = sum(gj * tj for gj, tj in zip(gl, tl, strict=True)) / m**2
    ref_grad = [c * gi * (1 - ti**2) / m for gi, ti in zip(gl, tl, strict=True)]
    ref_grad[k] -= c * math.copysign(1.0, tl[k]) * (1 - tl[k] ** 2) * cross
    torch.testing.assert_close(w.grad.view(-1), torch.tensor(ref_grad), rtol=1e-4, atol=1e-6)


def test_dorefa_codes_dequantize_to_the_forward_value():
    w = _heavy_tailed(4, 4)
    codes, scale, zp = dorefa_weight_encode(w, 3)
    assert codes.min() >= 0 and codes.max() <= 7
    assert torch.equal(dequantize(codes, scale, zp), DoReFaWeightQuantizer(3)(w))


# ---------------------------------------------------------------------------------------------------------------
# Round-to-nearest PTQ
# ---------------------------------------------------------------------------------------------------------------


def _rtn_reference_row(values, bits, symmetric):
    f = np.float32  # float32 like the model, so that ties round the same way
    values = [f(v) for v in values]
    lo, hi = min(min(values), f(0)), max(max(values), f(0))
    if symmetric:
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = max(-lo, hi) / f((q_max - q_min) / 2)
        zp = 0
    else:
        q_min, q_max = 0, 2**bits - 1
        scale = (hi - lo) / f(q_max - q_min)
        zp = min(max(round(float(-lo / scale)), q_min), q_max)
    return [float((f(min(max(round(float(v / scale)) + zp, q_min), q_max) - zp)) * scale) for v in values], scale


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_rtn_weights_match_a_slow_reference(bits, symmetric, per_channel):
    w = _heavy_tailed(6, 3, 2, 2)
    out = RTNWeightQuantizer(bits, per_channel=per_channel, symmetric=symmetric)(w)
    if per_channel:
        ref = [_rtn_reference_row(row.reshape(-1).tolist(), bits, symmetric)[0] for row in w]
        ref = torch.tensor(ref).reshape(w.shape)
    else:
        ref = torch.tensor(_rtn_reference_row(w.reshape(-1).tolist(), bits, symmetric)[0]).reshape(w.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_rtn_asymmetric_error_is_at_most_half_a_step():
    w = torch.rand(5, 20) * 3 - 0.5
    out = RTNWeightQuantizer(4, per_channel=True, symmetric=False)(w)
    for row, qrow in zip(w, out, strict=True):
        _, scale = _rtn_reference_row(row.tolist(), 4, False)
        assert (row - qrow).abs().max() <= scale / 2 + 1e-6


def test_lsq_encode_codes_are_integers_in_range():
    x = _heavy_tailed(100)
    codes, s = lsq_encode(x, torch.tensor(0.3), 2, 1, 0.1)
    assert torch.equal(codes, codes.round()) and codes.min() >= -2 and codes.max() <= 1
    assert torch.equal(dequantize(codes, s), codes * s)

"""DKM palettization: numerics against a plain unrolled DKM and scikit-learn k-means, finalize, errors, Trainer runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert, tiny_gpt2_lm, tiny_mobilebert
from sklearn.cluster import KMeans
from torch import nn

from hf_r2.palettization import (
    DKMConfig,
    DKMConv2d,
    DKMEmbedding,
    DKMLinear,
    dkm_exact,
    dkm_grid,
    dkm_layers,
    finalize,
    kmeans,
    palettize,
    palettized_modules,
)
from hf_r2.palettization.functional import grid_bounds, grid_points_needed
from hf_r2.utils import weight_to_vectors

# Tiny tensors: one thread (conftest.py) avoids oversubscription on the shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_dkm(vectors, centroids, tau, iters):
    """DKM written plainly (Cho et al., Algorithm 1), differentiated by autograd through every iteration."""
    for _ in range(iters):
        dist = ((vectors[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
        attention = torch.softmax(-dist / tau, dim=1)
        new = attention.T @ vectors / attention.sum(0)[:, None]
        previous, centroids = centroids, new
    dist = ((vectors[:, None, :] - previous[None, :, :]) ** 2).sum(-1)
    return torch.softmax(-dist / tau, dim=1) @ centroids, centroids


def _data(n, d, k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=g, dtype=dtype) * 0.02
    return vectors, vectors[torch.randperm(n, generator=g)[:k]].clone()


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        x = self.embed(ids)  # (B, L, 8)
        x = self.conv(x.transpose(1, 2)[..., None])[..., 0].mean(-1)
        return self.fc(x)


# ---- numerics ----


@pytest.mark.parametrize("d, k", [(1, 4), (1, 16), (2, 4), (4, 8)])
def test_exact_backend_equals_unrolled_autograd(d, k):
    vectors, start = _data(300, d, k)
    grad = torch.randn(300, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_v = vectors.clone().requires_grad_()
    ref_out, ref_c = reference_dkm(ref_v, start, 1e-4, 3)
    (ref_out * grad).sum().backward()
    our_v = vectors.clone().requires_grad_()
    out, c = dkm_exact(our_v, start, 1e-4, 3)
    (out * grad).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, ref_c, rtol=1e-10, atol=1e-12)
    assert ref_v.grad.abs().max() > 0
    torch.testing.assert_close(our_v.grad, ref_v.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("keep", [True, False])
def test_exact_backend_is_chunked_without_changing_results(monkeypatch, keep):
    import hf_r2.palettization.functional as functional

    vectors, start = _data(500, 2, 4)
    vectors.requires_grad_()
    out, _ = reference_dkm(vectors, start, 1e-4, 2)
    (grad,) = torch.autograd.grad(out.square().sum(), vectors)
    monkeypatch.setattr(functional, "_CHUNK_ELEMENTS", 64)  # 8 rows per chunk
    if not keep:  # recompute the last attention instead of keeping it
        monkeypatch.setattr(functional, "_KEEP_ELEMENTS", 0)
    out2, _ = dkm_exact(vectors, start, 1e-4, 2)
    (grad2,) = torch.autograd.grad(out2.square().sum(), vectors)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(grad2, grad)


def test_grid_backend_converges_to_exact_dkm_as_the_grid_refines():
    vectors, start = _data(3000, 1, 16)
    grad = torch.randn(3000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_v = vectors.clone().requires_grad_()
    ref_out, ref_c = reference_dkm(ref_v, start, 1e-4, 3)
    (ref_out[:, 0] * grad).sum().backward()
    errors = []
    for grid_size in (256, 1024, 8192):
        w = vectors[:, 0].clone().requires_grad_()
        out, c = dkm_grid(w, start, 1e-4, 3, grid_size=grid_size)
        (out * grad).sum().backward()
        spread = (ref_c.max() - ref_c.min()).item()
        errors.append(
            (
                (out - ref_out[:, 0]).abs().max().item() / spread,
                (c - ref_c).abs().max().item() / spread,
                ((w.grad - ref_v.grad[:, 0]).norm() / ref_v.grad.norm()).item(),
            )
        )
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert all(f < c for f, c in zip(fine, coarse, strict=True)), errors
    out_err, c_err, grad_err = errors[-1]
    assert out_err < 1e-5 and c_err < 1e-5 and grad_err < 2e-3, errors


def _heavy_tailed(n, k, seed=0):
    """Weights of spread 0.02 with 1 % outliers out to +-0.6 (as in pretrained transformers), centroids of the bulk."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    outliers = torch.randperm(n, generator=g)[: n // 100]
    weights[outliers] = (torch.rand(outliers.numel(), generator=g, dtype=torch.float64) * 1.2 - 0.6).clamp(-0.6, 0.6)
    weights[outliers[:2]] = torch.tensor([-0.6, 0.6], dtype=torch.float64)
    bulk = torch.ones(n, dtype=torch.bool)
    bulk[outliers] = False
    return weights, kmeans(weights[bulk, None], k, 20).double()  # centroids in the bulk: the outliers are tails


@pytest.mark.parametrize("k", [4, 16])
def test_grid_with_saturated_tails_matches_exact_dkm(k):
    weights, start = _heavy_tailed(20000, k)
    bounds = (weights.min().item(), weights.max().item())
    span = grid_bounds(bounds, start, 1e-4)
    assert bounds[0] < span[0] < span[1] < bounds[1]  # the tails are left out of the grid
    assert (weights < span[0]).sum() > 10 and (weights > span[1]).sum() > 10
    full, narrow = grid_points_needed(bounds, start, 1e-4), grid_points_needed(span, start, 1e-4)
    assert narrow < full / 2
    grad = torch.randn(weights.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_v = weights[:, None].clone().requires_grad_()
    ref_out, ref_c = reference_dkm(ref_v, start, 1e-4, 3)
    (ref_out[:, 0] * grad).sum().backward()
    w = weights.clone().requires_grad_()
    report = {}
    out, c = dkm_grid(w, start, 1e-4, 3, grid_size=16 * narrow, bounds=span, report=report)
    (out * grad).sum().backward()
    assert report == {"saturated": True}
    spread = (ref_c.max() - ref_c.min()).item()
    assert (out - ref_out[:, 0]).abs().max().item() / spread < 1e-5
    assert (c - ref_c).abs().max().item() / spread < 1e-5
    tails = (weights < span[0]) | (weights > span[1])
    assert ref_v.grad[tails, 0].abs().max() > 0  # the tails' gradient (through the end centroids) is tested
    error = w.grad - ref_v.grad[:, 0]
    # a tail weight's gradient is its end centroid's (exact saturation); only that centroid's gradient has grid error
    assert (error[tails].norm() / ref_v.grad.norm()).item() < 3e-5
    assert (error.norm() / ref_v.grad.norm()).item() < 1e-3  # the grid's discretisation error inside the span


def test_grid_reports_unsaturated_tails():
    weights, start = _heavy_tailed(5000, 4)
    # a span that cuts into the attention's transitions: the tails are not saturated there
    values = start.reshape(-1).sort().values
    span = ((values[0] + values[1]).item() / 2, (values[-1] + values[-2]).item() / 2)
    report = {}
    dkm_grid(weights, start, 1e-4, 3, grid_size=1024, bounds=span, report=report)
    assert report == {"saturated": False}


def test_layer_falls_back_when_the_tails_are_not_saturated(monkeypatch):
    import hf_r2.palettization.layers as layers

    torch.manual_seed(0)
    base = nn.Linear(128, 256)
    results = {}
    for name, narrow in (("fallback", True), ("exact", False)):
        layer = nn.Linear(128, 256)
        layer.load_state_dict(base.state_dict())
        model = nn.Sequential(layer)
        palettize(model, DKMConfig(n_bits=2, backend="auto" if narrow else "exact"))
        if narrow:  # a span inside the centroids: never saturated, so the layer must recompute
            monkeypatch.setattr(layers, "grid_bounds", lambda bounds, c, t: (c.min().item() / 2, c.max().item() / 2))
        out = model(torch.randn(16, 128, generator=torch.Generator().manual_seed(1)))
        out.square().sum().backward()
        results[name] = (out.detach(), model[0].weight.grad, model[0].centroids.clone())
    for got, want in zip(results["fallback"], results["exact"], strict=True):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_auto_backend_takes_the_grid_for_a_heavy_tailed_layer():
    weights, start = _heavy_tailed(128 * 512, 4)
    layer = nn.Linear(128, 512)
    with torch.no_grad():
        layer.weight.copy_(weights.reshape(512, 128))
    model = nn.Sequential(layer)
    palettize(model, DKMConfig(n_bits=2, grid_size=4096))
    model[0].centroids.copy_(start)  # centroids in the bulk, as after training
    bounds = (weights.min().item(), weights.max().item())
    assert grid_points_needed(bounds, model[0].centroids, 1e-4) > 4096  # the whole span would not fit
    assert model[0].dkm_grid_size() is not None


def test_layer_grid_and_exact_backends_agree_on_a_real_layer():
    torch.manual_seed(0)
    base = nn.Linear(128, 256)
    grads = {}
    for backend in ("auto", "exact"):
        layer = nn.Linear(128, 256)
        layer.load_state_dict(base.state_dict())
        model = nn.Sequential(layer)
        palettize(model, DKMConfig(n_bits=4, backend=backend))
        if backend == "auto":
            assert model[0].dkm_grid_size() is not None  # the grid is what 'auto' picks for this layer
        x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
        model(x).square().sum().backward()
        grads[backend] = model[0].weight.grad
    rel = ((grads["auto"] - grads["exact"]).norm() / grads["exact"].norm()).item()
    assert rel < 1e-2


def _match(ours, theirs):
    """Max distance from each reference centroid to its nearest centroid of ours, and back."""
    dist = torch.cdist(torch.as_tensor(theirs, dtype=torch.float64), ours.double())
    return max(dist.min(1).values.max().item(), dist.min(0).values.max().item())


@pytest.mark.parametrize("d", [1, 2])
def test_clustering_matches_sklearn_kmeans(d):
    rng = np.random.default_rng(0)
    k = 4
    centers = rng.normal(size=(k, d)) * 0.1
    data = np.concatenate([c + rng.normal(size=(150, d)) * 0.01 for c in centers])
    reference = KMeans(n_clusters=k, n_init=10, random_state=0).fit(data)
    vectors = torch.as_tensor(data, dtype=torch.float64)
    # plain k-means initialisation
    init = kmeans(vectors, k, 50, generator=torch.Generator().manual_seed(0)).double()
    assert _match(init, reference.cluster_centers_) < 1e-6
    # DKM iterations at a low temperature reach the same fixed point, also from a perturbed start
    start = init + 0.005
    _, centroids = dkm_exact(vectors, start, 1e-6, 30)
    assert _match(centroids, reference.cluster_centers_) < 1e-4
    inertia = ((vectors[:, None] - centroids[None]) ** 2).sum(-1).min(1).values.sum().item()
    assert inertia == pytest.approx(reference.inertia_, rel=1e-3)


# ---- layers and the model lifecycle ----


@pytest.mark.parametrize("n_bits, cluster_dim", [(2, 1), (1, 1), (2, 2)])
def test_finalize_leaves_at_most_2_to_the_b_values_per_layer(n_bits, cluster_dim):
    torch.manual_seed(0)
    model = TinyNet()
    palettize(model, DKMConfig(n_bits=n_bits, cluster_dim=cluster_dim, init_iters=5))
    assert isinstance(model.embed, DKMEmbedding) and isinstance(model.conv, DKMConv2d)
    assert isinstance(model.fc, DKMLinear)
    assert {k for k in model.state_dict() if not k.endswith("centroids")} == set(TinyNet().state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 32, (4, 6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        model(ids).square().mean().backward()
        for name, layer in dkm_layers(model).items():
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith("weight"))
    model.eval()
    eval_out = model(ids)
    finalize(model)  # a plain nn.Module: plain layers with hard-assigned weights
    assert type(model.fc) is nn.Linear and type(model.conv) is nn.Conv2d and type(model.embed) is nn.Embedding
    assert not any(k.endswith("centroids") for k in model.state_dict())
    for layer in (model.embed, model.conv, model.fc):
        vectors = weight_to_vectors(layer.weight.detach(), cluster_dim)
        assert 1 <= torch.unique(vectors, dim=0).shape[0] <= 2**n_bits
    torch.testing.assert_close(model(ids), eval_out)  # eval during DKM training showed the finalized model


def test_soft_forward_tends_to_hard_as_temperature_falls():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    gaps = []
    for tau in (1e-3, 1e-5, 1e-7, 1e-9):
        model = nn.Sequential(nn.Linear(64, 64))
        model[0].load_state_dict(base.state_dict())
        palettize(model, DKMConfig(n_bits=2, temperature=tau, kmeans_iters=1))
        layer = model[0]
        with torch.no_grad():
            soft = layer.soft_weight(update=True)
            hard = layer.hard_weight()
        gaps.append((soft - hard).abs().max().item())
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 1e-5 * base.weight.abs().max().item()


def test_finalize_with_compress_gives_the_compact_layers_and_the_same_outputs():
    model = tiny_mobilebert()
    palettize(model, DKMConfig(n_bits=2, init_iters=5))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids)  # one training-mode forward: warm centroids
    model.eval()
    expected = model(input_ids=ids).logits
    n_layers = len(dkm_layers(model))
    finalize(model)
    assert len(palettized_modules(model)) == n_layers
    assert model.config.quantization_config is not None
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


# ---- configuration and bad input ----


def test_config_round_trips_through_a_dict():
    config = DKMConfig(n_bits=3, cluster_dim=2, temperature=1e-5, exclude_modules=["classifier"], backend="exact")
    assert DKMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown DKMConfig keys \\['bits'\\]"):
        DKMConfig.from_dict({"bits": 2})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_bits": 0}, "n_bits must be an integer in 1..8, got 0"),
        ({"n_bits": 9}, "n_bits must be an integer in 1..8, got 9"),
        ({"n_bits": 2.0}, "got 2.0"),
        ({"cluster_dim": 0}, "cluster_dim must be an integer >= 1, got 0"),
        ({"temperature": 0.0}, "temperature must be a number > 0, got 0.0"),
        ({"kmeans_iters": 0}, "kmeans_iters must be an integer >= 1, got 0"),
        ({"init": "random"}, "init must be one of"),
        ({"backend": "fast"}, "backend must be one of"),
        ({"backend": "grid", "cluster_dim": 2}, "backend='grid' needs cluster_dim=1"),
    ],
)
def test_bad_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DKMConfig(**kwargs)


def test_bad_layers_are_clear_errors_and_change_nothing():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="cluster_dim=4 does not divide the 6 output channels of 0.weight"):
        palettize(model, DKMConfig(n_bits=1, cluster_dim=4))
    assert type(model[0]) is nn.Linear  # validation precedes any swap
    with pytest.raises(ValueError, match="1.weight .* has 12 weight vectors .* fewer than the 2\\*\\*4 = 16 centroids"):
        palettize(model, DKMConfig(n_bits=4))
    assert type(model[0]) is nn.Linear
    palettize(model, DKMConfig(n_bits=4, weight_threshold=13))  # skips the small layer
    assert isinstance(model[0], DKMLinear) and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match="already palettized"):
        palettize(model, DKMConfig(n_bits=2, target_modules=["0"]))
    tied = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"0.weight = 1.weight are one tensor.*exclude_modules=\['0', '1'\]"):
        palettize(tied, DKMConfig(n_bits=1))
    assert type(tied[0]) is nn.Embedding and type(tied[1]) is nn.Linear
    with pytest.raises(ValueError, match="no DKM layer"):
        finalize(nn.Sequential(nn.Linear(2, 2)))


def _tiny_gpt2_lm(**kwargs):
    return tiny_gpt2_lm(0, **kwargs)


def _tiny_bert_mlm():
    from transformers import BertForMaskedLM

    return tiny_bert(0, model_class=BertForMaskedLM, max_position_embeddings=16)


@pytest.mark.parametrize(
    "build, embedding, head",
    [
        (_tiny_gpt2_lm, "transformer.wte", "lm_head"),
        (_tiny_bert_mlm, "bert.embeddings.word_embeddings", "cls.predictions.decoder"),
    ],
)
def test_tied_embeddings_are_refused_at_palettize_naming_them(build, embedding, head, tmp_path):
    """Issue 15.2: a tied LM head used to pass `palettize` (head excluded) and lose the trained model at finalize."""
    import hf_r2.palettization.quantizer  # noqa: F401  (registers the loader)

    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for exclude in (None, [head]):  # excluding only the head leaves the tied embedding palettized: still refused
        with pytest.raises(
            ValueError,
            match=rf"palettize: tied weights.*{head}.weight.*are one tensor.*"
            rf"exclude_modules=.*'{embedding}'.*tie_word_embeddings",
        ):
            palettize(model, DKMConfig(n_bits=2, exclude_modules=exclude))
        assert not dkm_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    palettize(model, DKMConfig(n_bits=2, exclude_modules=[embedding, head]))  # the documented fix works
    assert embedding not in dkm_layers(model) and head not in dkm_layers(model)
    model.eval()
    ids = torch.randint(1, 64, (2, 8))
    finalize(model)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()  # saves and loads, tie intact
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_finalize_validates_everything_before_changing_anything(tmp_path):
    """A finalize refusal (here a tie made after palettize) must leave the trained DKM model intact and finalizable."""
    from transformers import GPT2LMHeadModel

    import hf_r2.palettization.quantizer  # noqa: F401  (registers the loader)

    model = _tiny_gpt2_lm(tie_word_embeddings=False)
    palettize(model, DKMConfig(n_bits=2, exclude_modules=["lm_head"]))
    model.train()
    model(torch.randint(0, 64, (2, 8)))  # one training forward: centroids move
    centroids = {n: m.centroids.clone() for n, m in dkm_layers(model).items()}
    model.lm_head.weight = model.transformer.wte.weight  # e.g. a `tie_weights()` call after palettize
    with pytest.raises(
        ValueError,
        match=r"finalize: tied weights.*lm_head.weight = transformer.wte.weight.*"
        r"Nothing was changed",
    ):
        finalize(model)
    layers = dkm_layers(model)
    assert set(layers) == set(centroids) and not palettized_modules(model)
    assert all(torch.equal(layers[n].centroids, c) for n, c in centroids.items())
    assert getattr(model.config, "quantization_config", None) is None
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # the advised fix
    model.eval()
    ids = torch.randint(0, 64, (2, 8))
    expected = model(ids).logits
    finalize(model)
    assert set(palettized_modules(model)) == set(centroids)
    for name, c in centroids.items():  # the trained centroids are the LUTs
        torch.testing.assert_close(palettized_modules(model)[name].weight_lut.float(), c, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_palettize_refuses_non_finite_weights_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
        model[1].weight[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1.weight holds 2 NaN/Inf value\(s\).*exclude_modules=\['1'\]"):
        palettize(model, DKMConfig(n_bits=2))
    assert type(model[0]) is nn.Linear


# ---- end to end through the Trainer ----


class _PairDataset(torch.utils.data.Dataset):
    """Random token pairs; label 1 when token 7 occurs."""

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (n, 12), generator=g)
        self.labels = (self.ids == 7).any(1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_r2_fine_tuning_then_dkm_2_bit_through_the_trainer(tmp_path):
    from hf_r2.trainer import R2Trainer, R2TrainingArguments

    def args(name, r2_type):
        return R2TrainingArguments(
            output_dir=str(tmp_path / name),
            r2_type=r2_type,
            per_device_train_batch_size=8,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        )

    model = tiny_mobilebert()
    R2Trainer(model=model, args=args("r2", "linf"), train_dataset=_PairDataset()).train()
    palettize(model, DKMConfig(n_bits=2))
    before = {n: layer.weight.detach().clone() for n, layer in dkm_layers(model).items()}
    trainer = R2Trainer(model=model, args=args("dkm", "none"), train_dataset=_PairDataset())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(np.isfinite(losses))
    layers = dkm_layers(model)
    assert any(not torch.equal(layers[n].weight, w) for n, w in before.items())  # gradients reached the weights
    model.eval()
    ids = _PairDataset().ids[:4]
    expected = model(input_ids=ids).logits
    finalize(model)
    for name, module in palettized_modules(model).items():
        vectors = weight_to_vectors(module.weight.detach(), 1)
        assert torch.unique(vectors).numel() <= 4, name
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("backend", ["grid", "exact"])
def test_bfloat16_weights_train_and_finalize(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128)).to(torch.bfloat16)
    palettize(model, DKMConfig(n_bits=2, backend=backend, grid_size=256))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert model[0].weight.grad.dtype == torch.bfloat16 and model[0].weight.grad.abs().sum() > 0
    assert model[0].centroids.dtype == torch.float32
    finalize(model)
    assert model[0].weight.dtype == torch.bfloat16 and torch.unique(model[0].weight).numel() <= 4


@pytest.mark.parametrize("backend,cluster_dim", [("grid", 1), ("exact", 1), ("exact", 2)])
def test_dkm_trains_under_bfloat16_autocast_with_float32_clustering(backend, cluster_dim):
    """Issue 15.11: `--bf16` (CPU autocast) crashed at the first DKM step ("mat1 and mat2 must have the same dtype").
    The clustering must run in float32 inside autocast: its centroids equal those of a float32 step."""
    results = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
        palettize(model, DKMConfig(n_bits=2, cluster_dim=cluster_dim, backend=backend, grid_size=256))
        x = torch.randn(4, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            soft = model[0].soft_weight(update=False)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert soft.dtype == torch.float32  # the clustering itself never runs in half precision
        out.float().square().sum().backward()
        results.append((soft.detach(), model[0].centroids.clone(), model[0].weight.grad.clone(), out.detach()))
    (soft32, c32, g32, o32), (soft16, c16, g16, o16) = results
    torch.testing.assert_close(c16, c32, rtol=1e-6, atol=1e-7)  # float32 clustering in both runs
    torch.testing.assert_close(soft16, soft32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o16.float(), o32, rtol=0.05, atol=0.05)  # bf16 matmuls around it
    cosine = F.cosine_similarity(g16.reshape(-1), g32.reshape(-1), dim=0)
    assert cosine > 0.99, cosine


def test_dkm_benchmark_refuses_non_positive_steps_and_threads():
    # argparse refuses them before any worker starts (0 steps had no median; 0 threads failed in every worker).
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dkm.py"
    for flag, value in (("--steps", "0"), ("--threads", "-1")):
        proc = subprocess.run([sys.executable, str(script), flag, value], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"argument {flag}: must be an integer >= 1, got '{value}'" in proc.stderr


# ---- issue 15.5: transformers Conv1D (GPT-2) is palettized; nn.MultiheadAttention is refused, not skipped ----


@pytest.mark.parametrize("cluster_dim", [1, 2])
def test_conv1d_trains_and_finalizes_like_the_linear_with_the_transposed_weight(cluster_dim):
    """Conv1D stores its weight (in, out): vectors must run along its output channels, as for the same nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    from hf_r2.palettization import DKMConv1D

    torch.manual_seed(0)
    conv = Conv1D(8, 6)
    linear = nn.Linear(6, 8)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    conv_model, linear_model = nn.Sequential(conv), nn.Sequential(linear)
    config = DKMConfig(n_bits=2, cluster_dim=cluster_dim, backend="exact")
    for model in (conv_model, linear_model):
        palettize(model, config)
    assert isinstance(conv_model[0], DKMConv1D)
    torch.testing.assert_close(conv_model[0].centroids, linear_model[0].centroids, rtol=1e-6, atol=1e-8)
    x = torch.randn(3, 4, 6)
    conv_out, linear_out = conv_model(x), linear_model(x)  # training mode: soft-clustered weights
    torch.testing.assert_close(conv_out, linear_out, rtol=1e-5, atol=1e-6)
    conv_out.square().sum().backward()
    linear_out.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, linear.weight.grad.t(), rtol=1e-5, atol=1e-7)
    finalize(conv_model, compress=False)
    finalize(linear_model, compress=False)
    assert type(conv_model[0]) is Conv1D
    torch.testing.assert_close(conv_model[0].weight, linear_model[0].weight.t(), rtol=1e-6, atol=1e-8)
    vectors = weight_to_vectors(conv_model[0].weight.t(), cluster_dim)
    assert len(vectors.unique(dim=0)) <= 4  # at most 2**2 distinct output-channel vectors


def test_gpt2_palettizes_every_conv1d_and_round_trips(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    import hf_r2.palettization.quantizer  # noqa: F401  (registers the loader)
    from hf_r2.palettization import PalettizedConv1D

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            vocab_size=64,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            num_labels=2,
        )
    )
    palettize(model, DKMConfig(n_bits=2, cluster_dim=2, exclude_modules=["score"]))
    ids = torch.randint(1, 64, (2, 8))
    model.train()
    model(ids)
    model.eval()
    finalize(model)
    conv1d = [n for n, m in model.named_modules() if isinstance(m, PalettizedConv1D)]
    assert conv1d == [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
    assert [n for n, m in loaded.named_modules() if isinstance(m, PalettizedConv1D)] == conv1d
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_multihead_attention_is_refused_loudly():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    model.add_module("head", nn.Linear(8, 4))
    with pytest.raises(
        ValueError,
        match=r"cannot compress nn.MultiheadAttention \['attn'\].*exclude_modules="
        r"\['attn'\]",
    ):
        palettize(model, DKMConfig(n_bits=2))
    palettize(model, DKMConfig(n_bits=2, exclude_modules=["attn"]))
    assert list(dkm_layers(model)) == ["head"]


def test_finalize_refuses_diverged_centroids_and_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    palettize(model, DKMConfig(n_bits=2))
    with torch.no_grad():
        model[1].centroids[0] = float("nan")
    first = model[0].centroids.clone()
    with pytest.raises(ValueError, match="DKM layer '1' has non-finite centroids.*nothing was finalized"):
        finalize(model, compress=False)
    assert isinstance(model[0], DKMLinear) and torch.equal(model[0].centroids, first)  # layer 0 was not converted

"""Whole-model behaviour: layer swapping, finalize exactness, configs and their errors, Trainer integration."""

import math

import pytest
import torch
from torch import nn

from hf_r2.quantization import (
    EWGSConfig,
    EWGSDeltaCallback,
    LSQConfig,
    PACTConfig,
    PTQConfig,
    QuantConv2d,
    QuantizationConfig,
    QuantizedConv2d,
    QuantizedLinear,
    QuantLinear,
    calibrate,
    estimate_ewgs_deltas,
    finalize,
    get_quantization_config,
    quantize,
    quantizer_parameter_names,
)

# Tiny tensors: one thread (conftest.py) avoids oversubscription on the shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """Conv (first layer, signed input) -> ReLU -> Conv -> ReLU -> Linear (last layer); an Embedding on the side."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.emb = nn.Embedding(3, 4)

    def forward(self, x, labels=None):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        logits = self.fc(h.flatten(1))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


CONFIGS = [
    ("lsq_w2a2", LSQConfig(w_bits=2, a_bits=2)),
    ("lsq_w4", LSQConfig(w_bits=4)),
    ("ewgs_w2a2", EWGSConfig(w_bits=2, a_bits=2, delta=0.2)),
    ("pact_w2a2", PACTConfig(w_bits=2, a_bits=2, alpha_init=3.0)),
    ("pact_w1a1_plain", PACTConfig(w_bits=1, a_bits=1, dorefa_rescale=False)),
    ("ptq_w2a4_channel_sym", PTQConfig(w_bits=2, a_bits=4)),
    ("ptq_w3a3_tensor_asym", PTQConfig(w_bits=3, a_bits=3, per_channel=False, symmetric=False, a_symmetric=True)),
]


@pytest.mark.parametrize("config", [c for _, c in CONFIGS], ids=[n for n, _ in CONFIGS])
def test_quantize_train_then_finalize_is_exact(config):
    torch.manual_seed(0)
    model = TinyNet()
    params = {n: p for n, p in model.named_parameters()}
    quantize(model, config)
    # Every Linear/Conv2d, first and last included; parameters are the same objects under the same names.
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.conv2, QuantConv2d)
    assert isinstance(model.fc, QuantLinear) and isinstance(model.emb, nn.Embedding)
    assert (model.conv2.stride, model.conv2.padding, model.conv2.groups) == ((2, 2), (1, 1), 2)
    for name, p in params.items():
        assert model.get_parameter(name) is p
    x, y = _data()
    calibrate(model, [(x,)])
    if not isinstance(config, PTQConfig):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            model(x, y)["loss"].backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        fake = model(x)
    finalize(model)
    assert isinstance(model.conv1, QuantizedConv2d) and isinstance(model.fc, QuantizedLinear)
    with torch.no_grad():
        final = model(x)
    torch.testing.assert_close(final, fake, rtol=1e-5, atol=1e-6)
    sd = model.state_dict()
    for layer in ("conv1", "conv2", "fc"):
        # Issue 14's key convention: the codes are the 1-D `weight` entry (format 1: `weight_int` next to an empty
        # `weight` placeholder); either way no dense shape, so unaware loaders fail on it (checked below).
        codes = sd[f"{layer}.weight"]
        assert codes.dtype in (torch.int8, torch.uint8)
        assert codes.dim() == 1 and f"{layer}.weight_int" not in sd
        assert torch.unique(codes).numel() <= 2**config.w_bits
    # Integer codes must never load silently into a float model, nor float weights into a finalized one.
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        TinyNet().load_state_dict(sd, strict=False)
    with pytest.raises(RuntimeError, match="dense weight"):
        finalize(quantize(TinyNet(), config), rebuild_only=True).load_state_dict(TinyNet().state_dict(), strict=False)
    with pytest.raises(AttributeError, match="derived from weight_int"):
        model.fc.weight = nn.Parameter(torch.zeros(5, 128))
    # They reload into the same architecture quantized with the same config and finalized.
    reloaded = finalize(quantize(TinyNet(), config), rebuild_only=True).eval()
    reloaded.load_state_dict(sd, strict=True)
    for key, value in sd.items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), final, rtol=1e-5, atol=1e-6)


def test_exclude_and_target_modules():
    model = quantize(TinyNet(), LSQConfig(w_bits=3, exclude_modules=["fc"]))
    assert isinstance(model.conv1, QuantConv2d) and type(model.fc) is nn.Linear
    model = quantize(TinyNet(), PTQConfig(w_bits=4, target_modules=r"conv\d"))
    assert isinstance(model.conv2, QuantConv2d) and type(model.fc) is nn.Linear


def test_per_channel_ptq_at_8_bits_is_close_to_float():
    torch.manual_seed(0)
    model = TinyNet()
    x, _ = _data()
    ref = model(x)
    quantize(model, PTQConfig(w_bits=8, a_bits=8))
    calibrate(model, [x])
    torch.testing.assert_close(model(x), ref, atol=0.05, rtol=0.05)
    assert not torch.equal(model(x), ref)


def test_bad_bits_and_fields_raise_clear_errors():
    for bits in (0, 9, 2.5, "2", True):
        with pytest.raises(ValueError, match="w_bits must be an integer in 1..8"):
            LSQConfig(w_bits=bits)
    with pytest.raises(ValueError, match="a_bits must be an integer in 1..8, got 12"):
        PTQConfig(a_bits=12)
    with pytest.raises(ValueError, match="w_bits >= 2"):
        LSQConfig(w_bits=1)
    with pytest.raises(ValueError, match="delta must be a number >= 0"):
        EWGSConfig(delta=-1.0)
    with pytest.raises(ValueError, match="alpha_init must be > 0"):
        PACTConfig(alpha_init=0.0)
    with pytest.raises(ValueError, match="symmetric 1-bit"):
        PTQConfig(w_bits=1)


def test_get_quantization_config_by_name_and_unknown_method():
    config = get_quantization_config("LSQ", w_bits=2, a_bits=2)
    assert type(config) is LSQConfig and (config.w_bits, config.a_bits) == (2, 2)
    for name, cls in [("ewgs", EWGSConfig), ("pact", PACTConfig), ("ptq", PTQConfig)]:
        assert type(get_quantization_config(name)) is cls
    with pytest.raises(ValueError, match=r"Unknown quantization method 'apot'; choose one of \['ewgs', 'lsq'"):
        get_quantization_config("apot")
    with pytest.raises(ValueError, match=r"LSQConfig has no field\(s\) \['per_channel'\]"):
        get_quantization_config("lsq", per_channel=True)
    config = PTQConfig(w_bits=3, per_channel=False, exclude_modules=["fc"])
    assert QuantizationConfig.from_dict(config.to_dict()) == config


def test_unsupported_layer_named_explicitly_and_other_model_errors():
    with pytest.raises(ValueError, match="'emb' is a Embedding, which LSQConfig does not support"):
        quantize(TinyNet(), LSQConfig(target_modules=["fc", "emb"]))
    with pytest.raises(ValueError, match="match no module"):
        quantize(TinyNet(), LSQConfig(target_modules=["nope"]))
    model = quantize(TinyNet(), LSQConfig())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, LSQConfig())
    with pytest.raises(ValueError, match="no fake-quantized layer"):
        finalize(TinyNet())
    with pytest.raises(TypeError, match="QuantizationConfig"):
        quantize(TinyNet(), {"quant_method": "lsq"})
    model = quantize(TinyNet(), PTQConfig(a_bits=4))
    with pytest.raises(RuntimeError, match="calibrate"):
        model(_data()[0])
    with pytest.raises(ValueError, match="a_bits >= 2"):
        quantize(TinyNet(), LSQConfig(a_bits=1))(_data()[0])  # the first conv's input is signed


def test_quantizer_parameter_names():
    model = quantize(TinyNet(), LSQConfig(a_bits=4))
    assert quantizer_parameter_names(model) == [
        f"{layer}.{q}.step" for layer in ("conv1", "conv2", "fc") for q in ("weight_quantizer", "input_quantizer")
    ]
    assert quantizer_parameter_names(quantize(TinyNet(), PACTConfig(a_bits=4))) == [
        f"{layer}.input_quantizer.alpha" for layer in ("conv1", "conv2", "fc")
    ]


def test_quantized_layers_can_be_turned_back_to_float():
    model = quantize(TinyNet(), LSQConfig())
    plain = model.fc.to_float()
    assert type(plain) is nn.Linear and plain.weight is model.fc.weight


def _hutchinson_reference_delta(model, x, y, levels):
    """Exact Hessian trace w.r.t. the weight codes of a single EWGS Linear, via the full Hessian."""
    layer = model
    step = layer.weight_quantizer.step.detach().abs()
    with torch.no_grad():
        codes, _, _ = layer.weight_quantizer.encode(layer.weight)

    def loss_of_codes(c):
        return nn.functional.cross_entropy(nn.functional.linear(x, c * step, layer.bias), y)

    codes = codes.clone().requires_grad_(True)
    g = torch.autograd.grad(loss_of_codes(codes), codes)[0]
    hessian = torch.autograd.functional.hessian(loss_of_codes, codes.detach())
    n = codes.numel()
    trace = hessian.reshape(n, n).diagonal().sum().item()
    return levels * (trace / n) / (3 * g.std().item())


def test_ewgs_delta_from_hutchinson_matches_the_exact_hessian_trace():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    model = quantize(nn.Sequential(layer), EWGSConfig(w_bits=3))
    q_layer = model[0]
    expected = _hutchinson_reference_delta(q_layer, x, y, levels=4 + 3)
    gen = torch.Generator().manual_seed(0)
    deltas = estimate_ewgs_deltas(
        model, lambda: nn.functional.cross_entropy(model(x), y), num_samples=400, generator=gen
    )
    assert list(deltas) == ["0.weight_quantizer"]
    assert expected > 0 and math.isfinite(expected)
    assert deltas["0.weight_quantizer"] == pytest.approx(expected, rel=0.15)
    assert q_layer.weight_quantizer.ewgs_delta == deltas["0.weight_quantizer"]


def test_ewgs_delta_is_saved_and_restored_with_the_state_dict():
    # A resumed run must continue with the delta estimated before the checkpoint, not the config's starting value.
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    model = quantize(nn.Sequential(nn.Linear(6, 4)), EWGSConfig(w_bits=3, a_bits=4))
    deltas = estimate_ewgs_deltas(model, lambda: nn.functional.cross_entropy(model(x), y), num_samples=2)
    assert set(deltas) == {"0.weight_quantizer", "0.input_quantizer"}
    assert all(d != EWGSConfig.delta for d in deltas.values())
    resumed = quantize(nn.Sequential(nn.Linear(6, 4)), EWGSConfig(w_bits=3, a_bits=4))
    resumed.load_state_dict(model.state_dict())
    for name, delta in deltas.items():
        assert resumed.get_submodule(name).ewgs_delta == pytest.approx(delta, rel=1e-6)
    # Plain LSQ has no delta to save.
    lsq = quantize(nn.Sequential(nn.Linear(6, 4)), LSQConfig(w_bits=3))
    assert lsq[0].weight_quantizer.ewgs_delta is None
    assert not any("ewgs" in k for k in lsq.state_dict())


@pytest.mark.parametrize("config", [LSQConfig(w_bits=2, a_bits=2), PACTConfig(w_bits=2, a_bits=2)])
def test_r2trainer_does_not_decay_quantizer_parameters(tmp_path, config):
    # Step sizes and clipping levels are not weights: decay would pull them to 0 (PACT's alpha has its own L2).
    from hf_r2.trainer import R2Trainer, R2TrainingArguments

    model = quantize(TinyNet(), config)
    args = R2TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to=[], use_cpu=True)
    trainer = R2Trainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    own = quantizer_parameter_names(model)
    params = dict(model.named_parameters())
    assert own and not any(id(params[n]) in decayed for n in own)
    # The weights themselves are still decayed.
    assert any(id(p) in decayed for n, p in params.items() if n.endswith("weight"))


class _Digits(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.x, self.y = _data(n, seed=1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_training_through_r2trainer_updates_quantizer_parameters(tmp_path):
    from hf_r2.trainer import R2Trainer, R2TrainingArguments

    torch.manual_seed(0)
    model = quantize(TinyNet(), EWGSConfig(w_bits=2, a_bits=2))
    calibrate(model, [_data(8)[0]])
    steps_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("step")}
    callback = EWGSDeltaCallback(every_n_steps=2, num_samples=2)
    args = R2TrainingArguments(
        output_dir=str(tmp_path),
        r2_type="none",
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = R2Trainer(model=model, args=args, train_dataset=_Digits(), callbacks=[callback])
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    changed = [n for n, p in model.named_parameters() if n.endswith("step") and not torch.equal(p, steps_before[n])]
    assert len(changed) == len(steps_before) == 6
    assert all(p.item() > 0 for n, p in model.named_parameters() if n.endswith("step"))
    assert len(callback.history) == 2 and all(math.isfinite(d) and d >= 0 for d in callback.history[0].values())


def test_transformers_model_keeps_its_keys_and_finalizes_exactly():
    from helpers import tiny_bert

    model = tiny_bert(0, vocab_size=50, max_position_embeddings=16, num_labels=3)
    keys = set(model.state_dict())
    quantize(model, get_quantization_config("lsq", w_bits=4, a_bits=8))
    linear_names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert "classifier" in linear_names and "bert.encoder.layer.0.attention.self.query" in linear_names
    assert keys <= set(model.state_dict())
    batch = {"input_ids": torch.randint(0, 50, (4, 10)), "labels": torch.tensor([0, 1, 2, 0])}
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.classifier.weight_quantizer.step.grad is not None
    model.eval()
    with torch.no_grad():
        fake = model(**batch).logits
        final = finalize(model)(**batch).logits
    torch.testing.assert_close(final, fake, rtol=1e-5, atol=1e-6)

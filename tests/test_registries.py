"""A regularizer or a quantization method added in one place (its registration) reaches every entry point.

The toy regularizer and the toy quantization method below are registered here, in the test, and nowhere else: the
flags (`--r2_type`, `--quant_method`), `R2Config`, `RangeRegularizer`, `R2Trainer` (training, logging, checkpoint of
its learnable parameter) and the model card then take them, as `docs/adding-a-method.md` promises.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_parity import TokenDataset, tiny_bert
from transformers import HfArgumentParser

from hf_r2 import hub
from hf_r2 import regularizers as R
from hf_r2.arguments import CompressionArguments
from hf_r2.range_regularizer import R2Config, RangeRegularizer
from hf_r2.regularizer_registry import (
    LearnableParameter,
    RegularizerSpec,
    get_regularizer,
    register_regularizer,
    regularizer_names,
    unregister_regularizer,
)
from hf_r2.trainer import R2_STATE_NAME, R2Trainer, R2TrainingArguments

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = "toy_squared_margin"
TOY_LR = 0.05
TOY_FLOOR = 1.5


def squared_margin(weight, margin, cluster_dim=1, scale=None):
    """Toy regularizer: `|m| σ + Σ max(|w| - |m| σ, 0)²` per coordinate (a squared hinge around a learnable margin)."""
    vectors = R.weight_coordinates(weight, cluster_dim)
    unit = torch.ones(cluster_dim) if scale is None else torch.as_tensor(scale).float()
    m = margin.float().abs() * unit
    return (m + torch.relu(vectors.abs() - m).pow(2).sum(dim=0)).sum()


def reference_loss(weight: torch.Tensor, margin: float) -> float:
    """The toy loss of one scalar-clustered layer, written out in float64 without hf_r2."""
    w = weight.detach().double().flatten()
    sigma = w.std(correction=0)
    m = abs(margin) * sigma
    return float(m + ((w.abs() - m).clamp_min(0) ** 2).sum())


@pytest.fixture
def toy_regularizer():
    spec = register_regularizer(
        RegularizerSpec(
            name=TOY,
            loss=squared_margin,
            description="toy squared hinge around a learnable margin",
            parameter=LearnableParameter(
                name="toy_margins",
                init=lambda weights, config: torch.full((len(weights), config.cluster_dim), config.margin_init_std),
                learning_rate=TOY_LR,
                floor=lambda config: TOY_FLOOR,
            ),
            options=("margin_init_std", "scale_free"),
        )
    )
    yield spec
    unregister_regularizer(TOY)


def test_a_registered_regularizer_trains_through_r2trainer(toy_regularizer, tmp_path):
    parser = HfArgumentParser(R2TrainingArguments)
    assert f"{TOY}" in parser.format_help()  # listed among the --r2_type choices
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--r2_type", TOY, "--r2_weight", "0.1", "--r2_margin_init_std", "2.0",
            "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3", "--save_strategy", "steps",
            "--save_steps", "3", "--report_to", "none", "--use_cpu", "--per_device_train_batch_size", "8",
        ]
    )  # fmt: skip
    model = tiny_bert(0)
    initial = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)
    }
    trainer = R2Trainer(model=model, args=args, train_dataset=TokenDataset())
    reg = trainer.r2_regularizer
    assert reg.config.learning_rate == TOY_LR  # the spec's default learning rate
    assert reg.toy_margins.shape == (len(reg.layer_names), 1) and torch.all(reg.toy_margins == 2.0)
    assert set(reg.layer_names) == set(initial)

    trainer.train()

    # The first logged range loss is the toy loss of the initial weights, computed independently.
    first = next(e for e in trainer.state.log_history if "r2_loss" in e)
    expected = sum(reference_loss(initial[name], 2.0) for name in reg.layer_names)
    assert first["r2_loss"] == pytest.approx(expected, rel=1e-4)
    # The margins took 3 steps of their own Adam (about lr each), and the floor held them at 1.5 or above.
    moved = (reg.toy_margins.detach() - 2.0).abs()
    assert torch.all(moved <= 3 * TOY_LR + 1e-6) and moved.max() > 0.5 * TOY_LR
    assert torch.all(reg.toy_margins >= TOY_FLOOR)
    # The current range loss still equals the reference at the trained weights and margins.
    modules = dict(model.named_modules())
    now = sum(
        reference_loss(modules[name].weight, float(reg.toy_margins.detach()[i, 0]))
        for i, name in enumerate(reg.layer_names)
    )
    assert float(reg().detach()) == pytest.approx(now, rel=1e-4)
    # The margins and their Adam state are checkpointed under the registered name.
    saved = load_file(str(tmp_path / "checkpoint-3" / R2_STATE_NAME))
    assert set(saved) == {"toy_margins", "toy_margins_exp_avg", "toy_margins_exp_avg_sq", "param_steps"}
    torch.testing.assert_close(saved["toy_margins"], reg.toy_margins.detach())
    # The model card lists the options the toy reads, not the other regularizers' options.
    info = hub.r2_info_from_args(args)
    assert info["r2_type"] == TOY and info["r2_margin_init_std"] == 2.0 and info["r2_learning_rate"] == TOY_LR
    assert "r2_alpha_init" not in info


def test_unknown_types_raise_naming_the_registered_ones(toy_regularizer):
    allowed = rf"allowed: \['linf', 'margin', 'soft_min_max', '{TOY}'\]"
    with pytest.raises(ValueError, match=rf"Unknown r2_type 'l3'; {allowed}"):
        R2Config(r2_type="l3")
    with pytest.raises(ValueError, match=rf"Unknown r2_type 'l3'; {allowed}"):
        get_regularizer("l3")
    with pytest.raises(ValueError, match=r"Unknown r2_type 'l3'; allowed: \['none', 'linf'"):
        R2TrainingArguments(output_dir="unused", r2_type="l3")
    # A config whose type is changed afterwards used to fall through to the soft-min-max kernel (layer_losses) or
    # fail on a missing attribute; the regularizer now looks its type up and refuses it.
    config = R2Config(r2_type="linf")
    config.r2_type = "l3"
    with pytest.raises(ValueError, match=rf"Unknown r2_type 'l3'; {allowed}"):
        RangeRegularizer(tiny_bert(0), config)
    with pytest.raises(ValueError, match="already registered"):
        register_regularizer(dataclasses.replace(toy_regularizer))
    with pytest.raises(ValueError, match="other than 'none'"):
        register_regularizer(dataclasses.replace(toy_regularizer, name="none"))


def test_registering_and_unregistering_leaves_the_builtins():
    assert regularizer_names() == ["linf", "margin", "soft_min_max"]
    assert set(R.REGULARIZERS) == set(R.R2_TYPES) == {"linf", "margin", "soft_min_max"}


@pytest.mark.parametrize("r2_type", ["linf", "margin", "soft_min_max"])
def test_a_spec_without_kernel_loops_its_pure_function_like_the_fused_kernel(r2_type):
    """The fall-back path of a new regularizer (no fused kernel) gives the built-ins' values and gradients."""
    looped_name = f"looped_{r2_type}"
    register_regularizer(dataclasses.replace(get_regularizer(r2_type), name=looped_name, fused=None))
    try:
        model = tiny_bert(0)
        losses, grads = {}, {}
        for name in (r2_type, looped_name):
            reg = RangeRegularizer(model, R2Config(r2_type=name, cluster_dim=2))
            model.zero_grad()
            total = reg()
            total.backward()
            losses[name] = reg.per_layer_losses()
            grads[name] = [p.grad.to_dense().clone() for p in model.parameters() if p.grad is not None]
            own = reg._own_parameter()
            grads[name].append(own.grad.clone() if own is not None else torch.zeros(()))
            reg.remove_hooks()
        assert losses[r2_type].keys() == losses[looped_name].keys()
        for layer, value in losses[r2_type].items():
            assert losses[looped_name][layer] == pytest.approx(value, rel=1e-5, abs=1e-6)
        for fused, looped in zip(grads[r2_type], grads[looped_name], strict=True):
            # Different float32 formulas (the kernel's unshifted exponentials): agreement to rounding, not bit for bit.
            torch.testing.assert_close(looped, fused, rtol=1e-3, atol=1e-5)
    finally:
        unregister_regularizer(looped_name)


def test_a_registered_quantization_method_is_a_flag_choice():
    from hf_r2.quantization import QuantLinear, quantization_methods, register_quantize_handler
    from hf_r2.quantization.config import QUANTIZATION_CONFIGS, QuantizationConfig, register_quantization_method
    from hf_r2.quantization.model import _HANDLERS
    from hf_r2.quantization.quantizers import RTNWeightQuantizer

    @register_quantization_method("toy_rtn_qat")
    @dataclasses.dataclass
    class ToyConfig(QuantizationConfig):
        pass

    register_quantize_handler(ToyConfig)(lambda module, config: (RTNWeightQuantizer(config.w_bits), None))
    try:
        assert "toy_rtn_qat" in quantization_methods(quantization_aware=True)
        parser = HfArgumentParser(CompressionArguments)
        assert "toy_rtn_qat" in parser.format_help()
        (compression,) = parser.parse_args_into_dataclasses(["--quant_method", "toy_rtn_qat", "--w_bits", "3"])
        assert isinstance(compression.quantization_config(), ToyConfig) and compression.trains_compressed
        assert compression.trainer_callbacks() == []
        model = compression.apply(nn.Sequential(nn.Linear(4, 4)))
        assert isinstance(model[0], QuantLinear)
    finally:
        QUANTIZATION_CONFIGS.pop("toy_rtn_qat")
        _HANDLERS.pop(ToyConfig)
    with pytest.raises(ValueError, match=r"--quant_method 'toy_rtn_qat' is not one of \['none', 'lsq', 'ewgs'"):
        CompressionArguments(quant_method="toy_rtn_qat")

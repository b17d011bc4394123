"""Which weights `RangeRegularizer` counts: tied weights once, frozen weights never, `nn.MultiheadAttention`'s packed
projection too; and the engines R2Trainer refuses instead of training silently wrong."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import helpers
import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel, Trainer

from hf_r2 import R2Trainer, R2TrainingArguments
from hf_r2 import regularizers as R
from hf_r2.analysis import weight_ranges
from hf_r2.range_regularizer import R2Config, RangeRegularizer


def tiny_gpt2_lm() -> GPT2LMHeadModel:
    return helpers.tiny_gpt2_lm(0, vocab_size=40, n_embd=8, tie_word_embeddings=True)


@pytest.mark.parametrize("r2_type", ["linf", "margin", "soft_min_max"])
def test_tied_weights_are_regularized_once(r2_type, caplog):
    model = tiny_gpt2_lm()
    assert model.lm_head.weight is model.transformer.wte.weight
    with caplog.at_level(logging.INFO, logger="hf_r2.range_regularizer"):
        reg = RangeRegularizer(model, R2Config(r2_type=r2_type))
    assert "transformer.wte" in reg.layer_names and "lm_head" not in reg.layer_names
    assert "tied" in caplog.text and "lm_head" in caplog.text
    param = {"linf": None, "margin": getattr(reg, "margins", None), "soft_min_max": getattr(reg, "alphas", None)}
    assert param[r2_type] is None or param[r2_type].shape[0] == len(reg.layer_names)

    # The total is the sum over distinct storages: the shared embedding counted once.
    losses = reg.per_layer_losses()
    wte = model.transformer.wte.weight.detach().double()
    row = reg.layer_names.index("transformer.wte")
    unit = R.coordinate_std(wte)  # the default, scale-free parametrization
    value = {
        "linf": lambda: R.linf(wte),
        "margin": lambda: R.margin(wte, reg.margins[row].detach().double(), scale=unit),
        "soft_min_max": lambda: R.soft_min_max(wte, reg.alphas[row].detach().double(), scale=unit),
    }[r2_type]()
    assert losses["transformer.wte"] == pytest.approx(value.item(), rel=1e-5)


def test_frozen_weights_are_skipped_and_reported(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="hf_r2.range_regularizer"):
        reg = RangeRegularizer(model, R2Config(r2_type="linf"))
    assert reg.layer_names == ["2"]
    assert "1 frozen layer(s) skipped" in caplog.text and ": 0." in caplog.text
    assert reg().item() == pytest.approx(model[2].weight.detach().abs().max().item())

    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="all 2 selected layers are frozen"):
        RangeRegularizer(model, R2Config(r2_type="margin"))


class WithAttention(nn.Module):
    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("r2_type", ["linf", "margin", "soft_min_max"])
def test_multihead_attention_in_proj_weight_is_regularized(r2_type):
    torch.manual_seed(0)
    model = WithAttention()
    with torch.no_grad():
        model.attn.in_proj_weight[0, 0] = 3.0  # an outlier outside the margin: every type has a gradient on it
    reg = RangeRegularizer(model, R2Config(r2_type=r2_type))
    assert reg.layer_names == ["attn", "attn.out_proj", "head"]
    in_proj = model.attn.in_proj_weight
    row = 0
    w, unit = in_proj.detach(), R.coordinate_std(in_proj)  # the default, scale-free parametrization
    expected = {
        "linf": lambda: R.linf(w),
        "margin": lambda: R.margin(w, reg.margins[row].detach(), scale=unit),
        "soft_min_max": lambda: R.soft_min_max(w, reg.alphas[row].detach(), scale=unit),
    }[r2_type]()
    assert reg.per_layer_losses()["attn"] == pytest.approx(expected.item(), rel=1e-5)
    reg().backward()
    assert in_proj.grad is not None and in_proj.grad[0, 0] > 0
    # The weight-range table measures the same tensor.
    stats = weight_ranges(model)
    assert stats["attn"].range == pytest.approx((in_proj.max() - in_proj.min()).item(), rel=1e-6)


def test_multihead_attention_with_separate_projections_is_refused_by_name():
    with pytest.raises(ValueError, match="'attn' is an nn.MultiheadAttention .* separate q/k/v projection weights"):
        RangeRegularizer(WithAttention(kdim=4), R2Config(r2_type="linf"))
    reg = RangeRegularizer(WithAttention(kdim=4), R2Config(r2_type="linf", exclude_modules="attn"))
    assert reg.layer_names == ["attn.out_proj", "head"]


@pytest.mark.parametrize("alpha", [0.0, -5.0])
def test_non_positive_alpha_is_refused(alpha, tmp_path):
    with pytest.raises(ValueError, match="alpha_init must be a finite number > 0"):
        R2Config(r2_type="soft_min_max", alpha_init=alpha)
    with pytest.raises(ValueError, match="r2_alpha_init must be a finite number > 0"):
        R2TrainingArguments(output_dir=str(tmp_path), r2_type="soft_min_max", r2_alpha_init=alpha)


def _pretend_engine(monkeypatch, engine: str, **plugin_fields) -> None:
    """Makes every Trainer built afterwards believe Accelerate runs `engine` ("DeepSpeed", "FSDP1", "FSDP2")."""
    original = Trainer.create_accelerator_and_postprocess

    def pretend_sharded(self):
        original(self)
        if engine == "DeepSpeed":
            self.is_deepspeed_enabled = True
        else:
            self.is_fsdp_enabled = True
            # AcceleratorState keeps its attributes in one shared dict: patch the key, so teardown removes it.
            plugin = SimpleNamespace(fsdp_version=int(engine[-1]), **plugin_fields)
            monkeypatch.setitem(self.accelerator.state.__dict__, "fsdp_plugin", plugin)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", pretend_sharded)


@pytest.mark.parametrize(
    "engine,plugin_fields,refusal",
    [
        ("DeepSpeed", {}, "not supported under DeepSpeed"),
        ("FSDP1", {"use_orig_params": False}, "not supported under FSDP1 with use_orig_params=False"),
        (
            "FSDP1",
            {"use_orig_params": True, "sharding_strategy": SimpleNamespace(name="HYBRID_SHARD")},
            "not supported under FSDP1 with sharding_strategy=HYBRID_SHARD",
        ),
    ],
)
def test_sharding_engines_r2_cannot_read_are_refused_before_training(
    engine, plugin_fields, refusal, tmp_path, monkeypatch
):
    _pretend_engine(monkeypatch, engine, **plugin_fields)
    args = R2TrainingArguments(output_dir=str(tmp_path), r2_type="linf", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=refusal):
        R2Trainer(model=nn.Sequential(nn.Linear(4, 2)), args=args)
    # Without R² the same engine is the Trainer's business.
    plain = R2TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert R2Trainer(model=nn.Sequential(nn.Linear(4, 2)), args=plain).r2_regularizer is None


@pytest.mark.parametrize(
    "engine,plugin_fields",
    [("FSDP2", {}), ("FSDP1", {"use_orig_params": True, "sharding_strategy": SimpleNamespace(name="FULL_SHARD")})],
)
def test_sharding_engines_r2_gathers_are_accepted(engine, plugin_fields, tmp_path, monkeypatch):
    """FSDP2 and FSDP1 (use_orig_params) weights are gathered by the regularizer (parity: tests/test_distributed.py).
    FSDP1 with accumulation synchronizes every micro-batch (its `no_sync` holds whole gradients on 1-D pieces);
    the decoupled mode, which moves weights in place, is refused under either."""
    _pretend_engine(monkeypatch, engine, **plugin_fields)
    args = R2TrainingArguments(
        output_dir=str(tmp_path), r2_type="linf", use_cpu=True, report_to=[], gradient_accumulation_steps=2
    )
    trainer = R2Trainer(model=nn.Sequential(nn.Linear(4, 2)), args=args)
    assert trainer.r2_regularizer is not None
    kwargs = trainer.accelerator.gradient_state.plugin_kwargs
    monkeypatch.setitem(kwargs, "sync_each_batch", False)  # shared state: restored after the test
    trainer.callback_handler.on_train_begin(args, trainer.state, trainer.control)
    assert kwargs["sync_each_batch"] is (engine == "FSDP1")
    trainer.callback_handler.on_train_end(args, trainer.state, trainer.control)
    assert kwargs["sync_each_batch"] is False  # shared by every Trainer of the process: restored after training

    decoupled = R2TrainingArguments(
        output_dir=str(tmp_path), r2_type="linf", r2_mode="decoupled", r2_weight=0.01, use_cpu=True, report_to=[]
    )
    with pytest.raises(ValueError, match="r2_mode='decoupled' is not supported under FSDP"):
        R2Trainer(model=nn.Sequential(nn.Linear(4, 2)), args=decoupled)


def test_fsdp_requested_but_not_applied_is_said_loudly(tmp_path, caplog, monkeypatch):
    """Accelerate applies FSDP on accelerators only: on CPU it silently trains with DDP / one process instead.
    (`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP; the 2-process run with `--fsdp` is in
    tests/test_distributed.py.)"""
    args = R2TrainingArguments(output_dir=str(tmp_path), r2_type="linf", use_cpu=True, report_to=[])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with caplog.at_level(logging.WARNING):
        trainer = R2Trainer(model=nn.Sequential(nn.Linear(4, 2)), args=args)
    assert not trainer.is_fsdp_enabled
    assert "FSDP was requested (--fsdp / ACCELERATE_USE_FSDP) but is NOT applied" in caplog.text
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        R2Trainer(
            model=nn.Sequential(nn.Linear(4, 2)), args=R2TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
        )
    assert "NOT applied" not in caplog.text


def test_logging_finds_layers_under_fsdp1_wrapper_names():
    """FSDP1 wraps submodules in place (`a.b` -> `_fsdp_wrapped_module.a._fsdp_wrapped_module.b`): max_weight_range
    logging looks layers up under their unwrapped names and gets the wrapped module, not its wrapper."""
    from hf_r2.trainer import _modules_by_unwrapped_name

    class Wrapper(nn.Module):  # stands for FullyShardedDataParallel
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = module

    inner = nn.Linear(3, 2)
    model = Wrapper(nn.Sequential(nn.Linear(2, 3), Wrapper(inner)))
    modules = _modules_by_unwrapped_name(model)
    assert modules["1"] is inner and isinstance(modules["0"], nn.Linear)
    assert not any("_fsdp_wrapped_module" in name for name in modules)

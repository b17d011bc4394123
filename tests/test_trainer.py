"""Tests of `R2TrainingArguments` and `R2Trainer` on a tiny BERT (see `tests/scripts/train_parity.py`)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_parity import GLOBAL_BATCH, TokenDataset, make_args, run, snapshot, tiny_bert, train_logs
from transformers import BertForSequenceClassification, HfArgumentParser, Trainer

from hf_r2.analysis import weight_ranges
from hf_r2.range_regularizer import R2Config, RangeRegularizer
from hf_r2.trainer import R2_STATE_NAME, R2Trainer, R2TrainingArguments

R2_TYPES = ["linf", "margin", "soft_min_max"]
LOG_KEYS = ["loss", "r2_loss", "task_loss", "max_weight_range"]


# Tiny tensors: one thread (conftest.py) avoids oversubscription on the shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_logs_equal(a: list[dict], b: list[dict], keys=LOG_KEYS, rtol=1e-5):
    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        for key in keys:
            assert key in x and key in y, f"step {step}: {key} not logged"
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=1e-7), f"step {step}: {key} {x[key]} != {y[key]}"


def assert_tensors_close(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


# ---- arguments ----


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r2_type": "l2"}, "'l2'"),
        ({"r2_weight": -0.1}, "-0.1"),
        ({"r2_weight": float("nan")}, "nan"),
        ({"r2_weight": float("inf")}, "inf"),
        ({"r2_cluster_dim": 0}, "r2_cluster_dim must be an integer >= 1, got 0"),
        ({"r2_margin_init_std": 0.0}, "r2_margin_init_std"),
        ({"r2_alpha_init": float("nan")}, "r2_alpha_init"),
        ({"r2_learning_rate": -1.0}, "r2_learning_rate"),
        ({"r2_mode": "proximal"}, "Unknown r2_mode 'proximal'; allowed: .'loss', 'decoupled'."),
        ({"r2_mode": "decoupled", "r2_weight": 2.0}, "must be in .0, 1., got 2.0"),
        ({"r2_target_modules": ["(unclosed"]}, "not a valid regular expression"),
    ],
)
def test_bad_arguments_name_the_value(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        R2TrainingArguments(output_dir=str(tmp_path), **kwargs)
    if "r2_type" in kwargs:
        assert "allowed" in str(err.value) and "soft_min_max" in str(err.value)


def test_arguments_parse_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(R2TrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path),
            "--r2_type", "soft_min_max",
            "--r2_weight", "0.02",
            "--r2_cluster_dim", "2",
            "--r2_target_modules", "query", "value",
            "--r2_exclude_modules", ".*embeddings.*",
            "--r2_learning_rate", "0.1",
        ]
    )  # fmt: skip
    assert args.r2_type == "soft_min_max" and args.r2_weight == 0.02 and args.r2_cluster_dim == 2
    assert args.r2_target_modules == ["query", "value"]  # names stay a list
    assert args.r2_exclude_modules == ".*embeddings.*"  # a single entry with regex syntax becomes a regex
    assert args.resolved_r2_learning_rate() == 0.1
    assert args.r2_mode == "loss" and args.r2_scale_free is True and args.r2_alpha_init == 4.0  # the defaults
    (decoupled,) = HfArgumentParser(R2TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--r2_type", "linf", "--r2_mode", "decoupled", "--r2_scale_free", "False"]
    )
    assert decoupled.r2_mode == "decoupled" and decoupled.r2_scale_free is False and decoupled.r2_alpha_init == 0.1
    # DDP default that the range term needs (see TRAINER_NOTES item 2), only when R² is on.
    assert args.ddp_find_unused_parameters is False
    assert R2TrainingArguments(output_dir=str(tmp_path)).ddp_find_unused_parameters is None
    with pytest.raises(SystemExit):  # argparse choices from the Literal
        HfArgumentParser(R2TrainingArguments).parse_args_into_dataclasses(["--output_dir", "x", "--r2_type", "l1"])

    config = args.to_r2_config()
    assert (config.r2_type, config.cluster_dim, config.target_modules) == ("soft_min_max", 2, ["query", "value"])
    with pytest.raises(ValueError, match="r2_type='none'"):
        R2TrainingArguments(output_dir=str(tmp_path)).to_r2_config()


def test_default_regularizer_learning_rates(tmp_path):
    def lr(**kw):
        return R2TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-5, **kw).resolved_r2_learning_rate()

    # One default for both, independent of the model's learning rate: the parameters have their own Adam.
    assert lr(r2_type="soft_min_max") == 1e-2
    assert lr(r2_type="margin") == 1e-2
    assert lr(r2_type="margin", r2_learning_rate=0.5) == 0.5


def test_no_targeted_layer_is_a_clear_error(tmp_path):
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=1, r2_type="linf", r2_target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match="no_such_layer"):
        R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())


def test_given_regularizer_must_agree_with_args(tmp_path):
    model = tiny_bert()
    reg = RangeRegularizer(model, R2Config(r2_type="margin"))
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=1, r2_type="linf")
    with pytest.raises(ValueError, match="'linf'.*'margin'"):
        R2Trainer(model=model, args=args, r2_regularizer=reg)
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=1, r2_type="none")
    trainer = R2Trainer(model=model, args=args, r2_regularizer=reg, train_dataset=TokenDataset())
    assert trainer.r2_regularizer is reg


# ---- loss ----


def test_range_term_only_in_training_and_return_outputs_honoured(tmp_path):
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=1, r2_type="margin", r2_weight=0.3)
    model = tiny_bert()
    trainer = R2Trainer(model=model, args=args, train_dataset=TokenDataset())
    batch = {
        k: torch.stack([TokenDataset()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")
    }

    model.eval()
    with torch.no_grad():
        task = model(**batch).loss
        range_loss = trainer.r2_regularizer()
        eval_loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert torch.equal(eval_loss, task)  # prediction_step path: task loss alone
    assert outputs.logits.shape == (4, 2)

    model.train()
    train_loss = trainer.compute_loss(model, dict(batch))
    assert train_loss.item() == pytest.approx(task.item() + 0.3 * range_loss.item(), rel=1e-6)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert loss.item() == pytest.approx(train_loss.item(), rel=1e-6) and outputs.logits.shape == (4, 2)
    # The range term is differentiable with respect to the regularizer's own parameters.
    loss.backward()
    assert trainer.r2_regularizer.margins.grad is not None and trainer.r2_regularizer.margins.grad.abs().sum() > 0


def test_gradient_accumulation_parity(tmp_path):
    one = run(str(tmp_path / "ga1"), per_device=GLOBAL_BATCH, ga=1, steps=3, r2_type="soft_min_max")
    two = run(str(tmp_path / "ga2"), per_device=GLOBAL_BATCH // 2, ga=2, steps=3, r2_type="soft_min_max")
    four = run(str(tmp_path / "ga4"), per_device=GLOBAL_BATCH // 4, ga=4, steps=3, r2_type="soft_min_max")
    for other in (two, four):
        assert_logs_equal(one["logs"], other["logs"])
        assert_tensors_close(one["weights"], other["weights"])
        assert_tensors_close(one["r2_state"], other["r2_state"])
    assert one["logs"][0]["r2_loss"] > 0
    # The regularizer's parameters were trained, not frozen.
    assert not torch.equal(one["r2_state"]["alphas"], torch.full_like(one["r2_state"]["alphas"], 0.1))


def test_stock_trainer_loss_scale_changes_with_accumulation_and_r2_trainer_does_not(tmp_path):
    """Control for the parity tests: the configuration they use does exhibit the transformers 5.x scale bug."""

    def first_loss(trainer_cls, ga):
        args = make_args(
            str(tmp_path / f"{trainer_cls.__name__}{ga}"), per_device=8 // ga, ga=ga, steps=1, r2_type="none"
        )
        trainer = trainer_cls(model=tiny_bert(), args=args, train_dataset=TokenDataset())
        trainer.train()
        return train_logs(trainer)[0]["loss"]

    assert first_loss(R2Trainer, 2) == pytest.approx(first_loss(R2Trainer, 1), rel=1e-5)
    stock_ga1, stock_ga2 = first_loss(Trainer, 1), first_loss(Trainer, 2)
    if stock_ga2 == pytest.approx(stock_ga1, rel=1e-5):
        pytest.skip("this transformers version fixed the loss scale: the control no longer shows the bug")
    assert stock_ga2 == pytest.approx(2 * stock_ga1, rel=1e-4)  # transformers 5.x: not divided by the GA steps


def test_logged_r2_loss_is_the_mean_over_micro_batches(tmp_path):
    args = make_args(
        str(tmp_path), per_device=4, ga=2, steps=4, r2_type="linf", r2_weight=0.5, logging_steps=2, learning_rate=5e-3
    )
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    seen: list[float] = []
    trainer.r2_regularizer.register_forward_hook(lambda module, inputs, output: seen.append(output.item()))
    trainer.train()
    logs = train_logs(trainer)
    assert len(seen) == 8 and len(logs) == 2  # 4 steps x 2 micro-batches, logged every 2 steps
    for i, entry in enumerate(logs):
        expected = sum(seen[4 * i : 4 * i + 4]) / 4
        assert entry["r2_loss"] == pytest.approx(expected, rel=1e-6)
        assert entry["task_loss"] == pytest.approx(entry["loss"] - 0.5 * entry["r2_loss"], rel=1e-6)
    assert seen[0] != seen[-1]  # the weights moved, so the average really mixes different values
    # max_weight_range is the largest (max - min) over the regularized layers, at the logging step.
    ranges = weight_ranges(trainer.model)
    assert logs[-1]["max_weight_range"] == pytest.approx(max(s.range for s in ranges.values()), rel=1e-6)


def test_evaluation_loss_has_no_range_term(tmp_path):
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=1, r2_type="linf", r2_weight=1.0)
    model = tiny_bert()
    trainer = R2Trainer(model=model, args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset())
    metrics = trainer.evaluate()
    batch = {
        k: torch.stack([TokenDataset()[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")
    }
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert trainer._r2_count == 0  # evaluation did not feed the training-loss average


def test_r2_none_is_a_plain_trainer_with_the_scale_fix(tmp_path):
    a = run(str(tmp_path / "a"), per_device=8, ga=1, steps=2, r2_type="none")
    b = run(str(tmp_path / "b"), per_device=4, ga=2, steps=2, r2_type="none")
    assert_logs_equal(a["logs"], b["logs"], keys=["loss", "max_weight_range"])
    assert "r2_loss" not in a["logs"][0] and a["r2_state"] == {}


# ---- optimizer, checkpoints, saving ----


def test_regularizer_parameters_are_stepped_by_their_own_adam(tmp_path):
    """Not in the model's optimizer (whose SGD at lr 0.1 sent margins above every weight in one step): one Adam step
    of the regularizer per optimizer step, at `r2_learning_rate`, then their gradients are cleared."""
    args = make_args(
        str(tmp_path), per_device=8, ga=1, steps=2, r2_type="margin", r2_learning_rate=0.03, weight_decay=0.1
    )
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    margins = trainer.r2_regularizer.margins
    start = margins.detach().clone()
    optimizer = trainer.create_optimizer()
    assert all(p is not margins for g in optimizer.param_groups for p in g["params"])
    trainer.train()
    reg = trainer.r2_regularizer
    assert reg.param_steps.item() == 2 and margins.grad is None
    # Adam moves an entry by exactly lr on its first step (bias-corrected m / sqrt(v) = sign(g)), by about lr after.
    moved = (margins.detach() - start).abs().max().item()
    assert 0.03 - 1e-6 <= moved <= 0.061


@pytest.mark.parametrize("r2_type", ["margin", "soft_min_max"])
def test_resume_continues_exactly(tmp_path, r2_type):
    # The margin learning rate is raised so that the margins visibly move between the checkpoint and the end.
    overrides = dict(save_strategy="steps", save_steps=3, r2_learning_rate=0.02)
    full = run(str(tmp_path / "full"), per_device=8, ga=1, steps=6, r2_type=r2_type, **overrides)

    checkpoint = tmp_path / "full" / "checkpoint-3"
    state = load_file(str(checkpoint / R2_STATE_NAME))
    assert set(state) == set(full["r2_state"])
    assert not torch.equal(state[next(iter(state))], full["r2_state"][next(iter(state))])  # mid-training values
    # The model checkpoint holds only the model's own keys.
    assert set(load_file(str(checkpoint / "model.safetensors"))) <= set(full["weights"])

    args = make_args(str(tmp_path / "resumed"), per_device=8, ga=1, steps=6, r2_type=r2_type, **overrides)
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed = snapshot(trainer)
    assert_tensors_close(full["weights"], resumed["weights"], atol=1e-7)
    assert_tensors_close(full["r2_state"], resumed["r2_state"], atol=1e-7)
    # The history up to step 3 comes from the checkpoint; steps 4-6 were logged by the resumed run.
    assert [e["step"] for e in resumed["logs"]] == [1, 2, 3, 4, 5, 6]
    assert_logs_equal(full["logs"], resumed["logs"], rtol=1e-6)


def test_resume_refuses_a_checkpoint_without_regularizer_state(tmp_path):
    run(str(tmp_path / "plain"), per_device=8, ga=1, steps=2, r2_type="linf", save_strategy="steps", save_steps=1)
    checkpoint = tmp_path / "plain" / "checkpoint-1"
    assert not (checkpoint / R2_STATE_NAME).exists()  # linf has no learnable parameter: nothing to save
    args = make_args(str(tmp_path / "margin"), per_device=8, ga=1, steps=2, r2_type="margin")
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match=f"no {R2_STATE_NAME}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))

    run(str(tmp_path / "smm"), per_device=8, ga=1, steps=1, r2_type="soft_min_max", save_strategy="steps", save_steps=1)
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="r2_type='soft_min_max'.*r2_type='margin'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "smm" / "checkpoint-1"))


def test_save_model_loads_with_no_unexpected_keys(tmp_path):
    args = make_args(str(tmp_path / "run"), per_device=8, ga=1, steps=2, r2_type="margin")
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / R2_STATE_NAME).exists()

    loaded, info = BertForSequenceClassification.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not any("margin" in k or "alpha" in k for k in load_file(str(tmp_path / "final" / "model.safetensors")))

    # The weights must be identical; outputs only close (two models may take different kernels or memory layouts).
    trained_state = trainer.model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained_state[key]), key
    batch = TokenDataset()[0]
    trainer.model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"][None]).logits
        got = loaded(input_ids=batch["input_ids"][None]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- models with swapped layers ----


class WrappedLinear(nn.Linear):
    """Stands for the DKM / fake-quantization wrappers: an `nn.Linear` subclass with a transformed weight."""

    def forward(self, x):
        return nn.functional.linear(x, torch.tanh(self.weight), self.bias)


def test_works_on_models_with_wrapped_layers(tmp_path):
    model = tiny_bert()
    old = model.bert.encoder.layer[0].attention.self.query
    new = WrappedLinear(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.bert.encoder.layer[0].attention.self.query = new
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=2, r2_type="linf", r2_weight=1.0)
    trainer = R2Trainer(model=model, args=args, train_dataset=TokenDataset())
    assert "bert.encoder.layer.0.attention.self.query" in trainer.r2_regularizer.layer_names
    before = new.weight.detach().abs().max().item()
    trainer.train()
    assert new.weight.detach().abs().max().item() < before
    assert math.isfinite(train_logs(trainer)[-1]["r2_loss"])


# ---- the point of it all ----


# r2_weight 1.0 makes 30 steps of a tiny model enough for every layer (default, scale-free temperature); the paper's
# 0.01 and alpha 0.1 are meant for runs of thousands of steps (see docs/trainer.md).
SHRINK_SETTINGS = dict(steps=30, r2_weight=1.0, r2_learning_rate=None, learning_rate=1e-3, logging_steps=30)


@pytest.fixture(scope="module")
def shrink_runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("shrink")
    runs = {}
    for r2_type in ["none", *R2_TYPES]:
        settings = dict(SHRINK_SETTINGS)
        steps = settings.pop("steps")
        args = make_args(str(root / r2_type), per_device=16, ga=1, steps=steps, r2_type=r2_type, **settings)
        trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset(n=16))
        trainer.train()
        last = train_logs(trainer)[-1]
        ranges = weight_ranges(trainer.model)
        if trainer.r2_regularizer is not None:  # the table's default layers are exactly the regularized ones
            assert list(ranges) == trainer.r2_regularizer.layer_names
        runs[r2_type] = (ranges, last.get("task_loss", last["loss"]))
    return runs


@pytest.mark.parametrize("r2_type", R2_TYPES)
def test_training_with_r2_shrinks_every_layer_range(shrink_runs, r2_type):
    baseline, baseline_task = shrink_runs["none"]
    ranges, task = shrink_runs[r2_type]
    # 3 embeddings, 2 x 6 encoder Linears, pooler, classifier: every targeted layer.
    assert ranges.keys() == baseline.keys() and len(ranges) == 17
    grown = {n: (ranges[n].range, baseline[n].range) for n in ranges if not ranges[n].range < baseline[n].range}
    assert not grown, f"{r2_type}: layers whose range did not shrink (with R², without): {grown}"
    assert task == pytest.approx(baseline_task, abs=0.05), "similar task loss"


def test_sgd_at_the_paper_settings_through_r2_trainer(tmp_path):
    """`--optim sgd --optim_args momentum=0.9,nesterov=True --learning_rate 0.1 --weight_decay 1e-4 --r2_weight 0.01`:
    margins stay within reach of the weights (they jumped from 2 std to above every weight in one step when they were
    in the model's SGD) and every regularizer leaves the largest layer range below the plain run's."""
    sgd = dict(
        optim="sgd", optim_args="momentum=0.9,nesterov=True", learning_rate=0.1, weight_decay=1e-4, r2_weight=0.01,
        r2_learning_rate=None, logging_steps=8,
    )  # fmt: skip
    widest = {}
    for r2_type in ["none", *R2_TYPES]:
        args = make_args(str(tmp_path / r2_type), per_device=16, ga=1, steps=8, r2_type=r2_type, **sgd)
        trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset(n=16))
        trainer.train()
        widest[r2_type] = train_logs(trainer)[-1]["max_weight_range"]
        if r2_type == "margin":
            margins = trainer.r2_regularizer.margins.detach().abs()
            assert margins.max().item() <= 2.0 + 8 * 0.01 + 1e-4  # 8 Adam steps of ~0.01 std at most
        if r2_type == "soft_min_max":
            assert torch.all(trainer.r2_regularizer.alphas >= 4.0)
    assert all(widest[t] < widest["none"] for t in R2_TYPES), widest


def test_decoupled_mode_pulls_outliers_in_under_adamw(tmp_path):
    """`--r2_mode decoupled`: the range step happens after the optimizer step, not in the loss; ranges collapse far
    faster than Adam's pace (8 steps at lr 1e-4 move a weight by < 1e-3 through a loss term)."""
    common = dict(learning_rate=1e-4, r2_weight=0.05, logging_steps=8)
    none = run(str(tmp_path / "none"), per_device=16, ga=1, steps=8, r2_type="none", **common)
    loss = run(str(tmp_path / "loss"), per_device=16, ga=1, steps=8, r2_type="linf", **common)
    decoupled = run(str(tmp_path / "dec"), per_device=16, ga=1, steps=8, r2_type="linf", r2_mode="decoupled", **common)
    widest = {name: r["logs"][-1]["max_weight_range"] for name, r in [("none", none), ("loss", loss), ("d", decoupled)]}
    assert widest["loss"] > 0.98 * widest["none"]  # Adam's pace: barely moves
    assert widest["d"] < 0.8 * widest["none"], widest  # 8 steps of 5% of the range
    last = decoupled["logs"][-1]
    assert last["task_loss"] == last["loss"] and last["r2_loss"] > 0  # nothing of the range term in the loss


def test_decoupled_bulk_pulling_types_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_r2.trainer"):
        R2TrainingArguments(output_dir=str(tmp_path), r2_type="linf", r2_mode="decoupled", r2_weight=0.05)
        assert "tails of every layer" not in caplog.text
        R2TrainingArguments(output_dir=str(tmp_path), r2_type="soft_min_max", r2_mode="decoupled", r2_weight=0.05)
    assert "tails of every layer" in caplog.text and "r2_type='linf'" in caplog.text


def test_model_init_rebuilds_the_regularizer_on_the_fresh_model(tmp_path):
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=2, r2_type="linf")
    trainer = R2Trainer(model_init=lambda: tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train()
    # The regularizer reads the weights of the model that was trained, not of the one built in __init__.
    assert trainer.r2_regularizer.weights()[0] is trainer.model.bert.embeddings.word_embeddings.weight
    assert math.isfinite(train_logs(trainer)[-1]["r2_loss"])


def test_non_finite_range_loss_stops_training_naming_the_layer(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=1, r2_type="margin")
    trainer = R2Trainer(model=model, args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="classifier"):
        trainer.train()


def test_model_card_names_the_r2_settings(tmp_path):
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=2, r2_type="margin", r2_weight=0.02)
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train()
    trainer.create_model_card(model_name="tiny-r2", tags=["mine"])
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    header = card.split("---")[1]
    assert "hf_r2" in header and "r2-margin" in header and "mine" in header
    assert "- r2_type: margin" in card and "- r2_weight: 0.02" in card
    assert f"- final r2_loss: {train_logs(trainer)[-1]['r2_loss']:.4g}" in card


def test_accumulation_parity_with_a_loss_normalized_over_the_accumulated_batch(tmp_path):
    """With `compute_loss_func` the Trainer does not divide by the GA steps: the range term must then be divided."""

    def summed_cross_entropy(outputs, labels, num_items_in_batch=None):
        return nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    def logs(per_device, ga):
        args = make_args(str(tmp_path / f"{ga}"), per_device=per_device, ga=ga, steps=2, r2_type="linf", r2_weight=0.3)
        trainer = R2Trainer(
            model=tiny_bert(), args=args, train_dataset=TokenDataset(), compute_loss_func=summed_cross_entropy
        )
        trainer.train()
        return train_logs(trainer)

    one, two = logs(8, 1), logs(4, 2)
    assert_logs_equal(one, two)
    # The logged loss is task + 0.3 x range, with the task loss of the plain (unregularized) model at step 1.
    model = tiny_bert()
    batch = {
        k: torch.stack([TokenDataset()[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")
    }
    with torch.no_grad():
        task = model(**batch).loss.item()
    assert one[0]["task_loss"] == pytest.approx(task, rel=1e-5)


def test_help_text_renders_through_argparse():
    # argparse %-formats help strings: a bare "%" in a field's help crashes `--help` of every script using the class.
    from transformers import HfArgumentParser

    from hf_r2.arguments import CompressionArguments, PublishArguments

    text = HfArgumentParser((R2TrainingArguments, CompressionArguments, PublishArguments)).format_help()
    assert "--r2_learning_rate" in text and "--dkm_bits" in text and "--publish_dir" in text

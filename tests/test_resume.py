"""Resuming: a killed save never yields a checkpoint that auto-resume picks and crashes on, and a checkpoint of
another R² regularizer is refused before anything is loaded (issue 15, items 4 and 12)."""

from __future__ import annotations

import logging
import shutil

import pytest
from train_parity import TokenDataset, make_args, run, tiny_bert
from transformers import Trainer

from hf_r2.trainer import (
    R2_STATE_NAME,
    R2Trainer,
    check_resume_checkpoint,
    checkpoint_problem,
    get_last_complete_checkpoint,
    resolve_resume_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def margin_run(tmp_path_factory):
    """A 4-step margin-R² run with a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("margin")
    run(str(out), per_device=8, ga=1, steps=4, r2_type="margin", save_strategy="steps", save_steps=2)
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_killed_save_leaves_a_checkpoint_that_auto_resume_skips(margin_run, tmp_path, monkeypatch):
    out = copy_run(margin_run, tmp_path / "out")
    # The state a save killed right after its first files leaves (as reported: config.json and hf_r2's file only).
    killed = out / "checkpoint-6"
    killed.mkdir()
    shutil.copy(out / "checkpoint-4" / "config.json", killed)
    shutil.copy(out / "checkpoint-4" / R2_STATE_NAME, killed)
    assert "no trainer_state.json" in checkpoint_problem(killed)
    # And a save killed while writing trainer_state.json, the Trainer's last file.
    truncated = copy_run(out / "checkpoint-4", out / "checkpoint-5")
    text = (truncated / "trainer_state.json").read_text()
    (truncated / "trainer_state.json").write_text(text[: len(text) // 2])
    assert "truncated" in checkpoint_problem(truncated)
    assert checkpoint_problem(out / "checkpoint-4") is None

    logger = logging.getLogger("hf_r2.trainer")
    warnings = []
    monkeypatch.setattr(logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    assert get_last_complete_checkpoint(out) == str(out / "checkpoint-4")
    assert [w.split(":")[0] for w in warnings] == [
        f"Skipping the incomplete checkpoint {out / c}" for c in ("checkpoint-6", "checkpoint-5")
    ]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (2, 4, 5, 6)]  # kept

    loaded = []
    real_load = R2Trainer._load_from_checkpoint
    monkeypatch.setattr(
        R2Trainer,
        "_load_from_checkpoint",
        lambda self, ckpt, model=None: (loaded.append(ckpt), real_load(self, ckpt, model)),
    )
    trainer = R2Trainer(
        model=tiny_bert(),
        args=make_args(str(out), per_device=8, ga=1, steps=6, r2_type="margin"),
        train_dataset=TokenDataset(),
    )
    trainer.train(resume_from_checkpoint=True)
    assert loaded == [str(out / "checkpoint-4")] and trainer.state.global_step == 6

    with pytest.raises(
        ValueError,
        match=r"Cannot resume from .*checkpoint-6: it has no trainer_state.json.*"
        r"Resume from an earlier complete checkpoint",
    ):
        trainer.train(resume_from_checkpoint=str(killed))


def test_a_save_killed_inside_the_trainer_is_never_resumed(tmp_path, monkeypatch):
    """A real interrupted save: the process dies while the Trainer writes the optimizer state of step 4."""
    calls = []
    real_save = Trainer._save_optimizer_and_scheduler

    def dies_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path), per_device=8, ga=1, steps=4, r2_type="soft_min_max", save_strategy="steps", save_steps=2)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint-4" / R2_STATE_NAME).exists()  # hf_r2's file was complete, the checkpoint not
    assert checkpoint_problem(tmp_path / "checkpoint-4") is not None
    args = make_args(str(tmp_path), per_device=8, ga=1, steps=4, r2_type="soft_min_max")
    args.do_train = True
    assert resolve_resume_checkpoint(args) == str(tmp_path / "checkpoint-2")


@pytest.mark.parametrize("r2_type", ["linf", "none"])
def test_a_margin_checkpoint_resumed_without_its_regularizer_is_refused_up_front(
    margin_run, tmp_path, r2_type, monkeypatch
):
    checkpoint = margin_run / "checkpoint-2"
    message = (
        r"checkpoint-2 was trained with r2_type='margin'.*cannot be resumed with "
        rf"r2_type='{r2_type}'. Resume with --r2_type margin"
    )
    with pytest.raises(ValueError, match=message):
        check_resume_checkpoint(checkpoint, r2_type)
    monkeypatch.setattr(R2Trainer, "_load_from_checkpoint", lambda *a, **k: pytest.fail("loaded before the check"))
    trainer = R2Trainer(
        model=tiny_bert(),
        args=make_args(str(tmp_path), per_device=8, ga=1, steps=4, r2_type=r2_type),
        train_dataset=TokenDataset(),
    )
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_resuming_a_finished_run_is_refused_before_training(margin_run, tmp_path):
    out = copy_run(margin_run, tmp_path / "out")
    args = make_args(str(out), per_device=8, ga=1, steps=4, r2_type="margin", max_steps=4)
    args.do_train = True
    with pytest.raises(
        ValueError,
        match=r"checkpoint-4 was saved at step 4, which already reaches --max_steps 4: "
        r"resuming would train 0 steps.*give a new --output_dir",
    ):
        resolve_resume_checkpoint(args)
    args.max_steps = 6
    assert resolve_resume_checkpoint(args) == str(out / "checkpoint-4")
    args.do_train = False
    assert resolve_resume_checkpoint(args) is None

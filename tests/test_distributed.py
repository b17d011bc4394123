"""2-process DDP (torchrun, gloo, CPU) parity of R2Trainer with a 1-process run at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import assert_logs_equal, assert_tensors_close
from train_parity import DECOUPLED, GLOBAL_BATCH, run
from transformers import BertForSequenceClassification

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "train_parity.py")
STEPS = 3


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Two layouts of the same global batch of 8 in one launch (start-up dominates): 2 x 4 x GA 1 and 2 x 2 x GA 2.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        SCRIPT, "--out", str(out), "--layouts", "4x1", "2x2", "--steps", str(STEPS), "--r2_type", "soft_min_max",
        "--resume_check", "--decoupled_check",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rank0 = torch.load(out, weights_only=False)
    rank1 = torch.load(f"{out}.rank1", weights_only=False)
    torch.set_num_threads(1)
    single = run(str(tmp_path / "single"), per_device=GLOBAL_BATCH, ga=1, steps=STEPS, r2_type="soft_min_max")
    assert single["world_size"] == 1
    assert_resume_continues_exactly(rank0["resume"], tmp_path / "final")
    # r2_mode="decoupled": every rank applies the same range step to the same whole weights after the optimizer step.
    decoupled = run(str(tmp_path / "decoupled"), **DECOUPLED, per_device=GLOBAL_BATCH, steps=STEPS)
    assert_logs_equal(decoupled["logs"], rank0["decoupled"]["logs"])
    assert_tensors_close(decoupled["weights"], rank0["decoupled"]["weights"])
    assert_tensors_close(rank0["decoupled"]["weights"], rank1["decoupled"]["weights"], atol=0)

    for layout in ("4x1", "2x2"):
        ddp = rank0[layout]
        assert ddp["world_size"] == 2, "torchrun did not start one 2-process job"
        assert len(ddp["logs"]) == STEPS
        assert_logs_equal(single["logs"], ddp["logs"])
        assert_tensors_close(single["weights"], ddp["weights"])
        assert_tensors_close(single["r2_state"], ddp["r2_state"])
        # The regularizer's parameters are not in DDP: the ranks agree because they compute the same gradient.
        assert_tensors_close(ddp["r2_state"], rank1[layout]["r2_state"], atol=0)
        assert_tensors_close(ddp["weights"], rank1[layout]["weights"], atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_fsdp_r2trainer_matches_one_process(engine, tmp_path):
    """R2Trainer end to end under FSDP through Accelerate (`fsdp=True`; FSDP2: every BertLayer and the model
    `fully_shard`ed; FSDP1: BertLayer units, `use_orig_params=True`, a sync per micro-batch under GA), 2 processes x
    {4 x GA 1, 2 x GA 2}: logs, whole weights and regularizer state equal one process. Accelerate keeps FSDP for
    accelerators, so the script applies it on CPU the way Accelerate does on GPUs (`train_parity.apply_fsdp_on_cpu`);
    without that R2Trainer warns and trains with DDP (unit test in test_range_regularizer_layers.py)."""
    out = tmp_path / f"{engine}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # FSDP1 checkpoints go through Accelerate's FULL_STATE_DICT with offload_to_cpu, which segfaults on CPU (torch 2.13)
    resume = ["--resume_check"] if engine == "fsdp2" else []
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, f"--{engine}",
        "--out", str(out), "--layouts", "4x1", "2x2", "--steps", str(STEPS), "--r2_type", "soft_min_max", *resume,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rank0 = torch.load(out, weights_only=False)
    rank1 = torch.load(f"{out}.rank1", weights_only=False)
    torch.set_num_threads(1)
    single = run(str(tmp_path / "single"), per_device=GLOBAL_BATCH, ga=1, steps=STEPS, r2_type="soft_min_max")
    for layout in ("4x1", "2x2"):
        fsdp = rank0[layout]
        assert fsdp["world_size"] == 2 and fsdp["fsdp"] and fsdp["sharded"], f"{engine} was not applied"
        assert len(fsdp["logs"]) == STEPS
        assert_logs_equal(single["logs"], fsdp["logs"])
        assert_tensors_close(single["weights"], fsdp["weights"])
        assert_tensors_close(single["r2_state"], fsdp["r2_state"])
        assert_tensors_close(fsdp["r2_state"], rank1[layout]["r2_state"], atol=0)
    if engine == "fsdp1":
        return

    assert rank0["resume"]["straight"]["sharded"] and rank0["resume"]["resumed"]["sharded"]
    assert_resume_continues_exactly(rank0["resume"], tmp_path / "final")


def assert_resume_continues_exactly(resume: dict, final: Path) -> None:
    """`train_parity.resume_check`: a resume from the step-2 checkpoint of 2 processes continues exactly (weights,
    margins and their Adam state, logs), and `save_model` wrote the whole model, which from_pretrained loads with no
    missing or unexpected key."""
    straight, resumed = resume["straight"], resume["resumed"]
    assert straight["world_size"] == resumed["world_size"] == 2
    assert_tensors_close(straight["weights"], resumed["weights"])
    assert_tensors_close(straight["r2_state"], resumed["r2_state"])
    assert_logs_equal(straight["logs"][2:], resumed["logs"][2:])
    loaded, info = BertForSequenceClassification.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_tensors_close(straight["weights"], loaded.state_dict(), atol=0)


@pytest.mark.slow
def test_fsdp_range_loss_gradients_and_dkm_match_one_process():
    """FSDP2 (`fully_shard`, DTensor shards at rest), FSDP1 (`use_orig_params=True`: 1-D pieces at rest, size 0 on
    some rank) and DDP, in one launch (start-up dominates): every r2_type, scalar and 2-dim, with and without
    accumulation, gives the single-process range loss and gradients; DKM clusters whole weights, finalize refuses the
    sharded model, and a gathered full state dict finalizes like one process. A mismatch names its engine and case."""
    script = os.path.join(os.path.dirname(SCRIPT), "fsdp_parity.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    engines = ["--engine", "fsdp2", "fsdp1", "ddp"]
    proc = subprocess.run([*command, *engines], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok"


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("fsdp1", "FSDP")])
def test_accelerate_launch_files_parse(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    path = os.path.join(os.path.dirname(os.path.dirname(SCRIPT)), os.pardir, "examples", "accelerate_configs")
    config = ClusterConfig.from_yaml_file(os.path.join(path, f"{name}.yaml"))
    assert config.distributed_type.name == kind
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "fsdp1":  # the one FSDP1 set-up R2Trainer accepts
        assert config.fsdp_config["fsdp_version"] == 1 and config.fsdp_config["fsdp_use_orig_params"] is True
        assert config.fsdp_config["fsdp_sharding_strategy"] in ("FULL_SHARD", "SHARD_GRAD_OP")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for minutes")
def test_distributed_gpu_script_stops_at_once_without_a_gpu(tmp_path):
    """benchmarks/distributed_gpu.sh needs CUDA GPUs: without one it says so and exits 2 before running anything."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", os.path.join(root, "benchmarks", "distributed_gpu.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU visible" in proc.stderr and "DEVICE=cpu" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran

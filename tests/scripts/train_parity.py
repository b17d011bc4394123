"""A tiny, deterministic R2Trainer run, shared by the trainer tests and launched by `torchrun` for the DDP test.

The dataset holds exactly one global batch, so every optimizer step sees the same samples whatever the number of
processes, the accumulation steps or the shuffling: the losses of different layouts must agree to float rounding.
Dropout is off so that the per-process random streams cannot matter.

Usage (as a script, one or several processes):
    torchrun --standalone --nproc_per_node 2 tests/scripts/train_parity.py --out result.pt --layouts 4x1 2x2
    torchrun --standalone --nproc_per_node 2 tests/scripts/train_parity.py --out result.pt --fsdp2   # FSDP2
    torchrun --standalone --nproc_per_node 2 tests/scripts/train_parity.py --out result.pt --fsdp1   # FSDP1
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_r2.trainer import R2Trainer, R2TrainingArguments

VOCAB = 64
SEQ_LEN = 12
GLOBAL_BATCH = 8


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer, 32-wide BERT classifier, random init with a fixed seed, dropout off."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences; label 1 when token 7 occurs in the sequence (learnable by attention)."""

    def __init__(self, n: int = GLOBAL_BATCH, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
        self.labels = (self.input_ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": self.labels[i],
        }


#: The decoupled-mode parity run: the range step after every optimizer step, instead of a loss term.
DECOUPLED = {"ga": 1, "r2_type": "linf", "r2_mode": "decoupled", "r2_weight": 0.05}


def apply_fsdp_on_cpu() -> None:
    """Makes Accelerate apply the FSDP plugin on CPU processes too (test only).

    Accelerate switches to FSDP only when its distributed type is one of the accelerator types (`MULTI_GPU`, ...,
    in `AcceleratorState.__init__`); a CPU run stays `MULTI_CPU` and silently drops the plugin, so `R2Trainer` would
    train with DDP. This shim does on CPU what Accelerate does on GPUs: keep the plugin and switch the type to FSDP.
    It also gives the processes the device `cpu` instead of `cpu:<local rank>`, which FSDP1 refuses as its
    `device_id` ("Inconsistent compute device and `device_id`").
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = plugin
            self.device = PartialState._shared_state["device"] = torch.device("cpu")

    AcceleratorState.__init__ = init


def make_args(output_dir: str, *, per_device: int, ga: int, steps: int, r2_type: str, **overrides):
    """Training arguments of the parity runs: `steps` optimizer steps of one global batch each, logged every step."""
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        num_train_epochs=steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        r2_type=r2_type,
        r2_weight=0.05,
        r2_learning_rate=0.05,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return R2TrainingArguments(**kwargs)


def train_logs(trainer: R2Trainer) -> list[dict[str, float]]:
    """The training-step log entries (those with `loss`), in order."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def snapshot(trainer: R2Trainer) -> dict:
    """Logs, model weights and regularizer parameters of a finished run, on CPU."""
    reg = trainer.r2_regularizer
    return {
        "world_size": trainer.args.world_size,
        "logs": train_logs(trainer),
        "weights": whole_state_dict(trainer.model),
        "fsdp": trainer.is_fsdp_enabled,
        # FSDP2: DTensor weights; FSDP1 (use_orig_params): 1-D pieces of the flat parameters.
        "sharded": any(
            type(p).__name__ == "DTensor" or (getattr(p, "_fsdp_flattened", False) and p.dim() == 1)
            for p in trainer.model.parameters()
        ),
        "r2_state": {} if reg is None else {k: v.detach().cpu().clone() for k, v in reg.state_dict().items()},
    }


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on CPU, gathered from FSDP shards (a collective then: call on every rank)."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    if isinstance(model, FullyShardedDataParallel):
        # Not Accelerate's offload_to_cpu=True, which segfaults when the parameters already live on the CPU.
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            state = model.state_dict()
    else:
        state = model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in state.items()}


def run(output_dir: str, *, per_device: int, ga: int, steps: int, r2_type: str, **overrides) -> dict:
    """Trains `tiny_bert()` on `TokenDataset()` and returns `snapshot(trainer)`."""
    args = make_args(output_dir, per_device=per_device, ga=ga, steps=steps, r2_type=r2_type, **overrides)
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train()
    return snapshot(trainer)


def resume_check(folder: str, **overrides) -> dict:
    """4 steps straight (checkpoint at step 2, then `save_model` into `folder/final`) and 2 steps resumed from the
    checkpoint into a model built with another seed: the snapshots of both runs."""
    output_dir = os.path.join(folder, "resume")
    common = dict(per_device=GLOBAL_BATCH // max(1, int(os.environ.get("WORLD_SIZE", "1"))), ga=1, steps=4)
    args = make_args(output_dir, **common, r2_type="margin", save_strategy="steps", save_steps=2, **overrides)
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train()
    trainer.save_model(os.path.join(folder, "final"))
    straight = snapshot(trainer)
    args = make_args(output_dir, **common, r2_type="margin", save_strategy="no", **overrides)
    trainer = R2Trainer(model=tiny_bert(seed=5), args=args, train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
    return {"straight": straight, "resumed": snapshot(trainer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="torch.save path of the snapshots (rank r > 0 appends .rank<r>)")
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["4x1"],
        help="runs to make, each PER_DEVICExGA (per-device batch x accumulation)",
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--r2_type", default="soft_min_max")
    parser.add_argument("--fsdp2", action="store_true", help="train under FSDP2 (fully_shard each BertLayer, then all)")
    parser.add_argument("--fsdp1", action="store_true", help="train under FSDP1, use_orig_params (BertLayer units)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per process, NCCL")
    parser.add_argument(
        "--decoupled_check", action="store_true", help="also: a run of DECOUPLED (r2_mode='decoupled', linf)"
    )
    parser.add_argument(
        "--resume_check",
        action="store_true",
        help="also: 4 steps (margin) with a checkpoint at 2 and save_model, then a resume from the checkpoint",
    )
    cli = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {} if cli.device == "cpu" else {"use_cpu": False}
    if cli.fsdp2:
        apply_fsdp_on_cpu()  # a no-op on GPUs, where Accelerate applies FSDP itself
        overrides |= {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    if cli.fsdp1:
        apply_fsdp_on_cpu()
        fsdp_config = {"version": 1, "use_orig_params": True, "transformer_layer_cls_to_wrap": ["BertLayer"]}
        if cli.device == "cpu":
            fsdp_config["sync_module_states"] = False  # Accelerate's plugin refuses it on CPU
        overrides |= {"fsdp": True, "fsdp_config": fsdp_config}
    results = {}
    for layout in cli.layouts:
        per_device, ga = (int(x) for x in layout.split("x"))
        results[layout] = run(
            os.path.join(os.path.dirname(os.path.abspath(cli.out)), f"run-{layout}"),
            per_device=per_device,
            ga=ga,
            steps=cli.steps,
            r2_type=cli.r2_type,
            **overrides,
        )
    if cli.resume_check:
        results["resume"] = resume_check(os.path.dirname(os.path.abspath(cli.out)), **overrides)
    if cli.decoupled_check:
        per_device = GLOBAL_BATCH // max(1, int(os.environ.get("WORLD_SIZE", "1")))
        results["decoupled"] = run(
            os.path.join(os.path.dirname(os.path.abspath(cli.out)), "run-decoupled"),
            **DECOUPLED,
            per_device=per_device,
            steps=cli.steps,
            **overrides,
        )
    rank = int(os.environ.get("RANK", "0"))
    # Every rank writes its own snapshot, to check that the ranks agree without communicating.
    torch.save(results, cli.out if rank == 0 else f"{cli.out}.rank{rank}")
    if torch.distributed.is_initialized():  # leave together: a rank that exits first aborts its peer's gloo threads
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

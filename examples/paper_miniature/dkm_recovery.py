#!/usr/bin/env python
"""DKM recovery curves of the main job (issue 9.1): accuracy against DKM fine-tune steps, per bit width and lr.

Fine-tunes the pretrained MiniLM once with the pipeline's full-precision recipe (`qnli.py`'s defaults, seed 0; or
loads `--fp_weights` saved by an earlier run), then for every `--bits` x `--lrs` palettizes every Linear layer (one LUT
per layer, embeddings dense), trains with AdamW (linear warm-up and decay, shuffled batches, no R²) and prints the
accuracy on the held-out training pairs (dev) and on the validation pairs (val) every `--eval_every` steps.

    python examples/paper_miniature/dkm_recovery.py --bits 2 1 --lrs 3e-5 1e-4 --steps 40 --save_fp fp.safetensors

Numbers and their reading: docs/RESULTS.md, section 2.2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qnli  # noqa: E402


def main(argv=None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )
    from transformers import logging as hf_logging

    from hf_r2 import reports
    from hf_r2.palettization import DKMConfig, palettize
    from hf_r2.trainer import R2Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--fp_weights", help="Full-precision weights saved by --save_fp (skips the fine-tune).")
    parser.add_argument("--save_fp", help="Where to save the fine-tuned full-precision weights (safetensors).")
    parser.add_argument("--train_samples", type=int, default=None, help="Fewer training pairs (smoke tests).")
    parser.add_argument("--fp_steps", type=int, default=-1, help="If > 0, steps of the fine-tune (smoke tests).")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    settings = qnli.MiniatureArguments(train_samples=args.train_samples, max_steps=args.fp_steps)
    autocast = torch.bfloat16 if settings.bf16 else None
    path = qnli.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    fit, dev, validation = qnli.load_data(settings, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    dev_batches = qnli.make_eval_batches(dev, collator)
    val_batches = qnli.make_eval_batches(validation, collator)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if args.fp_weights:
        model.load_state_dict(load_file(args.fp_weights))
    else:
        qnli.reset_classifier(model, 0)
        targs = qnli.training_arguments(
            "/tmp/hf_r2_dkm_recovery", 0, settings, learning_rate=settings.learning_rate,
            num_train_epochs=settings.num_train_epochs, max_steps=settings.max_steps, warmup_steps=0.1,
        )  # fmt: skip
        R2Trainer(model=model, args=targs, train_dataset=fit, data_collator=collator).train()
        if args.save_fp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save_fp)

    def accuracy(m, batches) -> float:
        return round(100 * reports.batch_accuracy(m, batches, autocast_dtype=autocast), 1)

    print(json.dumps({"full_precision": {"dev": accuracy(model, dev_batches), "val": accuracy(model, val_batches)}}))
    rows = fit.to_list()
    results = []
    for bits in args.bits:
        for lr in args.lrs:
            dkm = palettize(copy.deepcopy(model), DKMConfig(n_bits=bits, exclude_modules=qnli.EMBEDDING_NAMES, seed=0))
            optimizer = torch.optim.AdamW(dkm.parameters(), lr=lr, weight_decay=0.0)
            schedule = get_linear_schedule_with_warmup(optimizer, args.warmup, args.steps)
            rng, order = random.Random(0), []
            curve = [(0, accuracy(dkm, dev_batches), accuracy(dkm, val_batches))]
            for step in range(1, args.steps + 1):
                if len(order) < args.batch_size:
                    more = list(range(len(rows)))
                    rng.shuffle(more)
                    order += more
                batch, order = collator([rows[i] for i in order[: args.batch_size]]), order[args.batch_size :]
                dkm.train()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                    loss = dkm(**batch).loss
                loss.backward()
                optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
                if step % args.eval_every == 0 or step == args.steps:
                    curve.append((step, accuracy(dkm, dev_batches), accuracy(dkm, val_batches)))
            results.append({"bits": bits, "lr": lr, "curve (step, dev, val)": curve})
            print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()

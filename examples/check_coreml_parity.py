"""macOS-side check of a Core ML export: PyTorch vs Core ML on a GLUE-style validation split.

`hf_r2.export.export_coreml` (and `run_glue.py --export_coreml DIR`) verify on any OS that the package's decompressed
weights equal the PyTorch weights bit for bit; only the Core ML runtime, which exists on macOS alone, can show that
the predictions agree too. On a Mac (macOS 15 or newer for the iOS 18 ops), run:

    pip install hf-r2[coreml]
    python examples/check_coreml_parity.py --model_dir out/qnli-dkm2/publish \\
        --mlpackage out/qnli-dkm2/coreml/model.mlpackage \\
        --validation_file examples/data/qnli-squad/validation.jsonl --task_name qnli

It tokenizes the split exactly as the export's example inputs were (padded to the package's fixed sequence length),
runs the PyTorch model (`from_pretrained` with hf_r2 imported) and the Core ML package batch by batch, and prints the
accuracy of each, how often their predictions agree, and the largest logit difference; it exits with status 1 when
that difference exceeds `--atol`. Not run by the hf_r2 sessions (Linux machines): its result is for the user to report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import numpy as np

#: Text columns of each GLUE task (as in run_glue.py).
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "wnli": ("sentence1", "sentence2"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="The hf_r2 checkpoint that was exported (from_pretrained).")
    parser.add_argument("--mlpackage", required=True, help="The exported .mlpackage.")
    parser.add_argument("--validation_file", required=True, help="GLUE-style .jsonl (text columns + label).")
    parser.add_argument("--task_name", default="qnli", choices=sorted(TASK_TO_KEYS))
    parser.add_argument("--max_examples", type=int, default=None, help="Only the first N examples.")
    parser.add_argument("--atol", type=float, default=1e-3, help="Largest allowed |PyTorch - Core ML| logit.")
    parser.add_argument("--compute_units", default="CPU_ONLY", choices=["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"])
    args = parser.parse_args(argv)
    if args.max_examples is not None and args.max_examples < 1:
        parser.error(f"--max_examples must be >= 1, got {args.max_examples}.")
    if not args.atol >= 0:
        parser.error(f"--atol must be >= 0, got {args.atol}.")
    return args


def load_rows(path: str, task_name: str, max_examples: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    keys = [k for k in (*TASK_TO_KEYS[task_name], "label") if k is not None]
    missing = sorted({k for row in rows for k in keys if k not in row})
    if missing:
        raise SystemExit(f"{path}: rows lack the columns {missing} that task {task_name!r} needs.")
    return rows[:max_examples] if max_examples else rows


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if platform.system() != "Darwin":
        raise SystemExit(
            "check_coreml_parity.py needs macOS: the Core ML runtime (predictions) exists only there. On Linux, "
            "hf_r2.export already checked that the package's decompressed weights equal the PyTorch ones."
        )
    import coremltools as ct
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import hf_r2  # noqa: F401  (registers hf_r2's checkpoint formats with transformers)

    mlmodel = ct.models.MLModel(args.mlpackage, compute_units=getattr(ct.ComputeUnit, args.compute_units))
    inputs = {i.name: tuple(i.type.multiArrayType.shape) for i in mlmodel.get_spec().description.input}
    batch_size, seq_len = inputs["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    key1, key2 = TASK_TO_KEYS[args.task_name]
    rows = load_rows(args.validation_file, args.task_name, args.max_examples)

    torch_logits, coreml_logits = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        count = len(batch)
        batch = batch + [batch[-1]] * (batch_size - count)  # the package has a fixed batch size
        texts = [[r[key1] for r in batch]] + ([[r[key2] for r in batch]] if key2 else [])
        encoded = tokenizer(*texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        feeds = {name: encoded[name] for name in inputs}
        with torch.no_grad():
            torch_logits.append(model(**feeds).logits[:count].float().numpy())
        prediction = mlmodel.predict({name: value.numpy().astype(np.int32) for name, value in feeds.items()})
        coreml_logits.append(np.asarray(prediction["logits"], dtype=np.float32)[:count])
    torch_logits, coreml_logits = np.concatenate(torch_logits), np.concatenate(coreml_logits)
    labels = np.array([row["label"] for row in rows])
    results = {
        "examples": float(len(rows)),
        "pytorch_accuracy": float((torch_logits.argmax(-1) == labels).mean()),
        "coreml_accuracy": float((coreml_logits.argmax(-1) == labels).mean()),
        "prediction_agreement": float((torch_logits.argmax(-1) == coreml_logits.argmax(-1)).mean()),
        "max_abs_logit_difference": float(np.abs(torch_logits - coreml_logits).max()),
    }
    print(json.dumps(results, indent=2))
    if results["max_abs_logit_difference"] > args.atol:
        print(f"FAIL: logits differ by more than --atol={args.atol}", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()

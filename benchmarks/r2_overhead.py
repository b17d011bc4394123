"""Overhead of R² range regularization on a full-size MobileBERT training step.

Times a training step (forward + backward + AdamW) of `MobileBertForSequenceClassification(MobileBertConfig())`
(random init, batch 8 × 128) with and without the range loss of each `r2_type`, side by side in one run: the modes take
turns step by step, so a change in machine load hits them all alike, and the median step time of each is compared.

    python benchmarks/r2_overhead.py --steps 10 --r2_types linf margin soft_min_max

`--mode trainer` times `hf_r2.trainer.R2Trainer` against `transformers.Trainer` instead (same model and batch), with a
callback that records the wall time of each optimizer step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import MobileBertConfig, MobileBertForSequenceClassification  # noqa: E402

from hf_r2.range_regularizer import R2Config, RangeRegularizer  # noqa: E402
from hf_r2.regularizers import R2_TYPES  # noqa: E402


def make_batch(config: MobileBertConfig, batch_size: int, seq_len: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator).to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_loop(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Plain torch loop: one model, one optimizer; each mode adds (or not) `r2_weight × range loss`."""
    torch.manual_seed(0)
    config = MobileBertConfig(num_labels=2)
    model = MobileBertForSequenceClassification(config).to(device).train()
    batch = make_batch(config, args.batch_size, args.seq_len, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    r2_config = {t: R2Config(r2_type=t, cluster_dim=args.cluster_dim) for t in args.r2_types}
    regs = {t: RangeRegularizer(model, cfg).to(device) for t, cfg in r2_config.items()}
    reg_opts = {t: torch.optim.AdamW(r.parameters(), lr=1e-3) for t, r in regs.items() if list(r.parameters())}
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{len(next(iter(regs.values())).layer_names) if regs else 0} regularized layers",
        flush=True,
    )

    def step(mode: str) -> float:
        _sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        if mode != "none":
            loss = loss + args.r2_weight * regs[mode]()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if mode in reg_opts:
            reg_opts[mode].step()
            reg_opts[mode].zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    def reg_only(mode: str) -> float:
        # As in a real step, the range gradient is added to an existing gradient (not allocated from scratch).
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        _sync(device)
        start = time.perf_counter()
        regs[mode]().backward()
        _sync(device)
        return time.perf_counter() - start

    modes = ["none", *args.r2_types]
    times: dict[str, list[float]] = {m: [] for m in modes}
    times.update({f"{m} (range loss alone)": [] for m in args.r2_types})
    for i in range(args.warmup + args.steps):
        for mode in modes:
            t = step(mode)
            if i >= args.warmup:
                times[mode].append(t)
        for mode in args.r2_types:
            t = reg_only(mode)
            model.zero_grad(set_to_none=True)
            regs[mode].zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[f"{mode} (range loss alone)"].append(t)
    return times


def bench_trainer(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """`R2Trainer` (each r2_type) vs `transformers.Trainer` on the same model, batch and number of steps."""
    import tempfile

    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_r2.trainer import R2Trainer, R2TrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter() - self._start)

    config = MobileBertConfig(num_labels=2)
    batch = make_batch(config, args.batch_size, args.seq_len, torch.device("cpu"))
    n = args.batch_size * (args.warmup + args.steps)
    repeats = (n + args.batch_size - 1) // args.batch_size
    rows = {k: v.repeat(repeats, *([1] * (v.dim() - 1)))[:n] for k, v in batch.items()}
    dataset = Dataset.from_dict({k: v.tolist() for k, v in rows.items()}).with_format("torch")

    def run(mode: str) -> list[float]:
        torch.manual_seed(0)
        model = MobileBertForSequenceClassification(config)
        timer = StepTimer()
        common = dict(
            per_device_train_batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            learning_rate=1e-5,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        with tempfile.TemporaryDirectory() as out:
            if mode == "none":
                trainer = Trainer(
                    model=model,
                    args=TrainingArguments(output_dir=out, **common),
                    train_dataset=dataset,
                    callbacks=[timer],
                )
            else:
                targs = R2TrainingArguments(output_dir=out, r2_type=mode, r2_cluster_dim=args.cluster_dim, **common)
                trainer = R2Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[timer])
            trainer.train()
        return timer.times[args.warmup :]

    # Each r2_type is compared with a plain Trainer run right next to it (pairs), so that slow drifts in machine
    # load hit both sides of a ratio alike.
    times: dict[str, list[float]] = {}
    for mode in args.r2_types:
        times[f"none (paired with {mode})"] = run("none")
        times[mode] = run(mode)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per mode (after warm-up).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per mode first.")
    parser.add_argument("--r2_types", nargs="+", default=list(R2_TYPES), choices=list(R2_TYPES))
    parser.add_argument("--mode", choices=["loop", "trainer"], default="loop")
    parser.add_argument("--cluster_dim", type=int, default=1)
    parser.add_argument("--r2_weight", type=float, default=0.01)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, mode {args.mode}, "
        f"batch {args.batch_size}x{args.seq_len}, steps {args.steps} (+{args.warmup} warm-up)",
        flush=True,
    )

    times = bench_loop(args, device) if args.mode == "loop" else bench_trainer(args, device)
    print(f"\n{'mode':<36} {'median step (ms)':>17} {'overhead vs none':>17}")
    for mode, values in times.items():
        med = statistics.median(values)
        if mode.startswith("none"):
            label = "baseline"
        elif "alone" in mode:
            label = f"{med / statistics.median(times['none']) * 100:.2f}% of step"
        else:
            base = statistics.median(times.get(f"none (paired with {mode})", times.get("none", [])))
            label = f"{(med / base - 1) * 100:+.2f}%"
        print(f"{mode:<36} {med * 1e3:>17.1f} {label:>17}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

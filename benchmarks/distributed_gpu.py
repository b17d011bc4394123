"""The Python half of `benchmarks/distributed_gpu.sh` (issue 11): parity of multi-process runs, and step time / peak
memory of `R2Trainer` under each engine.

    python benchmarks/distributed_gpu.py compare --ref ref.pt --run ddp=ddp.pt fsdp2=fsdp2.pt
    torchrun --standalone --nproc_per_node N benchmarks/distributed_gpu.py step --engine fsdp2 --steps 10

`compare` checks a `tests/scripts/train_parity.py` run of N processes against the one-process run at the same global
batch (logged loss, r2_loss, task_loss, max_weight_range; final weights; the regularizer's state), prints the largest
differences and exits 1 on a mismatch. `step` trains a BERT-base classifier (from its config, random tokens, 128
tokens x `--batch` per process) for `--warmup` + `--steps` optimizer steps with `R2Trainer` under one engine, for each
of `--r2_types`, and prints the median step time and the peak CUDA memory (`torch.cuda.max_memory_allocated`, this
process) on rank 0. DeepSpeed ZeRO-3 with R² is refused by `R2Trainer`: `step` prints the refusal and times
`r2_type=none` only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_KEYS = ("loss", "r2_loss", "task_loss", "max_weight_range")


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float):
    """(largest |a - b|, its key, whether every tensor passes `allclose(a, b, rtol, atol)`)."""
    if a.keys() != b.keys():
        raise SystemExit(f"different keys: {sorted(set(a) ^ set(b))[:5]}")
    worst, where, close = 0.0, "", True
    for key in a:
        x, y = a[key].double(), b[key].double()
        if x.numel() and (diff := (x - y).abs().max().item()) > worst:
            worst, where = diff, key
        close &= torch.allclose(x, y, rtol=rtol, atol=atol)
    return worst, where, close


def compare(cli: argparse.Namespace) -> int:
    """Parity of every layout of every `--run NAME=PATH` with the single layout of `--ref`; returns the exit status."""
    ref = next(iter(torch.load(cli.ref, weights_only=False).values()))
    status = 0
    for name, path in (entry.split("=", 1) for entry in cli.run):
        if not os.path.exists(path):
            print(f"parity {name}: FAILED: {path} was not written (its run failed)")
            status = 1
            continue
        status |= _compare_run(cli, ref, name, torch.load(path, weights_only=False))
    return status


def _compare_run(cli: argparse.Namespace, ref: dict, name: str, runs: dict) -> int:
    status = 0
    for layout, run in runs.items():
        if not isinstance(run, dict) or "logs" not in run:
            continue
        problems = []
        if len(run["logs"]) != len(ref["logs"]):
            problems.append(f"{len(run['logs'])} logged steps, expected {len(ref['logs'])}")
        log_diff = max(
            abs(x[key] - y[key]) / max(abs(y[key]), 1e-7)
            for x, y in zip(run["logs"], ref["logs"], strict=False)
            for key in LOG_KEYS
        )
        if log_diff > cli.rtol:
            problems.append(f"logs differ by {log_diff:.1e} (relative) > {cli.rtol:.0e}")
        weight_diff, weight_key, close = _largest_difference(run["weights"], ref["weights"], cli.rtol, cli.atol)
        if not close:
            problems.append(f"weights not within rtol {cli.rtol:.0e} + atol {cli.atol:.0e}")
        state_diff, _, close = _largest_difference(run["r2_state"], ref["r2_state"], cli.rtol, cli.atol)
        if not close:
            problems.append(f"regularizer state not within rtol {cli.rtol:.0e} + atol {cli.atol:.0e}")
        engine = "FSDP, sharded weights" if run.get("sharded") else ("FSDP" if run.get("fsdp") else "DDP / plain")
        verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
        print(
            f"parity {name} {layout} ({run['world_size']} processes, {engine}): logs {log_diff:.1e} relative, "
            f"weights {weight_diff:.1e} absolute ({weight_key}), r2 state {state_diff:.1e} absolute -> {verdict}"
        )
        status |= bool(problems)
    return status


class _StepTimer:
    """Wall time of every optimizer step (CUDA synchronized at both ends)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._sync()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer._sync()
                timer.times.append(time.perf_counter() - timer._start)

        self.callback = Callback()
        self.times: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _engine_arguments(engine: str, on_gpu: bool) -> dict:
    if engine == "fsdp2":
        return {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    if engine == "fsdp1":
        config = {"version": 1, "use_orig_params": True, "transformer_layer_cls_to_wrap": ["BertLayer"]}
        if not on_gpu:
            config["sync_module_states"] = False  # Accelerate's plugin refuses it on CPU
        return {"fsdp": True, "fsdp_config": config}
    if engine == "zero3":
        config = {
            "zero_optimization": {"stage": 3},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
        return {"deepspeed": config}
    return {}


def step(cli: argparse.Namespace) -> int:
    """Times R2Trainer steps under `--engine` for each of `--r2_types` (an error in training raises)."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_r2.trainer import R2Trainer, R2TrainingArguments

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = cli.device == "cuda"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif cli.engine in ("fsdp2", "fsdp1"):
        sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
        from train_parity import apply_fsdp_on_cpu  # Accelerate keeps FSDP for GPUs (docs/trainer.md)

        apply_fsdp_on_cpu()
    elif cli.engine == "zero3":
        if rank == 0:
            print("step zero3: needs GPUs (DeepSpeed); skipped")
        return 0
    if cli.model == "base":
        config = BertConfig(num_labels=2)
    else:  # the CPU smoke run of the script
        config = BertConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
    total_steps = cli.warmup + cli.steps
    generator = torch.Generator().manual_seed(0)
    n = total_steps * cli.batch * world
    ids = torch.randint(0, config.vocab_size, (n, cli.seq_len), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    dataset = [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
    for r2_type in cli.r2_types:
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        with tempfile.TemporaryDirectory() as output_dir:
            args = R2TrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=cli.batch,
                max_steps=total_steps,
                learning_rate=1e-4,
                logging_steps=total_steps,
                save_strategy="no",
                report_to=[],
                use_cpu=not on_gpu,
                disable_tqdm=True,
                dataloader_num_workers=0,
                r2_type=r2_type,
                **_engine_arguments(cli.engine, on_gpu),
            )
            try:
                trainer = R2Trainer(model=model, args=args, train_dataset=dataset)
            except ValueError as error:  # the engines R2Trainer refuses (ZeRO-3 with R²)
                if rank == 0:
                    print(f"step {cli.engine:6s} {r2_type:13s} refused by R2Trainer: {error}")
                continue
            timer = _StepTimer()
            trainer.add_callback(timer.callback)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if on_gpu else "n/a (CPU)"
            sharded = any(
                type(p).__name__ == "DTensor" or (getattr(p, "_fsdp_flattened", False) and p.dim() == 1)
                for p in trainer.model.parameters()
            )
            logs = [entry for entry in trainer.state.log_history if "loss" in entry]
            if rank == 0:
                measured = timer.times[cli.warmup :] or timer.times
                print(
                    f"step {cli.engine:6s} {r2_type:13s} {world} processes, fsdp applied {trainer.is_fsdp_enabled}, "
                    f"sharded weights {sharded}: {1000 * statistics.median(measured):8.1f} ms/step (median of "
                    f"{len(measured)}), peak {peak}, loss {logs[-1]['loss']:.4f}, "
                    f"r2_loss {logs[-1].get('r2_loss', float('nan')):.4f}"
                )
            del trainer, model
            if on_gpu:
                torch.cuda.empty_cache()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    parity = commands.add_parser("compare", help="parity of a multi-process train_parity run with one process")
    parity.add_argument("--ref", required=True, help="train_parity.py output of the one-process run")
    parity.add_argument(
        "--run", nargs="+", required=True, help="NAME=PATH: train_parity.py outputs (rank 0) of multi-process runs"
    )
    parity.add_argument("--rtol", type=float, default=1e-4)
    parity.add_argument("--atol", type=float, default=1e-5)
    timing = commands.add_parser("step", help="R2Trainer step time and peak memory under one engine")
    timing.add_argument("--engine", choices=["ddp", "fsdp2", "fsdp1", "zero3"], required=True)
    timing.add_argument("--r2_types", nargs="+", default=["none", "soft_min_max"])
    timing.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    timing.add_argument("--model", choices=["base", "tiny"], default="base", help="BERT-base, or a tiny one for CPU")
    timing.add_argument("--steps", type=int, default=10)
    timing.add_argument("--warmup", type=int, default=3)
    timing.add_argument("--batch", type=int, default=8, help="sequences per process and step")
    timing.add_argument("--seq_len", type=int, default=128)
    cli = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    return compare(cli) if cli.command == "compare" else step(cli)


if __name__ == "__main__":
    sys.exit(main())

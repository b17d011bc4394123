"""Cost of R²'s whole-weight gather under FSDP: `RangeRegularizer` forward + backward in one process (no gather)
against FSDP1 (`use_orig_params=True`, 1-D pieces, one all-gather) and FSDP2 (DTensor `full_tensor()` per weight)
over the processes of a `torchrun` launch, on 3 blocks of Linear(768, 3072) + Linear(3072, 768) (14.2M weights).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/sharded_gather.py --r2_type soft_min_max

Prints the median wall time of `reg().backward()` (ranks synchronized with barriers before and after) on rank 0.
Every process computes the range term on all whole weights (as under DDP), so with 2 processes on a 2-core CPU the
numbers include the two processes competing for the cores.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

from hf_r2.range_regularizer import R2Config, RangeRegularizer


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(768, 3072), nn.Linear(3072, 768)) for _ in range(3)])


def _median_ms(reg: RangeRegularizer, reps: int) -> float:
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        dist.barrier()
        start = time.perf_counter()
        reg().backward()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r2_type", default="soft_min_max", choices=["linf", "margin", "soft_min_max"])
    parser.add_argument("--reps", type=int, default=5)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    config = R2Config(cli.r2_type)
    results = {}
    plain = _model()
    results["one process (no gather)"] = _median_ms(RangeRegularizer(plain, config), cli.reps)

    model = _model()
    reg = RangeRegularizer(model, config)  # before wrapping: it records the whole shapes
    cpu = {"use_orig_params": True, "device_id": torch.device("cpu")}
    for i in range(len(model)):
        model[i] = FullyShardedDataParallel(model[i], **cpu)
    FullyShardedDataParallel(model, **cpu)
    results[f"FSDP1 pieces, {dist.get_world_size()} processes"] = _median_ms(reg, cli.reps)

    model = _model()
    reg = RangeRegularizer(model, config)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    results[f"FSDP2 DTensors, {dist.get_world_size()} processes"] = _median_ms(reg, cli.reps)

    n = sum(p.numel() for p in plain.parameters() if p.dim() == 2)
    if dist.get_rank() == 0:
        print(f"{n / 1e6:.1f}M regularized weights ({4 * n / 2**20:.0f} MiB gathered per rank in fp32); {cli.r2_type}:")
        for name, ms in results.items():
            print(f"  {name:30s} {ms:8.1f} ms per forward + backward")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

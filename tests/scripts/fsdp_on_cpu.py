"""Runs an example script under `torchrun` with Accelerate's FSDP applied on CPU processes (test only).

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_on_cpu.py examples/run_glue.py ... --fsdp full_shard

Accelerate applies FSDP on accelerators only (docs/trainer.md, "Accelerate on a CPU");
`train_parity.apply_fsdp_on_cpu` does on CPU what it does on GPUs, then the script runs as `__main__`.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_parity import apply_fsdp_on_cpu  # noqa: E402

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    apply_fsdp_on_cpu()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: the main process writes the card and results after the others
        dist.barrier()
        dist.destroy_process_group()

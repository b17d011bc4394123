"""RangeRegularizer under DistributedDataParallel, one gloo process (run by tests/test_range_regularizer.py).

Runs in its own interpreter: an in-process gloo group inside the pytest process hung now and then.
Prints "ok" when every check passes; any failed check raises.
"""

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from hf_r2.range_regularizer import R2Config, RangeRegularizer


def main() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no host-name lookup
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        for r2_type in ("linf", "margin", "soft_min_max"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Embedding(12, 8), nn.Linear(8, 8), nn.Linear(8, 4))
            reg = RangeRegularizer(model, R2Config(r2_type))
            ddp = nn.parallel.DistributedDataParallel(model)
            ids = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(0))
            (ddp(ids).square().sum() + 0.01 * reg()).backward()
            # The weights DDP holds are the ones the regularizer reads: same layers, dense gradients everywhere.
            assert reg.layer_names == RangeRegularizer(ddp.module, R2Config(r2_type)).layer_names, r2_type
            for name, module in model.named_children():
                assert module.weight.grad is not None and module.weight.grad.layout == torch.strided, (r2_type, name)
            for param in reg.parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), r2_type
            model.zero_grad()
    finally:
        dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()

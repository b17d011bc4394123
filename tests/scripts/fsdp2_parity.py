"""R² and DKM under FSDP2 (`fully_shard`) against one process on the same global batch (run by
tests/test_distributed.py under `torchrun --nproc_per_node 2`, gloo on CPU).

Each rank trains on its half of the batch; the reference is computed by every rank alone on the whole batch. Checked:
the range loss, the gradients of every weight (gathered) and of the regularizer's own parameters, for every r2_type,
scalar and multi-dimensional; for DKM, the weight gradients after one forward/backward (clustering must see whole
weights), then one SGD step, a full state dict gathered from the shards, and `finalize` of it on rank 0 against the
single-process model. Prints "ok" on rank 0 when everything matches; any mismatch raises.
"""

import copy
import datetime

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from hf_r2.palettization import DKMConfig, dkm_layers, finalize, palettize
from hf_r2.range_regularizer import R2Config, RangeRegularizer

TOL = {"rtol": 1e-5, "atol": 1e-6}
# DKM's soft assignment (temperature 1e-4) amplifies the rounding of the gradient all-reduce: measured 2e-6 absolute
# on gradients of size 0.08.
DKM_TOL = {"rtol": 1e-4, "atol": 1e-5}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(1))


def build() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.blocks[0][0].weight[3, 2] = 2.5  # an outlier on one rank's shard only
        net.head.weight[0, 0] = -1.5
    return net


def shard(net: Net) -> Net:
    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    return net


def task_loss(net: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(net(ids), y)


def full_grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in net.named_parameters()}


def check_r2(rank: int, world: int, ids: torch.Tensor, y: torch.Tensor) -> None:
    half = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    for r2_type in ("linf", "margin", "soft_min_max"):
        for d in (1, 2):
            ref = build()
            ref_reg = RangeRegularizer(ref, R2Config(r2_type, cluster_dim=d))
            ref_range = ref_reg()
            (task_loss(ref, ids, y) + 0.5 * ref_range).backward()

            net = build()
            reg = RangeRegularizer(net, R2Config(r2_type, cluster_dim=d))
            shard(net)
            assert type(net.head.weight).__name__ == "DTensor"
            range_loss = reg()
            (task_loss(net, ids[half], y[half]) + 0.5 * range_loss).backward()

            torch.testing.assert_close(range_loss.detach(), ref_range.detach(), **TOL)
            expected = full_grads(ref)
            for name, grad in full_grads(net).items():
                torch.testing.assert_close(grad, expected[name], **TOL, msg=f"{r2_type} d={d} {name}")
            for got, want in zip(reg.parameters(), ref_reg.parameters(), strict=True):
                torch.testing.assert_close(got.grad, want.grad, **TOL, msg=f"{r2_type} d={d} regularizer")


def check_dkm(rank: int, world: int, ids: torch.Tensor, y: torch.Tensor) -> None:
    half = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    config = DKMConfig(n_bits=2, target_modules=r"blocks\.\d\.\d|head")
    ref = palettize(build(), config)
    net = copy.deepcopy(ref)  # the same k-means initialisation
    shard(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    task_loss(ref, ids, y).backward()
    task_loss(net, ids[half], y[half]).backward()
    expected = full_grads(ref)
    for name, grad in full_grads(net).items():
        torch.testing.assert_close(grad, expected[name], **DKM_TOL, msg=f"dkm {name}")
    ref_opt.step()
    opt.step()

    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        gathered = palettize(build(), config)
        gathered.load_state_dict(state)
        for model in (gathered, ref):
            model.train()
            task_loss(model, ids, y)  # the last training forward sets the centroids finalize uses
        assert set(dkm_layers(gathered)) == set(dkm_layers(ref))
        finalize(gathered, compress=False)
        finalize(ref, compress=False)
        gathered.eval()
        ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(gathered(ids), ref(ids), **DKM_TOL)
            for (name, a), b in zip(gathered.state_dict().items(), ref.state_dict().values(), strict=True):
                torch.testing.assert_close(a, b, **DKM_TOL, msg=f"finalized {name}")


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (4, 5), generator=generator)
    y = torch.randn(4, 4, generator=generator)
    try:
        check_r2(rank, world, ids, y)
        check_dkm(rank, world, ids, y)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print("ok")


if __name__ == "__main__":
    main()

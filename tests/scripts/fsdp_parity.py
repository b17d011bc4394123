"""R² and DKM under FSDP2 (`fully_shard`), FSDP1 (`FullyShardedDataParallel(use_orig_params=True)`) or DDP against one
process on the same global batch (run by tests/test_distributed.py under `torchrun --nproc_per_node 2`, gloo on CPU).

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_parity.py --engine fsdp1
    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_parity.py --engine fsdp2 --device cuda  # 2 GPUs

Each rank trains on its half of the batch; the reference is computed by every rank alone on the whole batch. Checked:
the range loss, the gradients of every weight (gathered) and of the regularizer's own parameters, for every r2_type,
scalar and multi-dimensional, with 1 and 2 accumulated micro-batches (FSDP2 and DDP: the first without gradient
sync, as Accelerate does; FSDP1: synchronized, as R2Trainer configures it); for DKM, the weight gradients after one
forward/backward (clustering must see whole weights), then one SGD step, a full state dict gathered from the shards,
and `finalize` of it on rank 0 against the single-process model. FSDP1 shards the tiny model so that a rank holds a
size-0 piece of some weights and half of others (asserted). Prints "ok" on rank 0 when everything matches; any
mismatch raises.
"""

import argparse
import contextlib
import copy
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import (
    FullStateDictConfig,
    FullyShardedDataParallel,
    ShardingStrategy,
    StateDictType,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

from hf_r2.palettization import DKMConfig, dkm_layers, finalize, palettize
from hf_r2.range_regularizer import R2Config, RangeRegularizer

#: Where the models live: the CPU (gloo) by default, `cuda:<local rank>` (NCCL) with --device cuda.
DEVICE = torch.device("cpu")
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
    return _build().to(DEVICE)


def _build() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.blocks[0][0].weight[3, 2] = 2.5  # an outlier on one rank's shard only
        net.head.weight[0, 0] = -1.5
    return net


def shard(net: Net, engine: str, strategy: str = "FULL_SHARD") -> nn.Module:
    """FSDP: each block, then the root, as its own unit (as a transformer auto-wrap policy does); DDP: the root."""
    if engine == "ddp":
        return DistributedDataParallel(net)
    if engine == "fsdp2":
        for block in net.blocks:
            fully_shard(block, reshard_after_forward=strategy == "FULL_SHARD")
        return fully_shard(net, reshard_after_forward=strategy == "FULL_SHARD")
    kwargs = dict(use_orig_params=True, device_id=DEVICE, sharding_strategy=ShardingStrategy[strategy])
    for i, block in enumerate(net.blocks):
        net.blocks[i] = FullyShardedDataParallel(block, **kwargs)
    return FullyShardedDataParallel(net, **kwargs)


def task_loss(net: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(net(ids), y)


def full_grads(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, by its name in the unwrapped model."""
    if isinstance(net, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(net, with_grads=True):
            return {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in net.named_parameters()}
    if isinstance(net, DistributedDataParallel):
        net = net.module
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in net.named_parameters()}


def full_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, gathered from the shards (on every rank)."""
    if isinstance(net, FullyShardedDataParallel):
        # FSDP1's offload_to_cpu=True (what get_model_state_dict(cpu_offload=True) and Accelerate's FULL_STATE_DICT
        # use) segfaults when the parameters already live on the CPU (torch 2.13); without it the gather works.
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(net, StateDictType.FULL_STATE_DICT, config):
            return net.state_dict()
    if isinstance(net, DistributedDataParallel):
        return net.module.state_dict()
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_pieces(net: Net, world: int) -> None:
    """FSDP1 at rest: every regularized weight is a 1-D piece; some rank holds none of one, and one is split."""
    if world < 2:  # one process (one GPU): nothing is split
        return
    sizes = torch.tensor([[m.weight.numel(), m.weight.dim()] for m in layers(net)], device=DEVICE)
    everyone = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(everyone, sizes)
    numels = torch.stack(everyone)[:, :, 0]  # (rank, layer)
    assert (torch.stack(everyone)[:, :, 1] == 1).all(), "FSDP1 did not flatten the weights"
    assert (numels == 0).any(), "no rank holds a size-0 piece: the test would not cover it"
    assert ((numels > 0).sum(dim=0) == world).any(), "no weight is split over the ranks"


def layers(net: Net) -> list[nn.Module]:
    return [net.emb, *(block[j] for block in net.blocks for j in (0, 2)), net.head]


def no_sync(net: nn.Module, engine: str, last: bool):
    """The accumulation context of a non-final micro-batch: FSDP2 skips its reduce-scatter (Accelerate's `no_sync`);
    FSDP1 keeps synchronizing, as R2Trainer sets it (`sync_each_batch`), since its `no_sync` keeps whole gradients
    on pieces that R²'s gradient cannot be added to."""
    if last or engine == "fsdp1":
        return contextlib.nullcontext()
    if engine == "ddp":
        return net.no_sync()
    net.set_requires_gradient_sync(False)
    return _resync(net)


@contextlib.contextmanager
def _resync(net: nn.Module):
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def check_r2(engine: str, rank: int, world: int, ids: torch.Tensor, y: torch.Tensor) -> None:
    cases = [(t, d, ga, "FULL_SHARD") for t in ("linf", "margin", "soft_min_max") for d in (1, 2) for ga in (1, 2)]
    # Without resharding after the forward the range loss reads whole weights: FSDP1's views, FSDP2's DTensors.
    if engine != "ddp":
        cases += [(t, 1, 1, "SHARD_GRAD_OP") for t in ("linf", "margin", "soft_min_max")]
    for r2_type, d, ga, strategy in cases:
        case = f"{engine} {strategy} {r2_type} d={d} ga={ga}"
        ref = build()
        ref_reg = RangeRegularizer(ref, R2Config(r2_type, cluster_dim=d))
        ref_range = ref_reg()
        (task_loss(ref, ids, y) + 0.5 * ref_range).backward()

        net = build()
        reg = RangeRegularizer(net, R2Config(r2_type, cluster_dim=d))  # before wrapping, as R2Trainer does
        wrapped = shard(net, engine, strategy)
        if engine == "fsdp2":
            assert type(net.head.weight).__name__ == "DTensor"
        elif engine == "fsdp1" and strategy == "FULL_SHARD":
            check_pieces(net, world)
        per_rank = len(ids) // world
        for k in range(ga):
            micro = slice(rank * per_rank + k * per_rank // ga, rank * per_rank + (k + 1) * per_rank // ga)
            with no_sync(wrapped, engine, last=k == ga - 1):
                out = wrapped(ids[micro])
                range_loss = reg()  # after the forward, as in R2Trainer.compute_loss
                (nn.functional.mse_loss(out, y[micro]) / ga + 0.5 * range_loss / ga).backward()
            torch.testing.assert_close(range_loss.detach(), ref_range.detach(), **TOL, msg=case)

        expected = full_grads(ref)
        got = full_grads(wrapped)
        assert set(got) == set(expected), case
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name], **TOL, msg=f"{case} {name}")
        for got_p, want in zip(reg.parameters(), ref_reg.parameters(), strict=True):
            torch.testing.assert_close(got_p.grad, want.grad, **TOL, msg=f"{case} regularizer")


def check_dkm(engine: str, rank: int, world: int, ids: torch.Tensor, y: torch.Tensor) -> None:
    half = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    config = DKMConfig(n_bits=2, target_modules=r"blocks\.\d\.\d|head")
    ref = palettize(build(), config)
    net = shard(copy.deepcopy(ref), engine)  # the same k-means initialisation
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    task_loss(ref, ids, y).backward()
    task_loss(net, ids[half], y[half]).backward()
    expected = full_grads(ref)
    for name, grad in full_grads(net).items():
        torch.testing.assert_close(grad, expected[name], **DKM_TOL, msg=f"{engine} dkm {name}")
    ref_opt.step()
    opt.step()

    if engine != "ddp":  # finalize refuses sharded weights (it needs whole ones): gather a full state dict instead
        try:
            finalize(net, compress=False)
        except ValueError as error:
            assert "finalize needs whole weights, but FSDP shards" in str(error), error
        else:
            raise AssertionError(f"{engine}: finalize accepted sharded weights")
    state = full_state_dict(net)
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
            torch.testing.assert_close(gathered(ids), ref(ids), **DKM_TOL, msg=f"{engine} finalized outputs")
            for (name, a), b in zip(gathered.state_dict().items(), ref.state_dict().values(), strict=True):
                torch.testing.assert_close(a, b, **DKM_TOL, msg=f"{engine} finalized {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", nargs="+", choices=["fsdp1", "fsdp2", "ddp"], default=["fsdp2"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per process, NCCL")
    cli = parser.parse_args()
    global DEVICE, TOL, DKM_TOL
    if cli.device == "cuda":
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(DEVICE)
        # NCCL sums in another order than one process does (fp32, TF32 off by default for matmuls).
        TOL = {key: 10 * value for key, value in TOL.items()}
        DKM_TOL = {key: 10 * value for key, value in DKM_TOL.items()}
    dist.init_process_group("nccl" if cli.device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    batch = max(4, 2 * world)  # every rank gets 2 or more samples, so 2 micro-batches of 1 or more
    ids = torch.randint(0, 12, (batch, 5), generator=generator).to(DEVICE)
    y = torch.randn(batch, 4, generator=generator).to(DEVICE)
    try:
        for engine in cli.engine:  # several in one launch: start-up dominates
            check_r2(engine, rank, world, ids, y)
            check_dkm(engine, rank, world, ids, y)
        dist.barrier()  # rank 0 finalizes alone: leave together
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print("ok")


if __name__ == "__main__":
    main()

"""Two CPU processes (gloo): lazily initialized quantizer state and calibrated ranges agree across processes."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hf_r2.quantization import EWGSConfig, PACTConfig, PTQConfig, calibrate, estimate_ewgs_deltas, quantize


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Each process sees different data; rank 1's first batch has negatives, rank 0's does not.
        g = torch.Generator().manual_seed(rank)
        x = torch.rand(16, 6, generator=g) * (rank + 1) - 0.5 * rank
        y = torch.randint(0, 3, (16,), generator=g)
        ewgs = quantize(_model(), EWGSConfig(w_bits=2, a_bits=3))
        ewgs(x)
        deltas = estimate_ewgs_deltas(ewgs, lambda: nn.functional.cross_entropy(ewgs(x), y), num_samples=2)
        pact = quantize(_model(), PACTConfig(w_bits=2, a_bits=2))
        pact(x)
        ptq = calibrate(quantize(_model(), PTQConfig(w_bits=2, a_bits=4)), [x])
        state = {
            "ewgs": {k: v.clone() for k, v in ewgs.state_dict().items()},
            "deltas": deltas,
            "pact_signed": int(pact[0].input_quantizer.signed),
            "ptq": {k: v.clone() for k, v in ptq.state_dict().items() if "_val" in k},
            "local_min": x.min().item(),
        }
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_agree_on_lazy_init_and_calibration(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["local_min"] >= 0 > r1["local_min"]
    for key in r0["ewgs"]:
        assert torch.equal(r0["ewgs"][key], r1["ewgs"][key]), key
    assert int(r0["ewgs"]["0.input_quantizer.signed"]) == 1  # negatives on one process make every process signed
    assert r0["deltas"] == r1["deltas"]
    assert r0["pact_signed"] == r1["pact_signed"] == 1
    for key in r0["ptq"]:
        assert torch.equal(r0["ptq"][key], r1["ptq"][key]), key
    assert r0["ptq"]["0.input_quantizer.min_val"].item() == pytest.approx(r1["local_min"])

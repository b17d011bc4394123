"""Benchmark: does R² (L-inf) help 2-bit PTQ and 2-bit LSQ? A tiny CNN on scikit-learn's digits, with and without R².

    python benchmarks/quantization_digits.py --r2_weight 0.1 0 1 2     # seeds 0 1 2, about 30 s

prints, per seed and averaged, float accuracy, the largest |w|, 2-bit PTQ (per-tensor, and per-channel with 8-bit
activations) and 2-bit LSQ (weights and activations) accuracy. `tests/test_quantization_digits.py` runs the same
pipeline briefly and checks only that it runs and gives finite numbers; the numbers are in docs/quantization.md.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hf_r2.quantization import LSQConfig, PTQConfig, calibrate, finalize, quantize
from hf_r2.range_regularizer import R2Config, RangeRegularizer


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.5
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = 1400
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def train(model, data, *, epochs, lr, r2_weight=0.0, seed=0, batch_size=64):
    """Adam on cross-entropy, plus `r2_weight * RangeRegularizer(linf)` over every Linear/Conv2d when > 0."""
    x, y = data
    reg = RangeRegularizer(model, R2Config(r2_type="linf", target_modules=None)) if r2_weight else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if reg is not None:
                loss = loss + r2_weight * reg()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data
    return (model(x).argmax(-1) == y).float().mean().item()


def max_abs_weight(model) -> float:
    return max(m.weight.detach().abs().max().item() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))


def run(seed: int = 0, *, epochs: int = 8, qat_epochs: int = 2, r2_weight: float = 0.01) -> dict[str, dict]:
    """Trains the base models and returns, for `none` and `linf`, float / 2-bit PTQ / 2-bit LSQ test accuracies."""
    train_data, test_data = load_digits_tensors(seed)
    results = {}
    for name, weight in (("none", 0.0), ("linf", r2_weight)):
        torch.manual_seed(seed)
        base = train(tiny_cnn(), train_data, epochs=epochs, lr=3e-3, r2_weight=weight, seed=seed)
        row = {"float": accuracy(base, test_data), "max|w|": max_abs_weight(base)}

        ptq = quantize(copy.deepcopy(base), PTQConfig(w_bits=2, a_bits=8))
        calibrate(ptq, [train_data[0][:256]])
        row["ptq_w2a8"] = accuracy(finalize(ptq), test_data)
        ptq_tensor = quantize(copy.deepcopy(base), PTQConfig(w_bits=2, per_channel=False))
        row["ptq_w2_tensor"] = accuracy(finalize(ptq_tensor), test_data)

        lsq = quantize(copy.deepcopy(base), LSQConfig(w_bits=2, a_bits=2))
        calibrate(lsq, [train_data[0][:256]])
        row["lsq_w2a2_init"] = accuracy(lsq, test_data)
        train(lsq, train_data, epochs=qat_epochs, lr=1e-3, seed=seed)
        row["lsq_w2a2"] = accuracy(finalize(lsq), test_data)
        results[name] = row
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--r2_weight", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--qat_epochs", type=int, default=2)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    rows = {"none": [], "linf": []}
    for s in cli.seeds:
        for name, row in run(seed=s, epochs=cli.epochs, qat_epochs=cli.qat_epochs, r2_weight=cli.r2_weight).items():
            rows[name].append(row)
            print(f"seed {s} {name:5s} " + "  ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
    for name, rs in rows.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
        print(f"mean over {len(rs)} seeds, {name:5s}: " + "  ".join(f"{k}={v:.4f}" for k, v in mean.items()))

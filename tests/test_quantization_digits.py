"""Real data (sklearn digits): a tiny CNN trained with and without R² (L-inf), then 2-bit PTQ and 2-bit LSQ.

Only checks that the pipeline of `benchmarks/quantization_digits.py` runs and yields finite accuracies; the comparison
itself is that benchmark's job (numbers in docs/quantization.md).
"""

import math

import torch
from quantization_digits import run


def test_digits_with_and_without_r2_then_2bit_ptq_and_lsq():
    threads = torch.get_num_threads()
    # Tiny matmuls: one thread is ~50x faster than several on a shared, loaded machine.
    torch.set_num_threads(1)
    try:
        results = run(seed=0, epochs=3, qat_epochs=1)
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {"none", "linf"}
    for row in results.values():
        assert set(row) == {"float", "max|w|", "ptq_w2a8", "ptq_w2_tensor", "lsq_w2a2_init", "lsq_w2a2"}
        for value in row.values():
            assert math.isfinite(value)
        assert all(0.0 <= row[k] <= 1.0 for k in row if k != "max|w|")
        assert row["float"] > 0.3  # it did learn: chance is 0.1

"""Shared test set-up: offline Hugging Face libraries; `tests/scripts` and `benchmarks` importable (shared runs)."""

import os
import sys

import pytest

# No test may reach the Hugging Face Hub (the CI machines are offline): forced, not defaulted, so that an
# HF_HUB_OFFLINE=0 in the caller's environment cannot let a test download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
for _path in (SCRIPTS_DIR, BENCHMARKS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture
def one_thread():
    """Runs a test with one torch thread: tiny tensors gain nothing from more, and the CI machine's 2 cores are shared
    by the whole suite (several times faster here). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

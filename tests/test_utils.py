import os
import stat
import subprocess
import sys

import pytest
import torch
from torch import nn

from hf_r2.utils import (
    atomic_path,
    check_cluster_dim,
    make_temp_dir_beside,
    recover_replaced_dir,
    remove_stale_temp_dirs,
    replace_dir,
    select_modules,
    vectors_to_weight,
    weight_to_vectors,
)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
        self.head = nn.Linear(4, 2)


def slow_vectors(weight, d):
    """Vector k = channels g*d .. g*d+d-1 at flattened input position p, k = g * rest + p."""
    flat = weight.reshape(weight.shape[0], -1)
    rest = flat.shape[1]
    return torch.stack(
        [torch.stack([flat[g * d + j, p] for j in range(d)]) for g in range(weight.shape[0] // d) for p in range(rest)]
    )


@pytest.mark.parametrize("shape", [(8, 6), (4, 3, 2, 2), (6, 5)])
@pytest.mark.parametrize("d", [1, 2])
def test_vector_layout_matches_slow_reference_and_round_trips(shape, d):
    weight = torch.randn(shape)
    vectors = weight_to_vectors(weight, d)
    assert torch.equal(vectors, slow_vectors(weight, d))
    assert torch.equal(vectors_to_weight(vectors, shape, d), weight)


def test_cluster_dim_errors_name_the_value():
    with pytest.raises(ValueError, match="cluster_dim=3 does not divide the 8 output channels"):
        check_cluster_dim(3, (8, 4))
    with pytest.raises(ValueError, match="cluster_dim must be an integer >= 1, got 0"):
        check_cluster_dim(0, (8, 4))


def test_select_modules_default_names_regex_and_exclusion():
    model = TinyNet()
    default = select_modules(model, (nn.Linear, nn.Conv2d, nn.Embedding))
    assert list(default) == ["embed", "conv", "block.0", "block.2", "head"]
    assert list(select_modules(model, (nn.Linear,), ["0", "head"])) == ["block.0", "head"]
    assert list(select_modules(model, (nn.Linear,), r"block\.\d")) == ["block.0", "block.2"]
    assert list(select_modules(model, (nn.Linear,), exclude_modules=["head"])) == ["block.0", "block.2"]


def test_select_modules_errors():
    model = TinyNet()
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module"):
        select_modules(model, (nn.Linear,), ["nope"])
    with pytest.raises(ValueError, match="'block.1' is a LayerNorm, which quant does not support"):
        select_modules(model, (nn.Linear,), ["1"], what="quant")
    with pytest.raises(ValueError, match="found no layer"):
        select_modules(model, (nn.Conv1d,))


def test_atomic_path_replaces_only_on_success_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "report.md"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_atomic_path_gives_the_file_the_usual_permissions(tmp_path):
    # mkstemp's 0600 would be carried over by the rename: the file must look like one written with open().
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_path(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode


def test_replace_dir_swaps_in_the_new_folder_and_restores_the_old_one_on_failure(tmp_path, monkeypatch):
    folder, new = tmp_path / "data", tmp_path / ".data.tmp"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, folder)
    assert [p.name for p in folder.iterdir()] == ["new.txt"] and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no backup left behind

    newer = tmp_path / ".data.tmp2"
    newer.mkdir()
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # moving the new folder into place
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        replace_dir(newer, folder)
    assert (folder / "new.txt").read_text() == "new"  # the previous folder is back


def exited_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_replace_dir_killed_between_its_renames_is_recovered(tmp_path):
    folder = tmp_path / "data"
    pid = exited_pid()
    stranded = tmp_path / f".data.old-{pid}"  # the old folder, renamed aside; the new one never arrived
    stranded.mkdir()
    (stranded / "old.txt").write_text("old")
    running = tmp_path / f".data.old-{os.getpid()}"  # a swap of a live process (this one) is left alone
    running.mkdir()
    assert recover_replaced_dir(folder) == stranded
    assert (folder / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "data"]

    # Killed after the second rename: the folder is complete, the old one aside is removed.
    stale = tmp_path / f".data.old-{pid}"
    stale.mkdir()
    assert recover_replaced_dir(folder) is None
    assert not stale.exists() and (folder / "old.txt").exists()

    # `owned` guards what is touched.
    stale.mkdir()
    assert recover_replaced_dir(folder, owned=lambda p: False) is None and stale.exists()


def test_temp_dirs_beside_a_target_get_the_umask_and_stale_ones_are_removed(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    tmp = make_temp_dir_beside(tmp_path / "out")
    assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
    assert stat.S_IMODE(tmp.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not mkdtemp's 0700
    left = tmp_path / f".out.tmp-{exited_pid()}-00ff00ff00ff"
    left.mkdir()
    assert remove_stale_temp_dirs(tmp_path / "out") == [left]
    assert tmp.exists() and not left.exists()  # this process's own temporary folder is in use


def test_hf_quantization_methods_are_registered_once_on_import():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    import hf_r2  # noqa: F401  (registers both methods)
    from hf_r2.palettization.quantizer import PalettizationHfQuantizer, PalettizationQuantizationConfig
    from hf_r2.quantization.hf_quantizer import HfR2QuantizationConfig, HfR2Quantizer
    from hf_r2.utils import register_hf_quantization_method

    expected = {
        "hf_r2_palettization": (PalettizationQuantizationConfig, PalettizationHfQuantizer),
        "hf_r2_quantization": (HfR2QuantizationConfig, HfR2Quantizer),
    }
    for method, (config_cls, quantizer_cls) in expected.items():
        register_hf_quantization_method(method, dict, object)  # a second registration changes nothing
        assert AUTO_QUANTIZATION_CONFIG_MAPPING[method] is config_cls
        assert AUTO_QUANTIZER_MAPPING[method] is quantizer_cls

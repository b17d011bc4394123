"""Helpers shared by regularization, palettization and quantization.

Two conventions live here so that every part of hf_r2 agrees on them (and `atomic_path`, through which files are
written):

* **Module selection** (`select_modules`): peft-style `target_modules` / `exclude_modules`, given as a list of names
  (a module matches when its full name equals the entry or ends with `.entry`, and so does everything beneath it)
  or as one regular expression (matched in full against the module name). An entry that matches nothing is an error.
* **Vector layout** (`weight_to_vectors` / `vectors_to_weight`): for vector palettization and the multi-dimensional
  regularizers, a weight of shape `(out, ...)` is seen as a set of `cluster_dim`-dimensional vectors, each made of
  `cluster_dim` consecutive output channels at one input position (the layout coremltools uses).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer

ModulePattern = str | Sequence[str] | None

# Characters that never occur in a module name but do in a regular expression (`.` occurs in both): a command-line
# pattern holding one of them is a regex, otherwise a list of names.
REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def is_module_regex(entry: str) -> bool:
    """Whether a command-line module pattern entry is a regular expression (it holds `REGEX_CHARS` syntax)."""
    return REGEX_CHARS.search(entry) is not None


def check_module_regex(pattern: str, name: str = "module pattern") -> str:
    """Returns `pattern` if it compiles, else raises a `ValueError` naming the flag `name` and the pattern."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}={pattern!r} is not a valid regular expression: {err}.") from err
    return pattern


def _matches(name: str, pattern: str | Sequence[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(_entry_covers(name, entry) for entry in pattern)


def _entry_covers(name: str, entry: str) -> bool:
    """Whether module `name` is the module a name entry designates (full name, or `.entry` suffix) or lies beneath it
    (`--quant_target_modules attention` means every layer inside every `...attention` block)."""
    padded = f".{name}."
    return f".{entry}." in padded


def select_modules(
    model: nn.Module,
    supported_types: tuple[type[nn.Module], ...],
    target_modules: ModulePattern = None,
    exclude_modules: ModulePattern = None,
    *,
    what: str = "this transform",
) -> dict[str, nn.Module]:
    """Returns the modules of `model` that a transform applies to, by name, in `named_modules` order.

    Args:
        model (`nn.Module`): The model to search.
        supported_types (`tuple[type]`): Layer types the transform can handle.
        target_modules (`str` or `list[str]`, *optional*): Names or one regex (full match). A name designates the
            modules whose full name equals it or ends with `.name`, and everything beneath them (so `attention`
            selects every supported layer inside each `...attention` block). Defaults to every module of a supported
            type.
        exclude_modules (`str` or `list[str]`, *optional*): Same syntax; matching modules (and what lies beneath
            them) are skipped.
        what (`str`, *optional*): Name of the transform, used in error messages.

    Raises:
        ValueError: If a listed target or exclude name matches no module, if a list mixes a regular expression into
            names (a regex must be the only entry), if a module selected explicitly by name has a type the transform
            cannot handle, if a target name selects no supported layer, or if nothing is selected at all.
    """
    names = [n for n, _ in model.named_modules() if n]
    patterns = {}
    for label, pattern in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if pattern is None or isinstance(pattern, str):
            patterns[label] = pattern
            continue
        pattern = list(pattern)
        regexes = [entry for entry in pattern if REGEX_CHARS.search(entry)]
        if regexes:
            raise ValueError(
                f"{label} {pattern} mixes module names with regular-expression syntax ({regexes}): a regular "
                "expression must stand alone (pass it as the only entry, a string), names are matched literally."
            )
        unknown = [entry for entry in pattern if not any(_entry_covers(n, entry) for n in names)]
        if unknown:
            raise ValueError(f"{label} {unknown} match no module of {type(model).__name__} for {what}.")
        patterns[label] = pattern
    target_modules, exclude_modules = patterns["target_modules"], patterns["exclude_modules"]

    selected: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if target_modules is None:
            if isinstance(module, supported_types):
                selected[name] = module
            continue
        if not _matches(name, target_modules):
            continue
        if isinstance(module, supported_types):
            selected[name] = module
        elif (
            not isinstance(target_modules, str)
            and not any(True for _ in module.children())
            and any(name == entry or name.endswith("." + entry) for entry in target_modules)
        ):  # an unsupported leaf named itself, not one merely inside a named block
            allowed = ", ".join(t.__name__ for t in supported_types)
            raise ValueError(
                f"Module {name!r} is a {type(module).__name__}, which {what} does not support (supported: {allowed})."
            )
    if target_modules is not None and not isinstance(target_modules, str):
        empty = [entry for entry in target_modules if not any(_entry_covers(n, entry) for n in selected)]
        if empty:
            allowed = ", ".join(t.__name__ for t in supported_types)
            raise ValueError(
                f"target_modules {empty} name modules of {type(model).__name__} that hold no layer {what} supports "
                f"({allowed}), or only excluded ones."
            )
    if not selected:
        raise ValueError(
            f"{what} found no layer to apply to in {type(model).__name__} "
            f"(target_modules={target_modules!r}, exclude_modules={exclude_modules!r})."
        )
    return selected


# The hyper-parameters that define each swappable layer type besides its tensors (what `layer_shell` copies).
_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)
_EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")
LAYER_ATTRS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv2d: _CONV_ATTRS,
    nn.Embedding: (*_EMBEDDING_ATTRS, "sparse"),
    Conv1D: ("nf", "nx"),
}


def layer_shell(cls: type[nn.Module], source: nn.Module) -> nn.Module:
    """A new `cls` layer standing in for `source`, the one way hf_r2 swaps a layer for its compressed form and back.

    The shell has `source`'s hyper-parameters (`LAYER_ATTRS` of its layer type), training mode and `bias` (the same
    parameter object), and no weight yet: the caller sets `weight` (or the buffers that replace it), so nothing of
    the weight's size is allocated twice. Put it in place with `replace_submodule`.
    """
    attrs = next((a for base, a in LAYER_ATTRS.items() if isinstance(source, base)), None)
    if attrs is None:
        raise TypeError(f"Cannot swap a {type(source).__name__}; swappable: {[t.__name__ for t in LAYER_ATTRS]}.")
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for attr in attrs:
        setattr(new, attr, getattr(source, attr))
    new.train(source.training)
    if hasattr(source, "bias"):
        new.bias = source.bias
    return new


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts `new` in place of `model`'s submodule `name` (full dotted name)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def check_bits(bits: int, name: str = "bits") -> None:
    """Raises a `ValueError` unless `bits` is an integer in 1..8 (the bit widths of palettization and quantization)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"{name} must be an integer in 1..8, got {bits!r}.")


def check_cluster_dim(cluster_dim: int, weight_shape: Iterable[int] | None = None, name: str = "weight") -> None:
    """Raises a `ValueError` if `cluster_dim` is not a positive integer dividing the output channels (the first entry
    of `weight_shape`; without a shape, only the integer is checked)."""
    if not isinstance(cluster_dim, int) or isinstance(cluster_dim, bool) or cluster_dim < 1:
        raise ValueError(f"cluster_dim must be an integer >= 1, got {cluster_dim!r}.")
    if weight_shape is None:
        return
    shape = tuple(weight_shape)
    if shape[0] % cluster_dim:
        raise ValueError(
            f"cluster_dim={cluster_dim} does not divide the {shape[0]} output channels of {name} (shape {shape}); "
            f"choose a divisor of {shape[0]}."
        )


def weight_to_vectors(weight: torch.Tensor, cluster_dim: int = 1) -> torch.Tensor:
    """Views a weight of shape `(out, ...)` as `(out * rest / cluster_dim, cluster_dim)` vectors.

    Vector `k` of the result holds output channels `g*d ... g*d + d-1` at input position `p`, with `k = g * rest + p`.
    For `cluster_dim == 1` this is `weight.reshape(-1, 1)`.
    """
    check_cluster_dim(cluster_dim, weight.shape)
    if cluster_dim == 1:
        return weight.reshape(-1, 1)
    out = weight.shape[0]
    return weight.reshape(out // cluster_dim, cluster_dim, -1).transpose(1, 2).reshape(-1, cluster_dim)


def vectors_to_weight(vectors: torch.Tensor, shape: Sequence[int], cluster_dim: int = 1) -> torch.Tensor:
    """Inverse of `weight_to_vectors`."""
    shape = tuple(shape)
    if cluster_dim == 1:
        return vectors.reshape(shape)
    out = shape[0]
    return vectors.reshape(out // cluster_dim, -1, cluster_dim).transpose(1, 2).reshape(shape)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; once the block succeeds, it is renamed onto `path` in one step.

    Readers see either the old file or the complete new one, never a partial write; on an error the temporary file is
    removed and `path` is left as it was. The parent folder is created if needed.

    Example:
        ```python
        with atomic_path("out/report.md") as tmp:
            tmp.write_text(text)
        ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name rather than `mkstemp`: the writer creates the file, so it gets the usual permissions
    # (umask) instead of mkstemp's 0600, which `os.replace` would carry over to `path`.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def public_source_name(name_or_path: str | os.PathLike | None, keep_parent: bool = False) -> tuple[str | None, bool]:
    """How a model card names a model or dataset given by Hub id or local path, without revealing a local path.

    Every card hf_r2 writes (the publish folder's, `R2Trainer.create_model_card`'s) names its sources through this
    function, so that no card publishes the user's file-system layout.

    Returns `(name, is_local)`: a Hub id is kept; a folder of the Hugging Face cache (`.../models--org--name/...`)
    gives back its Hub id; any other local path (or an absolute path that does not exist here) gives its last
    component (with `keep_parent`, its parent folder's name too, e.g. `qnli-squad/train.jsonl`).
    """
    if name_or_path is None or not str(name_or_path):
        return None, False
    text = str(name_or_path)
    if not os.path.isabs(text) and not os.path.exists(text) and text.count("/") <= 1 and not text.startswith("."):
        return text, False  # a Hub id (or a plain name)
    path = Path(os.path.abspath(text))
    for part in path.parts:
        match = re.fullmatch(r"(?:models|datasets)--(.+)", part)
        if match and os.path.exists(text):
            return match.group(1).replace("--", "/"), False
    name = path.name
    if keep_parent and path.parent.name and not path.is_dir():
        name = f"{path.parent.name}/{name}"
    return name, True


def make_temp_dir_beside(target: str | os.PathLike) -> Path:
    """Creates and returns an empty, uniquely named folder next to `target` to build its new contents in.

    The folder is named `.<target name>.tmp-<pid>-<random>` (so `remove_stale_temp_dirs` can tell whose it is) and is
    created with the usual permissions (the umask), not `tempfile.mkdtemp`'s 0700, which `replace_dir`'s rename would
    carry over to `target`. The parent folder is created if needed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            tmp.mkdir()
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        return tmp


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - e.g. an id out of range
        return False
    return True


def _siblings(folder: Path, kind: str) -> list[tuple[Path, int]]:
    """`(path, pid)` of the `.<name>.<kind>-<pid>...` folders next to `folder` whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.{kind}-(\d+)(?:-[0-9a-f]+)?")
    if not folder.parent.is_dir():
        return []
    found = []
    for entry in folder.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
            found.append((entry, int(match.group(1))))
    return found


def remove_stale_temp_dirs(target: str | os.PathLike, owned: Callable[[Path], bool] = lambda path: True) -> list[Path]:
    """Removes the `make_temp_dir_beside(target)` folders left by processes that were killed while building them.

    Only folders named by `make_temp_dir_beside` for this `target`, whose process no longer runs and for which
    `owned(path)` is true, are removed. Returns them.
    """
    removed = []
    for tmp, _ in _siblings(Path(target), "tmp"):
        if owned(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def recover_replaced_dir(folder: str | os.PathLike, owned: Callable[[Path], bool] = lambda path: True) -> Path | None:
    """Repairs what a `replace_dir` killed halfway left behind next to `folder`.

    `replace_dir` renames the old folder aside to `.<name>.old-<pid>`, renames the new one into place, then deletes
    the old one. Killed between the two renames, it leaves no `folder` and the old one aside: it is renamed back (the
    newest, if several). Killed after the second rename, the old one is left aside although `folder` is complete: it
    is removed, provided `owned(folder)` holds too (the folder in place is one the caller made). Only
    `.<name>.old-<pid>` folders of processes that no longer run, and for which `owned(path)` is true, are touched.

    Returns:
        `Path` or `None`: The folder restored to `folder`, if any.
    """
    folder = Path(folder)
    backups = sorted((b for b, _ in _siblings(folder, "old") if owned(b)), key=lambda b: b.stat().st_mtime)
    restored = None
    if backups and not os.path.lexists(folder):
        restored = backups.pop()
        os.replace(restored, folder)
    if owned(folder):
        for backup in backups:
            shutil.rmtree(backup, ignore_errors=True)
    return restored


def replace_dir(tmp: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Moves the finished folder `tmp` to `folder`; an existing `folder` is replaced only once `tmp` is complete.

    The old folder is renamed aside first (to `.<name>.old-<pid>`) and restored if the move fails, so `folder` is
    never left half-written; a process killed between the two renames leaves the old folder aside, which
    `recover_replaced_dir` (called here first, and by callers before they start work) puts back. `tmp` should sit next
    to `folder` (same file system) for the renames to be atomic; `make_temp_dir_beside` creates it there.

    Callers decide whether `folder` may be replaced at all: this function replaces whatever is there.
    """
    tmp, folder = Path(tmp), Path(folder)
    recover_replaced_dir(folder)
    backup = None
    if folder.exists():
        backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(folder, backup)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if backup is not None:
            os.replace(backup, folder)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def register_hf_quantization_method(method: str, config_cls: type, quantizer_cls: type) -> None:
    """Registers a quantization config and its `HfQuantizer` with transformers under `method`, once.

    Idempotent (a module imported again, or reloaded, registers nothing twice), so that `from_pretrained` finds the
    loader of checkpoints whose `config.json` names `method`.
    """
    from transformers.quantizers import register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(method)(config_cls)
    if method not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(method)(quantizer_cls)


class CheckpointHfQuantizer(HfQuantizer):
    """Base of hf_r2's transformers loaders (`from_pretrained` of palettized and of quantized checkpoints).

    They load checkpoints that hf_r2 wrote: compressing happens in training or calibration, never at load time
    (`requires_calibration`), nothing beyond hf_r2 is needed (`validate_environment`), a loaded model saves back to
    the same format (`is_serializable`), and `Trainer` may evaluate or fine-tune it: the compressed weights stay frozen,
    biases, norms and uncompressed layers train as usual (`is_trainable`). Subclasses set `is_qat_trainable`.
    """

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        return

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def tied_weight_groups(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter name that shares its tensor with another name, mapped to all names of that tensor (sorted).

    Ties are found both by identity (one `nn.Parameter` under several modules, as `tie_weights` makes them) and from
    transformers' declared ties (`all_tied_weights_keys`), so a model whose ties are declared but not yet applied is
    caught too.
    """
    names_by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(parameter), []).append(name)
    groups = [set(names) for names in names_by_tensor.values() if len(names) > 1]
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in dict(declared).items():
        groups.append({target, source})
    merged: list[set[str]] = []
    for group in groups:
        overlapping = [g for g in merged if g & group]
        for g in overlapping:
            merged.remove(g)
            group |= g
        merged.append(group)
    return {name: sorted(group) for group in merged for name in group}


def refuse_multihead_attention(model: nn.Module, selected: Iterable[str], what: str) -> None:
    """Raises a `ValueError` if `selected` holds the `out_proj` of an `nn.MultiheadAttention`.

    `nn.MultiheadAttention` computes with `in_proj_weight` and `out_proj.weight` directly
    (`F.multi_head_attention_forward`), never calling `out_proj.forward`: a swapped-in compressed `out_proj` would be
    counted as compressed but never used, and `in_proj_weight` (not a layer) cannot be swapped at all.
    """
    selected = set(selected)
    attention = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and f"{name}.out_proj" in selected
    ]
    if attention:
        raise ValueError(
            f"{what} cannot compress nn.MultiheadAttention {attention!r}: it computes with in_proj_weight and "
            "out_proj.weight directly, so a replaced out_proj would never run and in_proj_weight cannot be replaced. "
            f"Leave it in full precision with exclude_modules={attention!r} (together with your other exclusions)."
        )


class LiveChoices(Sequence):
    """A read-only sequence of names read from a registry at every use, after fixed leading entries (`"none"`).

    Used as the argparse `choices` of a flag whose values are registered names (`--r2_type`, `--quant_method`): a
    method registered after the flags were declared is accepted and listed too.

    Args:
        names (`Callable[[], Iterable[str]]`): Returns the registered names.
        *leading (`str`): Entries listed first (e.g. `"none"`).
    """

    def __init__(self, names: Callable[[], Iterable[str]], *leading: str) -> None:
        self._source = names
        self._leading = leading

    def _names(self) -> list[str]:
        return [*self._leading, *self._source()]

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __repr__(self) -> str:
        return repr(self._names())

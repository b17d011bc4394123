"""Compact palettized checkpoints: bit packing, compressed layers, save -> from_pretrained, corruption, size report."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_mobilebert
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    MobileBertModel,
    ResNetConfig,
    ResNetForImageClassification,
)

import hf_r2.palettization.format as palettization_format
import hf_r2.palettization.quantizer  # noqa: F401  (registers "hf_r2_palettization"; `import hf_r2` will do it)
from hf_r2.palettization.compressed import (
    PalettizedConv2d,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedMixin,
    attach_palettization_config,
    decode_palettized,
    pack_indices,
    packed_num_bytes,
    palettized_modules,
    to_palettized,
    unpack_indices,
    unpalettize,
)
from hf_r2.palettization.quantizer import PalettizationQuantizationConfig
from hf_r2.palettization.serialization import palettized_size_report, save_palettized
from hf_r2.utils import weight_to_vectors

MIB = 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Independent references and helpers
# ---------------------------------------------------------------------------------------------------------------------


def slow_pack(indices, n_bits):
    """Bit-by-bit reference of the documented layout: LSB-first stream, stream bit j = bit j % 8 of byte j // 8."""
    stream = []
    for value in indices:
        stream += [(int(value) >> i) & 1 for i in range(n_bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[8 * k + i] << i for i in range(8)) for k in range(len(stream) // 8))


def slow_decode(lut, indices, shape, d):
    """Dense weight from the vector layout written out by hand: vector k = g * rest + p holds out channels g*d..g*d+d-1
    at flattened input position p."""
    out = shape[0]
    rest = math.prod(shape[1:])
    weight = torch.empty(out, rest, dtype=lut.dtype)
    for k, row in enumerate(indices.tolist()):
        g, p = divmod(k, rest)
        for j in range(d):
            weight[g * d + j, p] = lut[row, j]
    return weight.reshape(shape)


def hard_assignment(weight, n_bits, d, iters=2):
    """A tiny k-means (spread init + Lloyd) on the layer's d-vectors: the (lut, indices) a DKM finalize would give."""
    vectors = weight_to_vectors(weight.detach(), d)
    k = min(1 << n_bits, len(vectors))
    order = vectors[:, 0].argsort()
    lut = vectors[order[torch.linspace(0, len(order) - 1, k).long()]].clone()

    def nearest(lut):
        if d > 1:
            return torch.cdist(vectors, lut).argmin(dim=1)
        # Scalars: the nearest centroid is found by binary search between sorted centroids' midpoints.
        values, order = lut[:, 0].sort()
        return order[torch.bucketize(vectors[:, 0], (values[1:] + values[:-1]) / 2)]

    for _ in range(iters):
        indices = nearest(lut)
        counts = torch.bincount(indices, minlength=k).unsqueeze(1)
        sums = torch.zeros_like(lut).index_add_(0, indices, vectors)
        lut = torch.where(counts > 0, sums / counts.clamp(min=1), lut)
    return lut, nearest(lut)


def palettize_model(model, bits_for):
    """Replaces every Linear/Conv2d/Embedding for which `bits_for(name, module)` gives (n_bits, d)."""
    layers = {}
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Linear, nn.Conv2d, nn.Embedding):
            continue
        spec = bits_for(name, module)
        if spec is None:
            continue
        n_bits, d = spec
        lut, indices = hard_assignment(module.weight, n_bits, d)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, to_palettized(module, lut, indices, n_bits, d))
        layers[name] = {"n_bits": n_bits, "cluster_dim": d}
    attach_palettization_config(model, layers)
    return layers


def ideal_bytes(dense_state, model, layers):
    """Palettized weights at b/d bits + their stored LUTs and checksums (3 int64 each, format version 2) + every other
    tensor at its dtype, from the dense state."""
    total = 0.0
    for key, tensor in dense_state.items():
        module_name = key.rpartition(".")[0]
        if key.endswith(".weight") and module_name in layers:
            spec = layers[module_name]
            lut = model.get_submodule(module_name).weight_lut
            total += tensor.numel() / spec["cluster_dim"] * spec["n_bits"] / 8 + lut.numel() * 4 + 3 * 8
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def mobilebert(vocab_size=8000, **kwargs):
    """A MobileBERT of 2 layers, 128 wide (MobileBertConfig's default dropout), in eval mode."""
    return tiny_mobilebert(
        0,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        hidden_size=128,
        embedding_size=64,
        true_hidden_size=64,
        intra_bottleneck_size=64,
        intermediate_size=256,
        num_feedforward_networks=2,
        max_position_embeddings=128,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.1,
        **kwargs,
    ).eval()


def resnet():
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[64, 128, 256], depths=[1, 1, 1], layer_type="basic", num_labels=5
    )
    torch.manual_seed(0)
    model = ResNetForImageClassification(config).eval()
    # Non-trivial BatchNorm statistics, so the round trip also checks the uncompressed buffers.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def weights_size(directory):
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bits", range(1, 9))
def test_pack_matches_slow_reference_and_unpacks(n_bits, monkeypatch):
    generator = torch.Generator().manual_seed(n_bits)
    for small_chunks in (False, True):
        if small_chunks:  # the chunked path of long tensors, on short ones
            monkeypatch.setattr(palettization_format, "_CHUNK", 16)
        for length in (0, 1, 7, 8, 13, 37, 100):
            indices = torch.randint(0, 1 << n_bits, (length,), generator=generator)
            packed = pack_indices(indices, n_bits)
            assert packed.dtype == torch.uint8
            assert packed.numel() == packed_num_bytes(length, n_bits) == math.ceil(length * n_bits / 8)
            assert bytes(packed.tolist()) == slow_pack(indices, n_bits)
            assert torch.equal(unpack_indices(packed, length, n_bits), indices)
    extremes = torch.tensor([0, (1 << n_bits) - 1] * 5)
    assert torch.equal(unpack_indices(pack_indices(extremes, n_bits), 10, n_bits), extremes)


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="n_bits must be an integer in 1..8, got 9"):
        pack_indices(torch.zeros(4, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="n_bits must be an integer in 1..8, got 0"):
        pack_indices(torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\).*\[0, 4\]"):
        pack_indices(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        pack_indices(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="hold 3 bytes, but 16 indices at n_bits=2 need 4"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 16, 2)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_indices(torch.zeros(4, dtype=torch.int16), 16, 2)


def test_decode_rejects_nonzero_padding_bits():
    lut = torch.tensor([[0.0], [1.0]])
    packed = pack_indices(torch.tensor([1, 0, 1]), 1)  # 3 bits used, 5 padding bits
    dense, _ = decode_palettized(packed, lut, (3, 1), 1, 1, name="layer")
    assert dense.flatten().tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="'layer'.*padding bits"):
        decode_palettized(packed | 0b1000_0000, lut, (3, 1), 1, 1, name="layer")


# ---------------------------------------------------------------------------------------------------------------------
# Compressed layers
# ---------------------------------------------------------------------------------------------------------------------

LAYER_CASES = [
    ("linear", lambda: nn.Linear(12, 8), lambda m, x: F.linear(x, *m), (5, 12)),
    ("conv2d", lambda: nn.Conv2d(3, 8, 3, padding=1), lambda m, x: F.conv2d(x, *m, padding=1), (2, 3, 6, 6)),
    ("embedding", lambda: nn.Embedding(16, 6, padding_idx=0), None, None),
]


@pytest.mark.parametrize("n_bits, d", [(1, 1), (3, 1), (2, 2), (4, 4)])
@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_to_palettized_decodes_the_documented_layout(case, n_bits, d):
    _, make, functional, input_shape = case
    torch.manual_seed(n_bits * 10 + d)
    layer = make()
    lut, indices = hard_assignment(layer.weight, n_bits, d)
    new = to_palettized(layer, lut, indices, n_bits, d)

    expected = slow_decode(lut, indices, tuple(layer.weight.shape), d)
    assert isinstance(new, type(layer)) and isinstance(new, PalettizedMixin)
    assert torch.equal(new.weight, expected)
    assert not new.weight.requires_grad
    assert torch.equal(new.indices(), indices)
    distinct = torch.unique(weight_to_vectors(new.weight, d), dim=0)
    assert len(distinct) <= 2**n_bits
    assert new.weight_packed_indices.numel() == math.ceil(indices.numel() * n_bits / 8)
    if functional is not None:
        x = torch.randn(input_shape)
        assert new.bias is layer.bias
        assert torch.equal(new(x), functional((expected, layer.bias), x))
    else:
        tokens = torch.tensor([[0, 3, 15, 7]])
        assert torch.equal(new(tokens), expected[tokens])
        assert new.padding_idx == 0


def test_to_palettized_rejects_bad_input():
    layer = nn.Linear(4, 4)
    lut, indices = torch.randn(4, 1), torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError, match=r"lut has shape \(5, 1\).*1 <= k <= 4"):
        to_palettized(layer, torch.randn(5, 1), indices, 2, 1)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\).*\[0, 4\]"):
        to_palettized(layer, lut, torch.tensor([4] + [0] * 15), 2, 1)
    with pytest.raises(ValueError, match="one entry per vector \\(16"):
        to_palettized(layer, lut, torch.zeros(8, dtype=torch.long), 2, 1)
    with pytest.raises(ValueError, match="cluster_dim=3 does not divide the 4 output channels"):
        to_palettized(layer, torch.randn(4, 3), indices, 2, 3)
    with pytest.raises(ValueError, match="n_bits must be an integer in 1..8, got 9"):
        to_palettized(layer, lut, indices, 9, 1)
    with pytest.raises(TypeError, match="Cannot palettize a LayerNorm"):
        to_palettized(nn.LayerNorm(4), lut, indices, 2, 1)
    with pytest.raises(ValueError, match="max_norm"):
        to_palettized(nn.Embedding(4, 4, max_norm=1.0), lut, indices, 2, 1)


def test_state_dict_is_compact_and_loads_into_plain_torch_modules():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3)
    lut, indices = hard_assignment(layer.weight, 3, 2)
    new = to_palettized(layer, lut, indices, 3, 2)
    state = new.state_dict()
    assert set(state) == {"weight", "bias", "weight_lut", "weight_checksum"}
    assert not [n for n, b in new.named_buffers() if b.is_meta]  # every buffer holds data (deepcopy, .cpu())
    assert state["weight"].dtype == torch.uint8 and state["weight"].numel() == math.ceil(6 * 4 * 9 / 2 * 3 / 8)

    fresh = PalettizedConv2d(4, 6, 3, n_bits=3, cluster_dim=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, new.weight) and torch.equal(fresh.bias, new.bias)

    corrupt = dict(state, weight_lut=state["weight_lut"][:1])
    with pytest.raises(RuntimeError, match="out of range for a LUT with 1 rows"):
        PalettizedConv2d(4, 6, 3, n_bits=3, cluster_dim=2).load_state_dict(corrupt)
    # A plain layer refuses the packed weight instead of loading something random.
    with pytest.raises(RuntimeError, match="size mismatch"):
        nn.Conv2d(4, 6, 3).load_state_dict(state, strict=False)


def test_modified_weight_refuses_to_save():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    new = to_palettized(layer, *hard_assignment(layer.weight, 2, 1), 2, 1)
    with torch.no_grad():
        new.weight[0, 0] += 1.0
    with pytest.raises(RuntimeError, match="modified after palettization"):
        new.state_dict()


def test_attach_config_checks_the_layers():
    model = mobilebert(vocab_size=500)
    with pytest.raises(ValueError, match="has no palettized layer"):
        attach_palettization_config(model)
    layer = model.classifier
    model.classifier = to_palettized(layer, *hard_assignment(layer.weight, 2, 1), 2, 1)
    with pytest.raises(ValueError, match=r"\['pooler'\] are not palettized"):
        attach_palettization_config(model, {"classifier": {"n_bits": 2, "cluster_dim": 1}, "pooler": {}})
    with pytest.raises(ValueError, match=r"layers\['classifier'\]\['n_bits'\] is 4 but the layer has n_bits=2"):
        attach_palettization_config(model, {"classifier": {"n_bits": 4, "cluster_dim": 1}})
    config = attach_palettization_config(model)
    assert config.to_dict() == {
        "quant_method": "hf_r2_palettization",
        "format_version": 2,
        "layers": {"classifier": {"n_bits": 2, "cluster_dim": 1, "shape": [3, 128]}},
    }


def _layer(**spec):
    return {"a": {"n_bits": 2, "cluster_dim": 1, "shape": [4, 4], **spec}}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers": {}}, "non-empty"),
        ({"layers": _layer(n_bits=9)}, "'a': n_bits must be in 1..8, got 9"),
        ({"layers": _layer(cluster_dim=3)}, "cluster_dim=3 does not divide"),
        ({"layers": _layer(shape=[4, 0])}, "shape must be a list of positive ints"),
        ({"layers": {"a": {"n_bits": 2, "cluster_dim": 1}}}, r"lacks \['shape'\]"),
        ({"layers": _layer(), "format_version": 3}, "newer"),
        ({"layers": _layer(), "quant_method": "gptq"}, "quant_method"),
    ],
)
def test_quantization_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PalettizationQuantizationConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained -> from_pretrained
# ---------------------------------------------------------------------------------------------------------------------


def mobilebert_bits(name, module):
    # Mixed settings: byte-aligned and not (3 bits), vector palettization (d=2), 8 bits, the rest 4 bits.
    if name == "classifier":
        return 3, 1
    if name.endswith("attention.self.query"):
        return 2, 2
    if name.endswith("token_type_embeddings"):
        return 8, 1
    return 4, 1


def test_mobilebert_round_trip_is_exact_and_compact(tmp_path):
    model = mobilebert()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = palettize_model(model, mobilebert_bits)
    inputs = {"input_ids": torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        expected = model(**inputs).logits

    stale = tmp_path / "mobilebert"
    stale.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "model-card.md", "vocab.txt"):
        (stale / name).write_text("from an earlier save")
    directory = save_palettized(model, tmp_path / "mobilebert")
    kept = ["config.json", "model-card.md", "model.safetensors", "vocab.txt"]  # stale shards and index removed
    assert sorted(p.name for p in directory.iterdir()) == kept
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_r2_palettization" and config["format_version"] == 2
    assert config["layers"]["classifier"] == {"n_bits": 3, "cluster_dim": 1, "shape": [3, 128]}
    assert len(config["layers"]) == len(layers) == 28
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    loaded = AutoModelForSequenceClassification.from_pretrained(directory)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    assert set(palettized_modules(loaded)) == set(layers)
    assert isinstance(loaded.mobilebert.embeddings.word_embeddings, PalettizedEmbedding)
    assert isinstance(loaded.classifier, PalettizedLinear) and loaded.classifier.n_bits == 3
    for name, module in palettized_modules(loaded).items():
        assert torch.equal(module.weight, model.get_submodule(name).weight), name

    ideal = ideal_bytes(dense_state, model, layers)
    dense = sum(t.numel() * t.element_size() for t in dense_state.values())
    size = weights_size(directory)
    assert ideal <= size <= 1.05 * ideal, (size, ideal)
    assert size < dense / 6  # mostly 4-bit: about 8x smaller than fp32

    # A loaded model saves again to the same compact checkpoint, and loads into the base model too.
    again = save_palettized(loaded, tmp_path / "again")
    assert load_file(again / "model.safetensors").keys() == load_file(directory / "model.safetensors").keys()
    base = MobileBertModel.from_pretrained(again)
    assert torch.equal(base.embeddings.word_embeddings.weight, model.mobilebert.embeddings.word_embeddings.weight)


def test_resnet_round_trip_is_exact_and_compact(tmp_path):
    model = resnet()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = palettize_model(model, lambda name, module: (4, 2) if name.endswith("shortcut.convolution") else (4, 1))
    assert sum(isinstance(m, PalettizedConv2d) for m in model.modules()) == len(layers) - 1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits

    model.save_pretrained(tmp_path / "resnet")  # the plain transformers path writes the same compact format
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "resnet")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, expected)
    assert isinstance(loaded.classifier[1], PalettizedLinear)

    ideal = ideal_bytes(dense_state, model, layers)
    size = weights_size(tmp_path / "resnet")
    assert ideal <= size <= 1.05 * ideal, (size, ideal)

    # `dequantize` gives back plain layers and a dense checkpoint that loads without hf_r2's quantizer.
    loaded.dequantize()
    assert not palettized_modules(loaded) and type(loaded.classifier[1]) is nn.Linear
    assert getattr(loaded.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, expected)
    loaded.save_pretrained(tmp_path / "dense")
    assert weights_size(tmp_path / "dense") > 7 * size
    dense_again = AutoModelForImageClassification.from_pretrained(tmp_path / "dense")
    assert type(dense_again.resnet.embedder.embedder.convolution) is nn.Conv2d

    # A Trainer accepts a loaded palettized model (palettized weights frozen, the rest trainable).
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "resnet")
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(loaded)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n in {f"{k}.weight" for k in layers})


def test_loading_without_hf_r2_fails_loudly(tmp_path):
    model = mobilebert(vocab_size=500)
    palettize_model(model, lambda name, module: (2, 1))
    save_palettized(model, tmp_path / "ckpt")
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForSequenceClassification
        assert "hf_r2" not in sys.modules
        AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "ckpt")!r})
        assert "hf_r2" not in sys.modules
        print("LOADED WITHOUT ERROR")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "LOADED WITHOUT ERROR" not in output
    assert "Unknown quantization type, got hf_r2_palettization" in output
    assert "RuntimeError" in output and "ignore_mismatched_sizes" in output
    assert "classifier.weight" in output and "MISMATCH" in output


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = mobilebert(vocab_size=500)
    palettize_model(model, lambda name, module: (4, 1))
    directory = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_palettized(model, directory)
    assert model.classifier.weight_lut.shape == (16, 1)
    return directory


def _edit_tensors(fn):
    def edit(directory):
        path = directory / "model.safetensors"
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path, metadata={"format": "pt"})

    return edit


def _edit_config(fn):
    def edit(directory):
        path = directory / "config.json"
        config = json.loads(path.read_text())
        fn(config["quantization_config"])
        path.write_text(json.dumps(config))

    return edit


def _set(mapping, key, value):
    mapping[key] = value


def _flip_bit(tensor, byte, bit):
    """The tensor with one bit of its raw bytes flipped (a storage or transfer error)."""
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).clone()
    raw[byte] ^= 1 << bit
    return raw.view(tensor.dtype).reshape(tensor.shape)


LUT, PACKED = "classifier.weight_lut", "classifier.weight"
CORRUPTIONS = {
    "lut_too_many_rows": (
        _edit_tensors(lambda t: _set(t, LUT, torch.cat([t[LUT], t[LUT][:1]]))),
        r"'classifier'.*LUT.*has shape \(17, 1\), expected \(k, 1\) with 1 <= k <= 2\*\*n_bits = 16",
    ),
    "lut_wrong_dim": (_edit_tensors(lambda t: _set(t, LUT, t[LUT].repeat(1, 2))), r"'classifier'.*shape \(16, 2\)"),
    "lut_integer": (_edit_tensors(lambda t: _set(t, LUT, t[LUT].to(torch.int32))), "'classifier'.*floating"),
    "lut_not_finite": (_edit_tensors(lambda t: t[LUT].__setitem__(0, float("nan"))), "'classifier'.*non-finite"),
    "lut_missing": (_edit_tensors(lambda t: t.pop(LUT)), "'classifier'.*no LUT"),
    "indices_truncated": (
        _edit_tensors(lambda t: _set(t, PACKED, t[PACKED][:-1])),
        r"'classifier'.*hold 191 bytes.*needs 192.*disagree",
    ),
    "indices_wrong_dtype": (_edit_tensors(lambda t: _set(t, PACKED, t[PACKED].to(torch.int16))), "'classifier'.*uint8"),
    "indices_missing": (_edit_tensors(lambda t: t.pop(PACKED)), "'classifier'.*no packed indices"),
    "indices_dense": (
        _edit_tensors(lambda t: _set(t, PACKED, torch.zeros(3, 128))),
        "'classifier'.*no packed indices.*holds a dense weight",
    ),
    "index_out_of_range": (
        _edit_tensors(lambda t: _set(t, LUT, t[LUT][:15])),
        "'classifier'.*index 15 of vector .* out of range for a LUT with 15 rows",
    ),
    "config_bits_disagree": (
        _edit_config(lambda q: q["layers"]["classifier"].update(n_bits=2)),
        r"'classifier'.*hold 192 bytes.*n_bits=2.*needs 96.*disagree",
    ),
    "config_shape_disagree": (
        _edit_config(lambda q: q["layers"]["classifier"].update(shape=[3, 64])),
        r"'classifier' the shape \[3, 64\].*builds it with shape \[3, 128\]",
    ),
    "config_newer_format": (_edit_config(lambda q: q.update(format_version=3)), "format version 3.*upgrade hf_r2"),
    # Issue 15.9: one flipped bit decodes to a valid, slightly different model; only the checksum tells.
    "lut_bit_flip": (
        _edit_tensors(lambda t: _set(t, LUT, _flip_bit(t[LUT], 9, 0))),  # lowest mantissa bit of a float32 entry
        r"'classifier'.*checksum of its LUT \('.weight_lut'\) does not match",
    ),
    "indices_bit_flip": (
        _edit_tensors(lambda t: _set(t, PACKED, _flip_bit(t[PACKED], 100, 3))),
        r"'classifier'.*checksum of its packed indices \('.weight'\) does not match",
    ),
    "checksum_missing": (_edit_tensors(lambda t: t.pop("classifier.weight_checksum")), "'classifier'.*no checksum"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_raises_a_clear_error(tiny_checkpoint, tmp_path, corruption):
    edit, match = CORRUPTIONS[corruption]
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, directory)
    edit(directory)
    with pytest.raises(ValueError, match=match):
        AutoModelForSequenceClassification.from_pretrained(directory)


def _as_format_version_1(directory):
    """Rewrites a checkpoint as hf_r2 wrote it before checksums: no `.weight_checksum` tensors, format_version 1."""
    _edit_tensors(lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".weight_checksum")]])(directory)
    _edit_config(lambda q: q.update(format_version=1))(directory)


def test_format_version_1_checkpoints_still_load_and_save_as_version_1(tiny_checkpoint, tmp_path):
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint)
    directory = tmp_path / "v1"
    shutil.copytree(tiny_checkpoint, directory)
    _as_format_version_1(directory)
    loaded = AutoModelForSequenceClassification.from_pretrained(directory)
    assert "weight_checksum" not in dict(loaded.classifier.named_buffers())
    reference_state, loaded_state = reference.state_dict(), loaded.state_dict()
    assert set(reference_state) - set(loaded_state) == {k for k in reference_state if k.endswith("weight_checksum")}
    assert all(torch.equal(loaded_state[k], v) for k, v in loaded_state.items() if k in reference_state)
    loaded.save_pretrained(tmp_path / "again")  # re-saved as what it is: version 1, without checksums
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["format_version"] == 1
    assert not [k for k in load_file(tmp_path / "again" / "model.safetensors") if k.endswith("weight_checksum")]


LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"


@pytest.mark.parametrize("version", [2, 1])
def test_checkpoints_written_by_earlier_hf_r2_still_load(version, tmp_path):
    """tests/fixtures/legacy/palettized_v2 was written by hf_r2 before issue 14 moved the palettization modules
    (tests/scripts/make_legacy_checkpoints.py); format version 1 is the same checkpoint without checksums."""
    directory = tmp_path / "legacy"
    shutil.copytree(LEGACY / "palettized_v2", directory)
    if version == 1:
        _as_format_version_1(directory)
    expected = json.loads((directory / "expected.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    assert model.config.quantization_config.format_version == version
    assert len(palettized_modules(model)) == 10  # 3 embeddings and every Linear but pooler.dense
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(expected["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "again")  # re-saved in the same format, tensor for tensor
    stored, again = load_file(directory / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(again) == sorted(stored)
    assert all(torch.equal(again[k], v) for k, v in stored.items())


def test_checksum_tolerates_a_lut_cast_on_load_but_still_checks_the_indices(tiny_checkpoint, tmp_path):
    """`from_pretrained(..., dtype=bfloat16)` casts the LUT: its bytes cannot match, the indices still must."""
    loaded = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert loaded.classifier.weight_lut.dtype == torch.bfloat16
    directory = tmp_path / "flipped"
    shutil.copytree(tiny_checkpoint, directory)
    _edit_tensors(lambda t: _set(t, PACKED, _flip_bit(t[PACKED], 100, 3)))(directory)
    with pytest.raises(ValueError, match="checksum of its packed indices"):
        AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.bfloat16)


def test_plain_torch_loading_checks_the_checksum_too():
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    new = to_palettized(layer, *hard_assignment(layer.weight, 2, 1), 2, 1)
    state = new.state_dict()
    fresh = PalettizedLinear(16, 6, n_bits=2, cluster_dim=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, new.weight)
    state["weight"] = _flip_bit(state["weight"], 0, 1)
    with pytest.raises(RuntimeError, match="checksum of its packed indices"):
        PalettizedLinear(16, 6, n_bits=2, cluster_dim=1).load_state_dict(state)


def test_uncorrupted_tiny_checkpoint_loads(tiny_checkpoint):
    # The corruption cases above start from a checkpoint that loads fine.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint)
    assert isinstance(model.classifier, PalettizedLinear)


# ---------------------------------------------------------------------------------------------------------------------
# Size report (paper Table 2)
# ---------------------------------------------------------------------------------------------------------------------


def test_size_report_counts_like_table_2(tmp_path):
    model = resnet()
    dense = model.state_dict()
    weights = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    first, last = "resnet.embedder.embedder.convolution", "classifier.1"
    other = sum(t.numel() for k, t in dense.items() if k.rpartition(".")[0] not in weights or k.endswith("bias"))

    report = palettized_size_report(model)
    assert (report.first_layer, report.last_layer) == (first, last)
    assert report.bits == (32, 4, 2, 1)
    total = sum(t.numel() for t in dense.values())
    assert report.quant_all_mib[0] == report.quant_excl_first_last_mib[0] == pytest.approx(total * 4 / MIB)
    rows = zip(report.bits[1:], report.quant_all_mib[1:], report.quant_excl_first_last_mib[1:], strict=True)
    for b, full, excl in rows:
        expected_all = other * 4 + sum(n * b / 8 + 2**b * 4 for n in weights.values())
        edges = sum(weights[n] * 4 - (weights[n] * b / 8 + 2**b * 4) for n in (first, last))
        assert full == pytest.approx(expected_all / MIB)
        assert excl == pytest.approx((expected_all + edges) / MIB)
    assert report.ideal_mib is None and report.file_mib is None
    assert "Quant excl. F & L" in report.to_table() and "1 bit" in str(report)

    layers = palettize_model(model, lambda name, module: (2, 1))
    save_palettized(model, tmp_path / "resnet")
    from_dir = palettized_size_report(tmp_path / "resnet")
    assert from_dir.quant_all_mib == pytest.approx(report.quant_all_mib)
    assert from_dir.palettized_layers == len(layers)
    assert from_dir.file_mib == pytest.approx(weights_size(tmp_path / "resnet") / MIB)
    assert from_dir.ideal_mib == pytest.approx(ideal_bytes(dense, model, layers) / MIB)
    assert palettized_size_report(model).ideal_mib == pytest.approx(from_dir.ideal_mib)
    assert "vs ideal" in from_dir.to_table()
    # d=2 halves the index bits of every layer except the 5-output classifier, which 2 does not divide (kept at d=1).
    vector = palettized_size_report(model, bits=(2,), cluster_dim=2)
    vector_layers = sum(n / 2 * 2 / 8 + 4 * 2 * 4 for name, n in weights.items() if name != "classifier.1")
    expected = other * 4 + vector_layers + (weights["classifier.1"] * 2 / 8 + 4 * 1 * 4)
    assert vector.quant_all_mib[0] == pytest.approx(expected / MIB)
    with pytest.raises(ValueError, match="bits must be 32 or in 1..8, got 16"):
        palettized_size_report(model, bits=(32, 16))


# ---------------------------------------------------------------------------------------------------------------------
# Through DKM palettize -> finalize
# ---------------------------------------------------------------------------------------------------------------------


def test_dkm_finalize_round_trip(tmp_path):
    from hf_r2.palettization import DKMConfig, finalize, palettize

    model = mobilebert(vocab_size=500)
    targets = ["word_embeddings", "query", "classifier"]
    palettize(model, DKMConfig(n_bits=2, cluster_dim=1, init="quantile", init_iters=2, target_modules=targets))
    finalize(model)
    model.eval()
    inputs = {"input_ids": torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        expected = model(**inputs).logits
    assert len(palettized_modules(model)) == 4 and isinstance(model.classifier, PalettizedLinear)
    save_palettized(model, tmp_path / "dkm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dkm")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_unpalettize_restores_plain_trainable_layers():
    model = mobilebert(vocab_size=500)
    layers = palettize_model(model, lambda name, module: (2, 1))
    inputs = {"input_ids": torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        expected = model(**inputs).logits
    unpalettize(model)
    assert not palettized_modules(model) and getattr(model.config, "quantization_config", None) is None
    assert type(model.classifier) is nn.Linear and model.classifier.weight.requires_grad
    assert type(model.mobilebert.embeddings.word_embeddings) is nn.Embedding
    assert not any(key.endswith("weight_lut") for key in model.state_dict())
    assert all(model.state_dict()[f"{name}.weight"].is_floating_point() for name in layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("bad", [0, 9, True, 2.0])
def test_every_n_bits_entry_point_refuses_the_same_values_with_the_same_message(bad):
    """One validator (`hf_r2.utils.check_bits`) behind the config, the format and the layers: bools and floats too."""
    from hf_r2.palettization import DKMConfig

    match = f"n_bits must be an integer in 1..8, got {bad!r}"
    with pytest.raises(ValueError, match=match):
        DKMConfig(n_bits=bad)
    with pytest.raises(ValueError, match=match):
        pack_indices(torch.zeros(3, dtype=torch.long), bad)
    with pytest.raises(ValueError, match=match):
        PalettizedLinear(4, 2, n_bits=bad)
    with pytest.raises(ValueError, match=f"'a': n_bits must be in 1..8, got {bad!r}"):
        PalettizationQuantizationConfig(layers=_layer(n_bits=bad))


@pytest.mark.parametrize("bad", [0, True, 1.0])
def test_every_cluster_dim_entry_point_refuses_the_same_values_with_the_same_message(bad):
    from hf_r2.palettization import DKMConfig

    match = f"cluster_dim must be an integer >= 1, got {bad!r}"
    with pytest.raises(ValueError, match=match):
        DKMConfig(cluster_dim=bad)
    with pytest.raises(ValueError, match=match):
        palettized_size_report(nn.Sequential(nn.Linear(4, 4)), cluster_dim=bad)  # accepted True before issue 14
    with pytest.raises(ValueError, match=f"quantization_config layer 'a': {match}"):
        PalettizationQuantizationConfig(layers=_layer(cluster_dim=bad))


def test_palettized_and_quantized_layers_keep_every_hyper_parameter_of_the_layer_they_replace():
    """One swap helper (`hf_r2.utils.layer_shell`) copies each layer type's settings: the embedding's
    `scale_grad_by_freq` / `norm_type` / `sparse` used to fall back to their defaults in `to_palettized`."""
    from hf_r2.quantization import LSQConfig, quantize
    from hf_r2.utils import LAYER_ATTRS, layer_shell

    torch.manual_seed(0)
    embedding = nn.Embedding(8, 4, padding_idx=1, scale_grad_by_freq=True, norm_type=1.0, sparse=True)
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, bias=False, padding_mode="reflect").eval()
    for layer in (embedding, conv):
        lut, indices = hard_assignment(layer.weight, 2, 1)
        palettized = to_palettized(layer, lut, indices, 2, 1)
        attrs = next(a for base, a in LAYER_ATTRS.items() if isinstance(layer, base))
        assert {a: getattr(palettized, a) for a in attrs} == {a: getattr(layer, a) for a in attrs}
        assert palettized.training == layer.training
        assert getattr(palettized, "bias", None) is getattr(layer, "bias", None)
    quantized = quantize(nn.Sequential(conv), LSQConfig(w_bits=4, a_bits=None))[0]
    assert {a: getattr(quantized, a) for a in LAYER_ATTRS[nn.Conv2d]} == {
        a: getattr(conv, a) for a in LAYER_ATTRS[nn.Conv2d]
    }
    with pytest.raises(TypeError, match="Cannot swap a ReLU"):
        layer_shell(PalettizedLinear, nn.ReLU())


def test_import_paths_from_before_issue_14_still_work():
    import hf_r2.palettization.compressed as old_compressed
    from hf_r2.palettization import config, format, model, palettized_layers, serialization, size_report
    from hf_r2.palettization.quantizer import PalettizationHfQuantizer, PalettizationQuantizationConfig

    moved = {"PALETTIZATION_FORMAT_VERSION": format, "SUPPORTED_LAYER_TYPES": palettized_layers}
    moved |= {name: format for name in ("decode_palettized", "output_channels_first", "pack_indices")}
    moved |= {name: format for name in ("output_channels_first_shape", "packed_num_bytes", "unpack_indices")}
    moved |= {name: palettized_layers for name in ("PalettizedConv1D", "PalettizedConv2d", "PalettizedEmbedding")}
    moved |= {name: palettized_layers for name in ("PalettizedLinear", "PalettizedMixin", "palettized_class_for")}
    moved |= {name: palettized_layers for name in ("palettized_modules", "to_palettized")}
    moved |= {"palettized_checksum": format, "attach_palettization_config": config, "unpalettize": model}
    for name, home in moved.items():
        assert getattr(old_compressed, name) is getattr(home, name), name
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        old_compressed.nothing_here  # noqa: B018
    from hf_r2.palettization import hf_quantizer

    assert PalettizationHfQuantizer is hf_quantizer.PalettizationHfQuantizer
    assert PalettizationQuantizationConfig is config.PalettizationQuantizationConfig
    assert serialization.palettized_size_report is size_report.palettized_size_report

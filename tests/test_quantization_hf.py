"""Finalized quantized transformers checkpoints: save_pretrained / from_pretrained round trip, and loud failures."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2_lm
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

from hf_r2.quantization import (
    HfR2QuantizationConfig,
    QuantizedLinear,
    calibrate,
    finalize,
    get_quantization_config,
    quantize,
)

# Tiny tensors: one thread (conftest.py) avoids oversubscription on the shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bert():
    return tiny_bert(0, vocab_size=50, max_position_embeddings=16, num_labels=3)


BATCH = {"input_ids": torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(0))}


def _saved(tmp_path, method, **kwargs):
    model = quantize(_tiny_bert(), get_quantization_config(method, exclude_modules=["pooler.dense"], **kwargs))
    calibrate(model, [BATCH])
    model.eval()
    finalize(model)
    assert isinstance(model.config.quantization_config, HfR2QuantizationConfig)
    with torch.no_grad():
        logits = model(**BATCH).logits
    model.save_pretrained(tmp_path)
    return logits, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "method,kwargs",
    [("ptq", {"w_bits": 4, "a_bits": 8}), ("lsq", {"w_bits": 2, "a_bits": 2}), ("ewgs", {"w_bits": 2, "a_bits": 4})],
)
def test_from_pretrained_restores_the_finalized_model_exactly(tmp_path, method, kwargs):
    logits, state = _saved(tmp_path, method, **kwargs)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_r2_quantization" and saved["method_config"]["quant_method"] == method
    assert "bert.pooler.dense" not in saved["layers"] and "classifier" in saved["layers"]
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.classifier, QuantizedLinear)
    assert type(loaded.bert.pooler.dense) is torch.nn.Linear
    assert loaded.classifier.weight_int.dtype == torch.int8
    # Codes, scales and float tensors come back identical; outputs are compared with a tolerance (kernels may differ).
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, logits, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_missing_a_quantized_tensor_refuses_to_load(tmp_path):
    _saved(tmp_path, "ptq", w_bits=4, a_bits=8)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["classifier.weight_scale"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*classifier.weight_scale"):
        BertForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda t: t["classifier.weight"].view(-1)[0].fill_(100),  # the codes (format 2; format 1: weight_int)
            r"codes in \[-?\d+, 100\], outside the 4-bit grid",
        ),
        (
            lambda t: t.update({"classifier.weight": t["classifier.weight"].to(torch.int32)}),
            "dtype torch.int32; this 4-bit grid stores torch.int8",
        ),
        (lambda t: t["classifier.weight_scale"].view(-1)[0].fill_(float("nan")), "weight_scale must be finite"),
        (lambda t: t["classifier.weight_scale"].view(-1)[0].fill_(-1.0), "weight_scale must be finite and >= 0"),
        (
            lambda t: t.update({"classifier.weight": t["classifier.weight"][:-1].clone()}),
            r"classifier.weight holds a torch.int8 tensor of shape \(47,\); this layer stores its 48 integer",
        ),
    ],
)
def test_a_checkpoint_with_corrupt_codes_or_scales_refuses_to_load(tmp_path, corrupt, message):
    # Each of these has the right keys and shapes, so only a value check stops it dequantizing to wrong weights.
    _saved(tmp_path, "ptq", w_bits=4, a_bits=8)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    corrupt(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        BertForSequenceClassification.from_pretrained(tmp_path)


def test_without_the_quantization_config_loading_fails_instead_of_random_weights(tmp_path):
    # What transformers does when hf_r2 is not imported: it skips the unknown method and loads a plain model.
    _saved(tmp_path, "ptq", w_bits=4)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size mismatch|mismatch"):
        BertForSequenceClassification.from_pretrained(tmp_path)


# ---- issue 15.3: checkpoints that saved but did not load now either load or are refused before anything changes ----


def _tiny_gpt2_lm(**kwargs):
    return tiny_gpt2_lm(0, vocab_size=50, **kwargs)


def _save_and_reload(model, tmp_path):
    model.eval()
    with torch.no_grad():
        expected = model(**BATCH).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, expected, rtol=1e-5, atol=1e-5)
    return loaded


def test_palettized_model_is_refused_by_quantize_and_its_dequantized_form_round_trips(tmp_path):
    """DKM run, then PTQ of its output: PTQ overwrote the palettization config and the checkpoint did not load."""
    from hf_r2.palettization import DKMConfig, palettize, unpalettize
    from hf_r2.palettization import finalize as dkm_finalize

    model = palettize(_tiny_bert(), DKMConfig(n_bits=2, exclude_modules=["classifier"]))
    dkm_finalize(model)
    model.save_pretrained(tmp_path / "dkm")
    palettized = BertForSequenceClassification.from_pretrained(tmp_path / "dkm")
    config = get_quantization_config("ptq", w_bits=4)
    with pytest.raises(
        ValueError,
        match=r"already compressed \('hf_r2_palettization', e.g. palettized layer "
        r"'bert.embeddings.word_embeddings'\).*unpalettize",
    ):
        quantize(palettized, config)
    assert not any(isinstance(m, QuantizedLinear) for m in palettized.modules())
    unpalettize(palettized)  # the advised way: plain layers holding the palettized values
    finalize(quantize(palettized, config))
    loaded = _save_and_reload(palettized, tmp_path / "ptq")
    assert isinstance(loaded.classifier, QuantizedLinear)


def test_tied_lm_head_is_refused_by_quantize_and_untied_one_round_trips(tmp_path):
    """GPT-2 LM after PTQ failed to load with "`weight` is not an nn.Parameter" (the quantized head was tied)."""
    from transformers import GPT2LMHeadModel

    model = _tiny_gpt2_lm()
    with pytest.raises(
        ValueError,
        match=r"tied weights \(lm_head.weight = transformer.wte.weight.*"
        r"exclude_modules=\['lm_head'\]",
    ):
        quantize(model, get_quantization_config("ptq", w_bits=4))
    assert type(model.lm_head) is torch.nn.Linear
    finalize(quantize(model, get_quantization_config("ptq", w_bits=4, exclude_modules=["lm_head"])))  # the advice
    loaded = _save_and_reload(model, tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied, still float
    untied = _tiny_gpt2_lm(tie_word_embeddings=False)
    finalize(quantize(untied, get_quantization_config("ptq", w_bits=4, target_modules=["lm_head"])))
    loaded = _save_and_reload(untied, tmp_path / "untied")
    assert isinstance(loaded, GPT2LMHeadModel) and isinstance(loaded.lm_head, QuantizedLinear)


def test_non_finite_weights_are_refused_at_quantize_and_at_finalize():
    """PTQ of a model holding an inf weight saved a checkpoint that was then refused as corrupt."""
    model = _tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(
        ValueError,
        match=r"classifier.weight holds 1 NaN/Inf value\(s\).*exclude_modules="
        r"\['classifier'\]",
    ):
        quantize(model, get_quantization_config("ptq", w_bits=4))
    assert type(model.classifier) is torch.nn.Linear
    # A weight that turns non-finite during QAT is caught at finalize, before any layer is replaced.
    model = quantize(_tiny_bert(), get_quantization_config("lsq", w_bits=4))
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"classifier.weight holds NaN/Inf values.*Nothing was finalized"):
        finalize(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None


# ---- issue 15.5: transformers Conv1D (GPT-2) is quantized; nn.MultiheadAttention is refused, not silently skipped ----


@pytest.mark.parametrize("method,kwargs", [("ptq", {"w_bits": 4, "a_bits": 8}), ("lsq", {"w_bits": 3, "a_bits": 4})])
def test_conv1d_is_quantized_like_the_linear_with_the_transposed_weight(method, kwargs):
    """Conv1D is nn.Linear with its weight stored (in, out): per-channel scales must run along the output channels."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 5)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-1, 1, 6))  # very different output-channel ranges: per-channel matters
        conv.bias.normal_()
    linear = torch.nn.Linear(5, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    conv_model, linear_model = torch.nn.Sequential(conv), torch.nn.Sequential(linear)
    x = torch.randn(3, 4, 5)
    for model in (conv_model, linear_model):
        quantize(model, get_quantization_config(method, **kwargs))
        calibrate(model, [x])
    torch.testing.assert_close(conv_model(x), linear_model(x), rtol=1e-5, atol=1e-5)
    finalize(conv_model)
    finalize(linear_model)
    from hf_r2.quantization import QuantizedConv1D

    assert isinstance(conv_model[0], QuantizedConv1D)
    assert torch.equal(conv_model[0].weight_int, linear_model[0].weight_int)  # integer codes: exact
    torch.testing.assert_close(conv_model[0].weight, linear_model[0].weight.t(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(conv_model(x), linear_model(x), rtol=1e-5, atol=1e-5)


def test_gpt2_ptq_quantizes_every_conv1d_and_round_trips(tmp_path):
    """GPT-2 with PTQ used to quantize only `score` (every Conv1D was skipped), and the card claimed PTQ anyway."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from hf_r2.arguments import compressed_summary
    from hf_r2.quantization import QuantizedConv1D

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            vocab_size=50,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            num_labels=2,
        )
    )
    finalize(quantize(model, get_quantization_config("ptq", w_bits=2)))
    conv1d = [n for n, m in model.named_modules() if isinstance(m, QuantizedConv1D)]
    assert conv1d == [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    summary = compressed_summary(model)
    # 16*48 + 16*16 + 16*64 + 64*16 (Conv1D) + 16*2 (score) compressed, of those plus wte 50*16 and wpe 16*16.
    assert summary["compressed_layers"] == 5
    assert summary["compressed_weights"] == "3,104 of 4,160 (74.6 %)"
    loaded = _save_and_reload(model, tmp_path)
    assert [n for n, m in loaded.named_modules() if isinstance(m, QuantizedConv1D)] == conv1d


class _WithMultiheadAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


def test_multihead_attention_is_refused_loudly_and_excluding_it_works():
    """MHA never calls out_proj.forward (it was counted as quantized but ran in full precision)."""
    from hf_r2.quantization import quantized_layers

    model = _WithMultiheadAttention()
    with pytest.raises(
        ValueError,
        match=r"cannot compress nn.MultiheadAttention \['attn'\].*exclude_modules="
        r"\['attn'\]",
    ):
        quantize(model, get_quantization_config("lsq", w_bits=4))
    assert type(model.attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    quantize(model, get_quantization_config("lsq", w_bits=4, exclude_modules=["attn"]))
    assert list(quantized_layers(model)) == ["head"]


# ---- issue 15.8: activation quantizers finalized before any batch are refused, or calibrated by the scripts ----


@pytest.mark.parametrize(
    "method,kwargs",
    [("lsq", {"w_bits": 4, "a_bits": 4}), ("ewgs", {"w_bits": 4, "a_bits": 4}), ("pact", {"w_bits": 4, "a_bits": 4})],
)
def test_finalize_refuses_activation_quantizers_that_saw_no_batch(method, kwargs):
    model = quantize(_tiny_bert(), get_quantization_config(method, **kwargs))
    with pytest.raises(
        ValueError,
        match=r"input quantizers of \d+ layer\(s\), e.g. \['bert.encoder.layer.0.attention"
        r".*have seen no batch.*calibrate.*Nothing was finalized",
    ):
        finalize(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    calibrate(model, [BATCH])
    finalize(model)  # once calibrated it finalizes
    # PACT with an explicit sign needs no batch: its clipping level is a parameter that starts at alpha_init.
    finalize(quantize(_tiny_bert(), get_quantization_config("pact", w_bits=4, a_bits=4, a_signed=True)))


def test_scripts_calibrate_untrained_activation_quantizers_on_the_given_batches(tmp_path):
    """`--quant_method lsq --a_bits 4 --do_eval` without training saved step sizes that the first batch after loading
    set, so two loads of one checkpoint disagreed (0.009 in logits)."""
    from transformers import HfArgumentParser

    from hf_r2.arguments import CompressionArguments

    (compression,) = HfArgumentParser(CompressionArguments).parse_args_into_dataclasses(
        ["--quant_method", "lsq", "--w_bits", "4", "--a_bits", "4"]
    )
    model = compression.apply(_tiny_bert().eval())
    seen = {}  # the classifier's input during calibration (earlier layers already quantized)
    model.classifier.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    model = compression.finalize(model, calibration_batches=[BATCH])
    # LSQ's initial step, 2 mean|x| / sqrt(Q_P), from the given batch (the classifier's input is signed: Q_P = 7).
    expected_step = 2 * seen["x"].abs().mean() / 7**0.5
    torch.testing.assert_close(model.classifier.input_quantizer.step.detach(), expected_step, rtol=1e-5, atol=1e-7)
    model.save_pretrained(tmp_path)
    other = {"input_ids": torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(5))}
    first, second = (BertForSequenceClassification.from_pretrained(tmp_path).eval() for _ in range(2))
    with torch.no_grad():
        first(**other)  # another batch first: must not set anything
        torch.testing.assert_close(first(**BATCH).logits, second(**BATCH).logits, rtol=1e-5, atol=1e-6)


def test_checkpoints_written_by_earlier_hf_r2_still_load(tmp_path):
    """tests/fixtures/legacy/quantized_lsq was written by hf_r2 before issue 14 moved the quantization modules
    (tests/scripts/make_legacy_checkpoints.py)."""
    directory = tmp_path / "legacy"
    shutil.copytree(Path(__file__).resolve().parent / "fixtures" / "legacy" / "quantized_lsq", directory)
    expected = json.loads((directory / "expected.json").read_text())
    model = BertForSequenceClassification.from_pretrained(directory).eval()
    assert isinstance(model.config.quantization_config, HfR2QuantizationConfig)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantizedLinear)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(expected["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "again")  # integer codes, scales and zero points, tensor for tensor
    stored, again = load_file(directory / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(again) == sorted(stored)
    assert all(torch.equal(again[k], v) for k, v in stored.items())


def test_quantized_and_palettized_checkpoints_share_one_key_convention(tmp_path):
    """Issue 14: `L.weight` is the 1-D integer payload of a compressed layer `L`, `L.weight_*` what decodes it."""
    from hf_r2.palettization import DKMConfig, palettize
    from hf_r2.palettization import finalize as finalize_palettized

    _saved(tmp_path / "quantized", "ptq", w_bits=4, a_bits=8)
    palettized = palettize(_tiny_bert(), DKMConfig(n_bits=2, exclude_modules=["pooler.dense"]))
    finalize_palettized(palettized).save_pretrained(tmp_path / "palettized")
    expected_sidecars = {"quantized": {"weight_scale", "weight_zero_point"}, "palettized": {"weight_lut"}}
    for kind, sidecars in expected_sidecars.items():
        tensors = load_file(tmp_path / kind / "model.safetensors")
        layers = json.loads((tmp_path / kind / "config.json").read_text())["quantization_config"]["layers"]
        assert "classifier" in layers and len(layers) >= 7, kind
        for layer in layers:
            payload = tensors[f"{layer}.weight"]
            assert payload.dim() == 1 and payload.dtype in (torch.int8, torch.uint8), (kind, layer, payload.shape)
            own = {k[len(layer) + 1 :] for k in tensors if k.startswith(f"{layer}.weight")}
            assert sidecars <= own <= sidecars | {"weight", "weight_checksum"}, (kind, layer, own)
        assert not any(k.endswith("weight_int") for k in tensors), kind


def test_load_state_dict_reads_the_format_1_keys_of_a_legacy_checkpoint(tmp_path):
    """A format-1 state dict (codes under `weight_int`, empty `weight`) loads into layers that save format 2."""
    legacy = Path(__file__).resolve().parent / "fixtures" / "legacy" / "quantized_lsq"
    stored = load_file(legacy / "model.safetensors")
    model = BertForSequenceClassification.from_pretrained(legacy).eval()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.checkpoint_format = 2
            module.weight_int.zero_()  # so that only the load below can restore the codes
    model.load_state_dict(stored)
    query = model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(query.weight_int, stored["bert.encoder.layer.0.attention.self.query.weight_int"])
    expected = json.loads((legacy / "expected.json").read_text())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(expected["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "upgraded")  # now format 2 keys: the codes under `weight`, 1-D
    upgraded = load_file(tmp_path / "upgraded" / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(upgraded[f"{key}.weight"], stored[f"{key}.weight_int"].reshape(-1))
    assert f"{key}.weight_int" not in upgraded
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "upgraded").eval()  # its config still says 1
    assert torch.equal(reloaded.bert.encoder.layer[0].attention.self.query.weight_int, query.weight_int)


def test_import_paths_from_before_issue_14_still_work():
    from hf_r2 import utils
    from hf_r2.quantization import config, layers, quantizers
    from hf_r2.quantization.functional import check_bits
    from hf_r2.quantization.hf_quantizer import HF_QUANT_METHOD, HfR2QuantizationConfig, attach_hf_quantization_config

    for name in quantizers.__all__:
        assert getattr(layers, name) is getattr(quantizers, name), name
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        layers.nothing_here  # noqa: B018
    assert check_bits is utils.check_bits
    assert (HF_QUANT_METHOD, HfR2QuantizationConfig) == (config.HF_QUANT_METHOD, config.HfR2QuantizationConfig)
    assert attach_hf_quantization_config is config.attach_hf_quantization_config


def test_both_transformers_loaders_share_one_base_and_keep_their_flags():
    from hf_r2.palettization.hf_quantizer import PalettizationHfQuantizer, PalettizationQuantizationConfig
    from hf_r2.quantization import HfR2Quantizer
    from hf_r2.utils import CheckpointHfQuantizer

    palettized_spec = {"a": {"n_bits": 2, "cluster_dim": 1, "shape": [4, 4]}}
    loaders = {
        PalettizationHfQuantizer(PalettizationQuantizationConfig(layers=palettized_spec)): True,
        HfR2Quantizer(
            HfR2QuantizationConfig(method_config=get_quantization_config("lsq").to_dict(), layers=["a"])
        ): False,
    }
    for loader, qat_trainable in loaders.items():
        assert isinstance(loader, CheckpointHfQuantizer)
        assert loader.requires_calibration and loader.is_serializable() and loader.is_trainable
        assert loader.is_qat_trainable is qat_trainable
        assert loader.validate_environment() is None

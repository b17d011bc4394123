"""`hf_r2.arguments`: flags -> configs of the compression packages, validation, apply/finalize on a tiny model."""

import helpers
import pytest
import torch
from transformers import HfArgumentParser

from hf_r2.arguments import CompressionArguments, PublishArguments, parse_module_pattern


def parse(*argv):
    return HfArgumentParser((CompressionArguments, PublishArguments)).parse_args_into_dataclasses(list(argv))


def tiny_bert(seed=0):
    return helpers.tiny_bert(seed).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_module_pattern_names_commas_and_regex():
    assert parse_module_pattern(None) is None
    assert parse_module_pattern(["query", "key"]) == ["query", "key"]
    assert parse_module_pattern(["query,key", "value"]) == ["query", "key", "value"]
    assert parse_module_pattern(["bert.encoder.layer.0.attention.self.query"]) == [
        "bert.encoder.layer.0.attention.self.query"
    ]
    assert parse_module_pattern([".*attention.*"]) == ".*attention.*"
    with pytest.raises(ValueError, match=r"--dkm_target_modules='\(query' is not a valid regular expression"):
        parse_module_pattern(["(query"], "--dkm_target_modules")
    with pytest.raises(ValueError, match=r"--quant_exclude_modules='\[a' is not a valid regular expression"):
        parse("--quant_method", "ptq", "--quant_exclude_modules", "[a")


def test_dkm_flags_build_the_dkm_config():
    compression, _ = parse(
        "--dkm_bits",
        "2",
        "--dkm_cluster_dim",
        "2",
        "--dkm_temperature",
        "0.001",
        "--dkm_kmeans_iters",
        "5",
        "--dkm_exclude_modules",
        "classifier",
    )
    assert compression.method == "dkm" and compression.trains_compressed
    config = compression.dkm_config()
    assert (config.n_bits, config.cluster_dim, config.temperature, config.kmeans_iters) == (2, 2, 0.001, 5)
    assert config.exclude_modules == ["classifier"]
    info = compression.card_info()
    assert info["bits_per_weight"] == 1.0 and info["n_bits"] == 2


def test_quant_flags_build_the_method_config():
    compression, _ = parse(
        "--quant_method", "lsq", "--w_bits", "2", "--a_bits", "3", "--quant_target_modules", ".*layer.*"
    )
    config = compression.quantization_config()
    assert type(config).__name__ == "LSQConfig"
    assert (config.w_bits, config.a_bits, config.target_modules) == (2, 3, ".*layer.*")
    compression, _ = parse("--quant_method", "ptq", "--w_bits", "4", "--quant_per_channel", "false")
    config = compression.quantization_config()
    assert type(config).__name__ == "PTQConfig" and config.per_channel is False
    assert not compression.trains_compressed


def test_quant_option_the_method_lacks_is_refused_while_parsing():
    # Refused by __post_init__, before a script loads data or a model (not only when the config is built later).
    with pytest.raises(ValueError, match="per_channel"):
        parse("--quant_method", "lsq", "--quant_per_channel", "true")
    with pytest.raises(ValueError, match="w_bits >= 2 .*got w_bits=1"):
        parse("--quant_method", "lsq", "--w_bits", "1")
    compression, _ = parse("--quant_method", "lsq", "--w_bits", "2")
    assert compression.quantization_config().w_bits == 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--dkm_bits", "2", "--quant_method", "lsq"], "mutually exclusive"),
        (["--dkm_bits", "0"], "dkm_bits must be an integer from 1 to 8, got 0"),
        (["--dkm_bits", "9"], "got 9"),
        (["--quant_method", "lsq", "--w_bits", "12"], "w_bits .* got 12"),
        (["--a_bits", "2"], "--a_bits given without --quant_method"),
        (["--dkm_cluster_dim", "2"], "--dkm_cluster_dim given without --dkm_bits"),
        (["--dkm_bits", "2", "--dkm_cluster_dim", "0"], "dkm_cluster_dim must be an integer >= 1, got 0"),
        (["--dkm_bits", "2", "--dkm_temperature", "-1"], "dkm_temperature .* got -1"),
        (["--card_histogram_layers", "-1"], "card_histogram_layers .* got -1"),
    ],
)
def test_bad_flags_fail_clearly(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(*argv)


def test_unknown_quant_method_in_python_is_refused():
    # argparse enforces the choices; constructing in Python must too.
    with pytest.raises(ValueError, match="'gptq' is not one of"):
        CompressionArguments(quant_method="gptq")


def test_no_compression_is_a_no_op():
    compression, _ = parse()
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert compression.method is None and compression.card_info() is None
    assert compression.finalize(compression.apply(model)) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dkm_apply_then_finalize_leaves_at_most_2_to_the_b_values():
    compression, _ = parse("--dkm_bits", "2", "--dkm_exclude_modules", "word_embeddings")
    model = compression.apply(tiny_bert())
    from hf_r2.palettization import dkm_layers

    names = list(dkm_layers(model))
    assert "bert.encoder.layer.0.attention.self.query" in names and "classifier" in names
    assert "bert.embeddings.word_embeddings" not in names
    with torch.no_grad():
        model(**batch())
    model = compression.finalize(model)
    assert not dkm_layers(model)
    query = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert query.weight.unique().numel() <= 4


def test_qat_apply_then_finalize_matches_fake_quantized_outputs():
    compression, _ = parse("--quant_method", "lsq", "--w_bits", "2", "--a_bits", "4")
    model = compression.apply(tiny_bert())
    from hf_r2.quantization import quantized_layers

    assert "classifier" in quantized_layers(model)  # last layer included, as in the paper
    with torch.no_grad():
        fake = model(**batch()).logits
        model = compression.finalize(model)
        final = model(**batch()).logits
    assert not quantized_layers(model)
    torch.testing.assert_close(final, fake)


def test_ptq_applies_after_training_with_calibration():
    compression, _ = parse("--quant_method", "ptq", "--w_bits", "4", "--a_bits", "8")
    model = tiny_bert()
    with torch.no_grad():
        float_logits = model(**batch()).logits
    assert compression.apply(model) is model  # before training: nothing to do for PTQ
    from hf_r2.quantization import quantized_layers

    assert not quantized_layers(model)
    with pytest.raises(ValueError, match="calibration batches"):
        compression.finalize(tiny_bert())
    model = compression.finalize(model, calibration_batches=[batch(2), batch(3)])
    with torch.no_grad():
        ptq_logits = model(**batch()).logits
    assert not torch.equal(ptq_logits, float_logits)  # quantized ...
    torch.testing.assert_close(ptq_logits, float_logits, atol=0.15, rtol=0)  # ... but close at 4/8 bits


def test_ptq_checks_the_model_before_training():
    """An unmatched PTQ selection or an incompatible model used to fail only after training (issue 15.3, 15.12)."""
    compression, _ = parse("--quant_method", "ptq", "--w_bits", "4", "--quant_target_modules", "clasifier")
    with pytest.raises(ValueError, match=r"target_modules \['clasifier'\] match no module"):
        compression.apply(tiny_bert())
    compression, _ = parse("--quant_method", "ptq", "--w_bits", "4")
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="classifier.weight holds 1 NaN/Inf"):
        compression.apply(model)


def test_parse_script_args_from_the_command_line_or_one_json_file(tmp_path):
    import json
    from dataclasses import dataclass

    from hf_r2.arguments import parse_script_args
    from hf_r2.trainer import R2TrainingArguments

    @dataclass
    class ModelArgs:
        model_name_or_path: str = "m"

    @dataclass
    class DataArgs:
        task_name: str = "qnli"

    argv = [
        "--model_name_or_path",
        "x",
        "--task_name",
        "rte",
        "--output_dir",
        str(tmp_path),
        "--r2_type",
        "margin",
        "--quant_method",
        "ptq",
        "--w_bits",
        "4",
        "--card_histogram_layers",
        "2",
    ]
    from_cli = parse_script_args(ModelArgs, DataArgs, argv)
    path = tmp_path / "args.json"
    path.write_text(
        json.dumps(
            {
                "model_name_or_path": "x",
                "task_name": "rte",
                "output_dir": str(tmp_path),
                "r2_type": "margin",
                "quant_method": "ptq",
                "w_bits": 4,
                "card_histogram_layers": 2,
            }
        )
    )
    from_json = parse_script_args(ModelArgs, DataArgs, [str(path)])
    for parsed in (from_cli, from_json):
        model_args, data_args, training_args, compression, publish = parsed
        assert (model_args.model_name_or_path, data_args.task_name) == ("x", "rte")
        assert isinstance(training_args, R2TrainingArguments) and training_args.r2_type == "margin"
        assert compression.quantization_config().w_bits == 4 and publish.card_histogram_layers == 2


def test_module_flags_cover_containers_and_refuse_typos_and_mixed_regexes():
    """Issue 15.6 / 15.12: `--quant_target_modules attention classifier` quantized only `classifier` (a name of a
    container selected nothing inside it); a typo in an exclude list was ignored; a regex mixed into names failed with
    "match no module" without saying why."""
    from hf_r2.quantization import quantized_layers

    compression, _ = parse(
        "--quant_method", "lsq", "--w_bits", "4", "--quant_target_modules", "attention", "classifier"
    )
    model = compression.apply(tiny_bert())
    expected = {
        f"bert.encoder.layer.0.attention.{n}" for n in ("self.query", "self.key", "self.value", "output.dense")
    } | {"classifier"}
    assert set(quantized_layers(model)) == expected
    for flags, message in [
        (("--quant_method", "lsq", "--quant_exclude_modules", "classifer"), r"exclude_modules \['classifer'\] match"),
        (("--dkm_bits", "2", "--dkm_exclude_modules", "word_embedding"), r"exclude_modules \['word_embedding'\]"),
    ]:
        compression, _ = parse(*flags)
        with pytest.raises(ValueError, match=message):
            compression.apply(tiny_bert())
    with pytest.raises(
        ValueError,
        match=r"mixes module names with a regular expression \['\.\*attn\.\*'\]: a regular "
        "expression must stand alone",
    ):
        parse("--quant_method", "lsq", "--quant_target_modules", "query", ".*attn.*")
    compression, _ = parse("--dkm_bits", "2", "--dkm_exclude_modules", "word_embeddings", "classifier")
    model = compression.apply(tiny_bert())
    from hf_r2.palettization import dkm_layers

    assert "bert.embeddings.word_embeddings" not in dkm_layers(model) and "classifier" not in dkm_layers(model)
    assert "bert.embeddings.position_embeddings" in dkm_layers(model)


def test_too_few_vectors_advice_names_a_flag_that_exists():
    """Issue 15.12: the DKM error advised `weight_threshold`, which had no flag."""
    from hf_r2.palettization import dkm_layers

    compression, _ = parse("--dkm_bits", "6")
    with pytest.raises(
        ValueError,
        match=r"token_type_embeddings.weight .* fewer than the 2\*\*6 = 64 centroids.*"
        r"--dkm_weight_threshold 33",
    ):
        compression.apply(tiny_bert())
    compression, _ = parse("--dkm_bits", "6", "--dkm_weight_threshold", "33")
    layers = dkm_layers(compression.apply(tiny_bert()))
    assert "classifier" not in layers and "bert.embeddings.token_type_embeddings" not in layers
    assert "bert.embeddings.word_embeddings" in layers
    with pytest.raises(ValueError, match="--dkm_weight_threshold given without --dkm_bits"):
        parse("--dkm_weight_threshold", "10")


def test_r2_with_a_compression_that_trains_needs_an_explicit_flag_and_matching_dims(tmp_path):
    """Issue 10.3: --r2_type with --dkm_bits / a QAT --quant_method kept R² on during compression silently; nothing
    checked --r2_cluster_dim against --dkm_cluster_dim; --quant_method ewgs got no delta-updating callback."""
    from dataclasses import dataclass

    from hf_r2.arguments import parse_script_args
    from hf_r2.quantization import EWGSDeltaCallback

    @dataclass
    class ModelArgs:
        model_name_or_path: str = "m"

    @dataclass
    class DataArgs:
        task_name: str = "qnli"

    def script(*flags):
        return parse_script_args(ModelArgs, DataArgs, ["--output_dir", str(tmp_path), *flags])

    for compression in (("--dkm_bits", "2"), ("--quant_method", "lsq"), ("--quant_method", "pact")):
        with pytest.raises(
            ValueError,
            match=rf"--r2_type margin with {' '.join(compression)} would keep R² on while "
            "the compression trains.*paper turns R² off.*--r2_during_compression",
        ):
            script("--do_train", "--r2_type", "margin", *compression)
        script("--do_train", "--r2_type", "margin", *compression, "--r2_during_compression")  # explicit: accepted
        script("--do_train", *compression)  # compression alone
    script("--do_train", "--r2_type", "linf", "--quant_method", "ptq")  # R² then PTQ: the paper's recipe
    script("--do_eval", "--r2_type", "linf", "--dkm_bits", "2")  # nothing trains
    with pytest.raises(ValueError, match="--r2_during_compression applies only with --r2_type"):
        script("--do_train", "--dkm_bits", "2", "--r2_during_compression")
    with pytest.raises(ValueError, match="--r2_cluster_dim 2 differs from --dkm_cluster_dim 4"):
        script(
            "--do_train",
            "--r2_type",
            "linf",
            "--r2_cluster_dim",
            "2",
            "--dkm_bits",
            "4",
            "--dkm_cluster_dim",
            "4",
            "--r2_during_compression",
        )
    with pytest.raises(ValueError, match="--r2_cluster_dim 2 differs from --dkm_cluster_dim 1"):
        script("--do_train", "--r2_type", "linf", "--r2_cluster_dim", "2", "--dkm_bits", "2", "--r2_during_compression")
    *_, compression, _ = script("--do_train", "--quant_method", "ewgs")
    assert [type(c) for c in compression.trainer_callbacks()] == [EWGSDeltaCallback]
    *_, compression, _ = script("--do_train", "--quant_method", "lsq")
    assert compression.trainer_callbacks() == []


@pytest.mark.parametrize("compression", [{"dkm_bits": 2}, {"quant_method": "lsq"}, {"quant_method": "ptq"}])
def test_compression_under_a_sharding_engine_is_refused_before_training(compression, monkeypatch):
    """The scripts finalize the compression on the trained model, which FSDP / DeepSpeed leave sharded: refused before
    anything is loaded (finalize itself also refuses sharded weights: tests/scripts/fsdp_parity.py)."""
    from types import SimpleNamespace

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    args = CompressionArguments(**compression)
    plain = SimpleNamespace(r2_type="none", do_train=True, fsdp=[], deepspeed=None)
    args.check_training_args(plain)  # no engine: accepted
    for engine, training_args in (
        ("FSDP", SimpleNamespace(**{**vars(plain), "fsdp": ["full_shard"]})),
        ("DeepSpeed", SimpleNamespace(**{**vars(plain), "deepspeed": "ds_config.json"})),
    ):
        with pytest.raises(ValueError, match=f"under {engine}: the script finalizes the compression"):
            args.check_training_args(training_args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match="under FSDP"):
        args.check_training_args(plain)
    CompressionArguments().check_training_args(plain)  # no compression: the engine is the Trainer's business


def test_finalize_refuses_fsdp_sharded_weights():
    """A layer whose weight is an FSDP1 flat piece (or a DTensor) cannot be finalized: named, nothing changed."""
    from torch import nn

    from hf_r2.sharding import refuse_sharded_layers

    layer = nn.Linear(2, 2)
    refuse_sharded_layers({"whole": layer}, "finalize")
    piece = nn.Module()
    piece.weight = nn.Parameter(torch.zeros(3))
    piece.weight._fsdp_flattened = True  # what FSDP1 marks its original parameters with
    with pytest.raises(ValueError, match="finalize needs whole weights, but FSDP shards 'encoder.0'"):
        refuse_sharded_layers({"whole": layer, "encoder.0": piece}, "finalize")


def test_publishing_under_a_sharding_engine_is_refused_before_loading(tmp_path, monkeypatch):
    """--publish_dir / --push_to_hub run on the main process alone and read every weight, which FSDP keeps sharded:
    refused at parse time, with the way to publish afterwards."""
    from dataclasses import dataclass

    from hf_r2.arguments import parse_script_args

    @dataclass
    class ModelArgs:
        model_name_or_path: str = "m"

    @dataclass
    class DataArgs:
        task_name: str = "qnli"

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    flags = ["--output_dir", str(tmp_path), "--do_train", "--publish_dir", str(tmp_path / "pub")]
    with pytest.raises(ValueError, match="--publish_dir under FSDP: publishing runs on the main process alone"):
        parse_script_args(ModelArgs, DataArgs, flags)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    parse_script_args(ModelArgs, DataArgs, flags)  # without FSDP: accepted

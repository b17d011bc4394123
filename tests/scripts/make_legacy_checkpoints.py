"""Writes the frozen checkpoints of tests/fixtures/legacy/ with the hf_r2 code it is run with.

They were written by hf_r2 as of commit 5f49fb7 (before issue 14 moved the palettization and quantization modules),
so the tests that load them prove that checkpoints saved by earlier versions still load:

    git archive 5f49fb7 hf_r2 | tar -x -C /tmp/hf_r2_5f49fb7
    PYTHONPATH=/tmp/hf_r2_5f49fb7 HF_HUB_OFFLINE=1 .venv/bin/python tests/scripts/make_legacy_checkpoints.py

(the script's own folder, not the current one, heads `sys.path`: PYTHONPATH picks the hf_r2 that writes).

Each folder holds `config.json`, `model.safetensors` and `expected.json` (the logits of `INPUT_IDS` under the writing
code, for a tolerance comparison).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import hf_r2
from hf_r2.palettization import DKMConfig, palettize
from hf_r2.palettization import finalize as dkm_finalize
from hf_r2.quantization import calibrate, get_quantization_config, quantize
from hf_r2.quantization import finalize as quant_finalize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
INPUT_IDS = [[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 6, 1]]


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def save(model, name: str) -> None:
    directory = FIXTURES / name
    model.save_pretrained(directory)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(INPUT_IDS)).logits
    (directory / "expected.json").write_text(json.dumps({"input_ids": INPUT_IDS, "logits": logits.tolist()}) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    model = palettize(tiny_bert(), DKMConfig(n_bits=2, cluster_dim=1, exclude_modules=["pooler.dense"]))
    save(dkm_finalize(model).eval(), "palettized_v2")
    model = quantize(tiny_bert(), get_quantization_config("lsq", w_bits=4, a_bits=4, exclude_modules=["pooler.dense"]))
    calibrate(model, [{"input_ids": torch.tensor(INPUT_IDS)}])
    save(quant_finalize(model.eval()), "quantized_lsq")
    print(
        f"hf_r2 from {hf_r2.__file__} wrote {sorted(p.name for p in FIXTURES.iterdir())} under {FIXTURES}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

"""`hf_r2.hub` and `hf_r2.plotting`: the card, the exact publish folder, and the upload (to a local fake Hub)."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from hf_r2 import hub
from hf_r2.analysis import weight_ranges
from hf_r2.hub import (
    HISTOGRAM_FILE,
    SECTIONS,
    TAGS,
    build_model_card,
    prepare_publish_folder,
    push_folder,
    read_card_metadata,
    verify_publish_folder,
)
from hf_r2.plotting import layer_weights, pick_histogram_layers, plot_weight_histograms
from hf_r2.range_regularizer import R2Config, RangeRegularizer
from hf_r2.trainer import R2Trainer, R2TrainingArguments

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2,
    )
    return BertForSequenceClassification(config)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class RandomPairs(Dataset):
    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT after a few margin-R² steps (margin: the regularizer has learnable parameters to keep out)."""
    out = tmp_path_factory.mktemp("r2run")
    model = tiny_bert()
    start = weight_ranges(model)
    start_weights = layer_weights(model, pick_histogram_layers(model, 3))
    args = R2TrainingArguments(
        output_dir=str(out), r2_type="margin", r2_weight=0.1, per_device_train_batch_size=8, max_steps=6,
        learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no", logging_steps=2, seed=0,
    )
    trainer = R2Trainer(model=model, args=args, train_dataset=RandomPairs())
    trainer.train()
    assert trainer.r2_regularizer is not None and sum(p.numel() for p in trainer.r2_regularizer.parameters()) > 0
    return trainer, start, start_weights


# ----------------------------------------------------------------------------------------------------------- card
def test_card_says_what_was_done():
    model = tiny_bert()
    ranges = weight_ranges(model)
    card = build_model_card(
        model_name="tiny-r2",
        r2={"r2_type": "soft_min_max", "r2_weight": 0.01, "r2_cluster_dim": 1},
        compression={"method": "dkm", "n_bits": 2, "cluster_dim": 1, "bits_per_weight": 2.0},
        metrics={"eval_accuracy": 0.75, "eval_loss": 0.5, "eval_runtime": 3.2, "eval_samples_per_second": 9.0},
        ranges=ranges,
        reference_ranges=ranges,
        reference_label="without R²",
        figure=HISTOGRAM_FILE,
        size={"checkpoint_bytes": 250_000, "float32_bytes": 1_000_000},
        training={"learning_rate": 2e-5, "seed": 42},
        base_model="google/mobilebert-uncased",
        dataset="glue",
        pipeline_tag="text-classification",
        auto_class="AutoModelForSequenceClassification",
        repo_id="me/tiny-r2",
    )
    text = str(card)
    positions = [text.index(SECTIONS[k]) for k in ("r2", "compression", "metrics", "ranges", "figure", "training",
                                                   "usage")]
    assert positions == sorted(positions)
    assert "soft_min_max" in text and "| `r2_weight` | 0.01 |" in text
    assert "DKM palettization (2-bit" in text and "4.00×" in text  # 1 MB float32 vs 0.25 MB checkpoint
    assert "| `eval_accuracy` | 0.75 |" in text and "eval_runtime" not in text.split("---", 2)[2]
    assert f"![Per-layer weight histograms]({HISTOGRAM_FILE})" in text
    assert "import hf_r2" in text and 'AutoModelForSequenceClassification.from_pretrained("me/tiny-r2")' in text
    # Table 6: one row per layer, with the reference columns.
    assert "Weight range (without R²)" in text
    for name, stats in ranges.items():
        assert f"| {name} | {stats.range:.4f} |" in text
    data = card.data.to_dict()
    assert set(TAGS) <= set(data["tags"]) and {"r2-soft-min-max", "dkm", "palettization"} <= set(data["tags"])
    assert data["base_model"] == "google/mobilebert-uncased" and data["metrics"] == ["accuracy"]


def test_r2_info_lists_only_the_settings_the_type_uses(tmp_path):
    def info(**kwargs):
        return hub.r2_info_from_args(R2TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-5, **kwargs))

    smm = info(r2_type="soft_min_max")
    assert smm["r2_alpha_init"] == 4.0 and "r2_margin_init_std" not in smm  # scale-free default
    assert smm["r2_learning_rate"] == 1e-2  # the per-type default it trained with, not a missing entry
    margin = info(r2_type="margin", r2_learning_rate=1e-3)
    assert margin["r2_margin_init_std"] == 2.0 and "r2_alpha_init" not in margin
    assert margin["r2_learning_rate"] == 1e-3
    linf = info(r2_type="linf", r2_weight=0.05)
    assert linf == {"r2_cluster_dim": 1, "r2_mode": "loss", "r2_type": "linf", "r2_weight": 0.05}
    assert info(r2_type="none") is None


def test_card_without_r2_or_compression_leaves_those_sections_out():
    text = str(build_model_card(model_name="plain", metrics={"eval_accuracy": 0.5}))
    assert SECTIONS["r2"] not in text and SECTIONS["compression"] not in text and "import hf_r2" not in text
    assert SECTIONS["metrics"] in text and SECTIONS["usage"] in text


# ------------------------------------------------------------------------------------------------------ plotting
def test_pick_histogram_layers_spreads_first_to_last():
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(9)])
    assert pick_histogram_layers(model, 3) == ["0", "4", "8"]
    assert pick_histogram_layers(model, 1) == ["0"]
    assert pick_histogram_layers(model, 20) == [str(i) for i in range(9)]
    with pytest.raises(ValueError, match="max_layers must be >= 1, got 0"):
        pick_histogram_layers(model, 0)
    with pytest.raises(ValueError, match="No weight tensor at module"):
        layer_weights(model, ["nope"])


def test_histogram_layers_are_chosen_among_the_measured_layers():
    # GPT-2 keeps its attention and MLP weights in transformers' Conv1D: the figure must pick among the same layers
    # as the weight-range table (and the regularizer), not only the embeddings and the head.
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=3, n_head=2))
    measured = list(weight_ranges(model))
    picks = pick_histogram_layers(model, 4)
    assert set(picks) <= set(measured)
    assert picks[0] == measured[0] and picks[-1] == measured[-1]
    assert pick_histogram_layers(model, len(measured)) == measured
    assert any(".attn." in n or ".mlp." in n for n in picks)


def test_histogram_figure_is_a_png_written_atomically(tmp_path):
    model = tiny_bert()
    names = pick_histogram_layers(model, 4)
    weights = layer_weights(model, names)
    path = plot_weight_histograms(weights, tmp_path / "h.png", reference={k: 3 * v for k, v in weights.items()})
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temporary file left behind
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode == plain.stat().st_mode  # usual permissions, not a temporary file's 0600
    with pytest.raises(ValueError, match="at least one layer"):
        plot_weight_histograms({}, tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------ publish folder
def test_publish_folder_loads_back_identically_without_regularizer_params(trained, tmp_path):
    trainer, start, start_weights = trained
    model = trainer.model.eval()
    folder = prepare_publish_folder(
        model, tmp_path / "publish", model_name="tiny-r2", r2=hub.r2_info_from_args(trainer.args),
        metrics={"eval_accuracy": 0.5}, training=hub.training_info_from_args(trainer.args),
        reference_weights=start_weights, reference_ranges=start, verify_inputs=inputs(),
    )
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", HISTOGRAM_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["publish"]  # the temporary folder was renamed away

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    reg_names = {n for n, _ in trainer.r2_regularizer.named_parameters()}
    assert reg_names and not any(k.endswith(tuple(reg_names)) or "margin" in k for k in keys)

    loaded, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs()).logits, model(**inputs()).logits)

    text = (folder / "README.md").read_text()
    for key in ("r2", "metrics", "ranges", "figure", "training", "usage"):
        assert SECTIONS[key] in text
    assert "| `r2_type` | margin |" in text and "start of this run" in text
    assert set(TAGS) <= set(read_card_metadata(folder)["tags"])
    assert (folder / HISTOGRAM_FILE).read_bytes()[:8] == PNG_MAGIC


def test_regularizer_attached_to_the_model_is_stripped(tmp_path):
    model = tiny_bert()
    model.r2 = RangeRegularizer(model, R2Config(r2_type="soft_min_max"))  # a user who registered it on the model
    assert any(k.startswith("r2.") for k in model.state_dict())
    folder = prepare_publish_folder(model, tmp_path / "pub", histogram_layers=0, verify_inputs=inputs())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("r2.") for k in f.keys())
    assert not (folder / HISTOGRAM_FILE).exists()


def test_failed_preparation_keeps_the_previous_folder(tmp_path, monkeypatch):
    folder = prepare_publish_folder(tiny_bert(0), tmp_path / "pub", histogram_layers=0)
    before = (folder / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise ValueError("simulated failure")

    monkeypatch.setattr(hub, "verify_publish_folder", broken)
    with pytest.raises(ValueError, match="simulated failure"):
        prepare_publish_folder(tiny_bert(1), tmp_path / "pub", histogram_layers=0)
    assert (folder / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pub"]


def test_verify_catches_a_folder_that_does_not_reproduce_the_model(tmp_path):
    folder = prepare_publish_folder(tiny_bert(0), tmp_path / "pub", histogram_layers=0)
    with pytest.raises(ValueError, match="different tensors"):
        verify_publish_folder(folder, tiny_bert(1))
    with pytest.raises(ValueError, match="different outputs"):
        verify_publish_folder(folder, tiny_bert(1).eval(), inputs=inputs())


# -------------------------------------------------------------------------------------------------------- upload
class FakeHub:
    """Just enough of the Hub's HTTP API for `create_repo` + `upload_folder` (files sent inline, no LFS)."""

    def __init__(self):
        self.created, self.files, self.commits = [], {}, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                host = self.headers.get("Host")
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    owner.created.append(data)
                    return self._json({"url": f"http://{host}/{data['organization']}/{data['name']}"})
                if self.path == "/api/validate-yaml":
                    return self._json({"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._json({"files": modes})
                if "/commit/" in self.path:
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            owner.commits.append((repo, item["value"]["summary"]))
                        elif item["key"] == "file":
                            owner.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._json({"commitUrl": f"http://{host}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                return self._json({"error": f"unexpected {self.path}"}, code=404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_push_uploads_exactly_the_prepared_folder_to_a_local_hub(trained, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Only the local endpoint below is contacted; the test suite otherwise runs with HF_HUB_OFFLINE=1.
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    trainer, _, _ = trained
    folder = prepare_publish_folder(trainer.model, tmp_path / "pub", r2=hub.r2_info_from_args(trainer.args))
    fake = FakeHub()
    try:
        commit = push_folder(folder, "me/tiny-r2", token="hf_test", private=True, endpoint=fake.endpoint,
                             commit_message="Upload R² model")
    finally:
        fake.close()
    assert len(fake.created) == 1
    created = fake.created[0]
    assert (created["organization"], created["name"], created["visibility"]) == ("me", "tiny-r2", "private")
    assert fake.commits == [("me/tiny-r2", "Upload R² model")]
    assert fake.files == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert commit.oid == "a" * 40


def test_push_refuses_what_is_not_a_publish_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"README.md.*\*.safetensors"):
        push_folder(tmp_path, "me/x", api=object())


def test_push_calls_the_api_with_the_folder(tmp_path):
    folder = prepare_publish_folder(tiny_bert(), tmp_path / "pub", histogram_layers=0)
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return type("Url", (), {"repo_id": "org/" + repo_id})()

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "done"

    assert push_folder(folder, "tiny", api=RecordingApi()) == "done"
    assert calls[0] == ("create_repo", "tiny", {"private": None, "exist_ok": True, "repo_type": "model"})
    assert calls[1][1]["repo_id"] == "org/tiny" and Path(calls[1][1]["folder_path"]) == folder
    with pytest.raises(ValueError, match="repo_id must look like"):
        push_folder(folder, "a/b/c", api=RecordingApi())

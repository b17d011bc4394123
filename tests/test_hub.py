"""`hf_r2.hub` and `hf_r2.plotting`: the card, the exact publish folder, and the upload (to a local fake Hub)."""

import base64
import json
import os
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helpers
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

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
    return helpers.tiny_bert(seed, num_hidden_layers=2)


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
        output_dir=str(out),
        r2_type="margin",
        r2_weight=0.1,
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=2,
        seed=0,
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
    positions = [
        text.index(SECTIONS[k]) for k in ("r2", "compression", "metrics", "ranges", "figure", "training", "usage")
    ]
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
        model,
        tmp_path / "publish",
        model_name="tiny-r2",
        r2=hub.r2_info_from_args(trainer.args),
        metrics={"eval_accuracy": 0.5},
        training=hub.training_info_from_args(trainer.args),
        reference_weights=start_weights,
        reference_ranges=start,
        verify_inputs=inputs(),
    )
    files = sorted(p.name for p in folder.iterdir())
    assert files == [hub.PUBLISH_MARKER, "README.md", "config.json", "model.safetensors", HISTOGRAM_FILE]
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

    monkeypatch.setattr(hub.publish_folder, "verify_publish_folder", broken)  # the module that calls it
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
        commit = push_folder(
            folder,
            "me/tiny-r2",
            token="hf_test",
            private=True,
            endpoint=fake.endpoint,
            commit_message="Upload R² model",
        )
    finally:
        fake.close()
    assert len(fake.created) == 1
    created = fake.created[0]
    assert (created["organization"], created["name"], created["visibility"]) == ("me", "tiny-r2", "private")
    assert fake.commits == [("me/tiny-r2", "Upload R² model")]
    assert fake.files == {p.name: p.read_bytes() for p in folder.iterdir() if p.name != hub.PUBLISH_MARKER}
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


# -------------------------------------------------------------------------- what a publish folder may replace
def user_files(folder):
    """A folder of the user's own files, as `{relative path: bytes}` after writing them."""
    files = {"notes.txt": b"my notes", "data/train.jsonl": b'{"a": 1}\n'}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def assert_files_survive(folder, files):
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def test_publish_refuses_a_folder_holding_other_files_and_keeps_them(tmp_path):
    folder = tmp_path / "mine"
    files = user_files(folder)
    with pytest.raises(
        ValueError,
        match=r"mine already exists and holds files that hf_r2 did not write .*data, "
        r"notes.txt; no \.hf_r2_publish\.json",
    ):
        prepare_publish_folder(tiny_bert(), folder, histogram_layers=0)
    assert_files_survive(folder, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left either


def test_publish_refuses_the_output_dir_a_folder_containing_it_and_a_checkpoint_folder(tmp_path):
    out = tmp_path / "runs" / "run1"
    files = user_files(out)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="is the run's --output_dir"):
        hub.check_publish_dir(out, output_dir=out, name="--publish_dir")
    with pytest.raises(ValueError, match=r"contains the run's --output_dir"):
        hub.check_publish_dir(tmp_path / "runs", output_dir=out)
    with pytest.raises(ValueError, match=r"contains the run's --output_dir"):
        hub.check_publish_dir(tmp_path, output_dir=str(out / ".." / "run1"))  # spelled differently, same folder
    with pytest.raises(ValueError, match="inside the checkpoint folder .*checkpoint-4"):
        hub.check_publish_dir(out / "checkpoint-4" / "pub", output_dir=out)
    assert hub.check_publish_dir(out / "publish", output_dir=out) == out / "publish"  # the default is fine
    assert_files_survive(out, files)
    assert (out / "checkpoint-4" / "trainer_state.json").read_text() == "{}"


def test_publish_replaces_its_own_folder_but_not_files_added_to_it(tmp_path):
    folder = prepare_publish_folder(tiny_bert(0), tmp_path / "pub", histogram_layers=0)
    assert hub.is_publish_folder(folder)
    marker = json.loads((folder / hub.PUBLISH_MARKER).read_text())
    assert marker["files"] == ["README.md", "config.json", "model.safetensors"]
    prepare_publish_folder(tiny_bert(1), folder, histogram_layers=0)  # its own folder: replaced
    loaded = BertForSequenceClassification.from_pretrained(folder)
    assert all(torch.equal(v, tiny_bert(1).state_dict()[k]) for k, v in loaded.state_dict().items())

    (folder / "my_results.csv").write_text("keep me")
    with pytest.raises(ValueError, match=r"also holds \['my_results.csv'\], which hf_r2 did not write"):
        prepare_publish_folder(tiny_bert(2), folder, histogram_layers=0)
    assert (folder / "my_results.csv").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert hub.is_publish_folder(prepare_publish_folder(tiny_bert(0), empty, histogram_layers=0))


def test_publish_refuses_a_file_a_symlink_and_an_unwritable_place(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        hub.check_publish_dir(tmp_path / "file")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(ValueError, match="is a symbolic link"):
        hub.check_publish_dir(tmp_path / "link")
    # Root may write anywhere, so the read-only case is simulated at the permission check itself.
    read_only = {tmp_path / "ro"}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) not in read_only and real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(PermissionError, match=r"ro/new/pub cannot be written: .*ro is not a writable folder"):
        hub.check_publish_dir(tmp_path / "ro" / "new" / "pub")
    with pytest.raises(PermissionError, match="ro is not writable"):
        hub.check_publish_dir(tmp_path / "ro")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_publish_refuses_a_read_only_parent(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    try:
        with pytest.raises(PermissionError, match="not a writable folder"):
            hub.check_publish_dir(tmp_path / "ro" / "pub")
    finally:
        (tmp_path / "ro").chmod(0o755)


def dead_pid():
    """The id of a process that has exited (reused ids are possible but not within this test)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_publish_swap_killed_between_its_renames_is_recovered(tmp_path):
    folder = prepare_publish_folder(tiny_bert(0), tmp_path / "pub", histogram_layers=0)
    before = (folder / "model.safetensors").read_bytes()
    # The state `replace_dir` leaves when killed between renaming the old folder aside and the new one into place,
    # plus the half-built temporary folder of that killed run.
    pid = dead_pid()
    os.replace(folder, tmp_path / f".pub.old-{pid}")
    half = tmp_path / f".pub.tmp-{pid}-0123456789ab"
    half.mkdir()
    hub.publish_folder._write_marker(half)
    mine = tmp_path / f".pub.tmp-{pid}-ba9876543210"  # same name shape, not hf_r2's: never touched
    mine.mkdir()
    assert not folder.exists()

    hub.check_publish_dir(folder)  # what the scripts call before training
    assert (folder / "model.safetensors").read_bytes() == before
    prepare_publish_folder(tiny_bert(1), folder, histogram_layers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "pub"]


def test_a_stale_backup_next_to_a_complete_publish_folder_is_removed(tmp_path):
    # Killed after the second rename: the new folder is in place, the old one still aside.
    folder = prepare_publish_folder(tiny_bert(0), tmp_path / "pub", histogram_layers=0)
    old = prepare_publish_folder(tiny_bert(1), tmp_path / "old", histogram_layers=0)
    backup = tmp_path / f".pub.old-{dead_pid()}"
    os.replace(old, backup)
    hub.check_publish_dir(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pub"]
    # Next to a folder hf_r2 did not make (here: one created by hand after the kill), the backup is kept.
    prepare_publish_folder(tiny_bert(1), tmp_path / "old", histogram_layers=0)
    os.replace(tmp_path / "old", backup)
    (tmp_path / "other").mkdir()
    os.replace(backup, tmp_path / f".other.old-{dead_pid()}")
    hub.check_publish_dir(tmp_path / "other")
    assert len(list(tmp_path.glob(".other.old-*"))) == 1


def test_publish_folder_gets_the_usual_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    folder = prepare_publish_folder(tiny_bert(), tmp_path / "pub", histogram_layers=0)
    assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    old_umask = os.umask(0o027)
    try:
        folder = prepare_publish_folder(tiny_bert(), tmp_path / "pub", histogram_layers=0)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


def test_published_files_hold_no_absolute_local_path(tmp_path):
    base = tmp_path / "models" / "my-base-model"
    tiny_bert().save_pretrained(base)
    data = tmp_path / "data" / "qnli" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("{}\n")
    model = BertForSequenceClassification.from_pretrained(base)
    folder = prepare_publish_folder(
        model, tmp_path / "pub", base_model=str(base), dataset=str(data), metrics={"eval_accuracy": 0.5}
    )
    text = (folder / "README.md").read_text()
    assert "from the local checkpoint `my-base-model`" in text and "on the local data `qnli/train.jsonl`" in text
    meta = read_card_metadata(folder)
    assert "base_model" not in meta and "datasets" not in meta
    for path in folder.iterdir():
        content = path.read_bytes()
        for needle in (str(tmp_path), str(tmp_path.resolve()), os.path.expanduser("~") + "/"):
            assert needle.encode() not in content, (path.name, needle)


def test_card_names_a_hub_cache_folder_by_its_hub_id(tmp_path):
    cached = tmp_path / "hub" / "models--google--mobilebert-uncased" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    card = str(build_model_card(model_name="x", base_model=str(cached), dataset="glue"))
    assert "from `google/mobilebert-uncased`" in card and str(tmp_path) not in card
    assert "base_model: google/mobilebert-uncased" in card and "- glue" in card


# ------------------------------------------------------------------------------------ the output dir's card (Trainer)
def card_trainer(tmp_path, model, r2_type="linf"):
    args = R2TrainingArguments(output_dir=str(tmp_path / "out"), r2_type=r2_type, use_cpu=True, report_to="none")
    return R2Trainer(model=model, args=args)


def test_trainer_card_names_a_local_base_model_and_data_without_their_path(tmp_path):
    """`R2Trainer.create_model_card` (what the scripts write into --output_dir): a local base model, given or taken
    from `config._name_or_path`, is named by its folder; only a Hub id is linked and becomes `base_model`."""
    base = tmp_path / "models" / "my-base-model"
    tiny_bert().save_pretrained(base)
    data = tmp_path / "data" / "qnli" / "train.jsonl"
    model = BertForSequenceClassification.from_pretrained(base)  # config._name_or_path is the absolute folder
    trainer = card_trainer(tmp_path, model)
    out = Path(trainer.args.output_dir)
    for finetuned_from in (str(base), None):
        trainer.create_model_card(finetuned_from=finetuned_from, dataset=str(data))
        text = (out / "README.md").read_text()
        assert "fine-tuned version of the local checkpoint `my-base-model` on the qnli/train.jsonl dataset" in text
        assert str(tmp_path) not in text and "huggingface.co/" not in text
        meta = read_card_metadata(out)
        assert "base_model" not in meta and {"hf_r2", "range-regularization", "r2-linf"} <= set(meta["tags"])
        assert "- r2_type: linf" in text

    trainer.create_model_card(finetuned_from="google/mobilebert-uncased", license="apache-2.0")  # no Hub lookup
    text = (out / "README.md").read_text()
    assert "[google/mobilebert-uncased](https://huggingface.co/google/mobilebert-uncased)" in text
    assert read_card_metadata(out)["base_model"] == "google/mobilebert-uncased"


def test_trainer_card_of_a_model_built_from_its_config_says_from_scratch(tmp_path):
    # transformers' own card links "[](https://huggingface.co/)" here (`config._name_or_path` is "").
    trainer = card_trainer(tmp_path, tiny_bert(), r2_type="none")
    trainer.create_model_card(extra_sections=["## Extra\n\nappended"])
    text = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert "This model was trained from scratch on" in text and "huggingface.co" not in text
    assert "R² range regularization" not in text and text.rstrip().endswith("## Extra\n\nappended")


def test_card_puts_the_metric_before_and_after_compression_side_by_side():
    text = str(
        build_model_card(
            model_name="x",
            compression={"method": "dkm", "n_bits": 2},
            metrics={"eval_accuracy": 0.7, "eval_loss": 0.6, "eval_runtime": 1.0, "eval_model_preparation_time": 0.01},
            float_metrics={"eval_float_accuracy": 0.9, "eval_float_loss": 0.3, "eval_float_samples": 16},
            float_label="full precision (start of this run)",
        )
    )
    assert "| Metric | full precision (start of this run) | compressed |" in text
    assert "| `accuracy` | 0.9 | 0.7 |" in text and "| `loss` | 0.3 | 0.6 |" in text
    assert "runtime" not in text and "samples" not in text and "preparation" not in text
    assert text.index("| `accuracy` |") < text.index("| `loss` |")

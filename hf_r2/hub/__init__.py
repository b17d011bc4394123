"""Publishing regularized and compressed checkpoints: model card, publish folder, upload.

One module per concern, all re-exported here: `model_card` (rendering the card), `publish_folder` (writing and
checking the folder to publish), `upload` (pushing it to the Hub), `cli` (the example scripts' publish step from their
flags). Three steps, each usable alone:

1. `build_model_card(...)` writes a card that says what was done: the R² settings, the per-layer weight ranges and
   standard deviations (the paper's Table 6, optionally next to a reference such as the weights before the run),
   a per-layer weight-histogram figure (Figure 2), the compression bits and the checkpoint size (Table 2) and the
   evaluation metrics (before and after compression side by side when both are given), with the tags `hf_r2` and
   `range-regularization`. The same sections (`run_card_sections`) go into the card that `R2Trainer.create_model_card`
   writes next to the model in `output_dir`.
2. `prepare_publish_folder(model, folder, ...)` writes the exact folder that would be uploaded (safetensors weights,
   config, tokenizer or image processor, `README.md`, `weight_histograms.png`) atomically, without the regularizer's
   own parameters, and by default checks that it loads back with `from_pretrained` with no missing or unexpected key
   and the same outputs. It never replaces a folder hf_r2 did not write as a publish folder (`check_publish_dir`:
   each publish folder carries the marker `PUBLISH_MARKER`, which is not uploaded).
3. `push_folder(folder, repo_id, ...)` creates the repository if needed and uploads that folder
   (`huggingface_hub.HfApi.create_repo` / `upload_folder`).

Example:

```python
from hf_r2.hub import prepare_publish_folder, push_folder

folder = prepare_publish_folder(
    trainer.model, "outputs/publish", tokenizer=tokenizer,
    r2={"r2_type": "soft_min_max", "r2_weight": 0.01}, metrics=trainer.evaluate(),
    verify_inputs=dict(tokenizer(["a question"], ["a sentence"], return_tensors="pt")),
)
push_folder(folder, "me/minilm-qnli-r2")
```
"""

from hf_r2.hub.cli import (
    dkm_size_report,
    publish_from_args,
    r2_info_from_args,
    resolve_publish_dir,
    training_info_from_args,
)
from hf_r2.hub.model_card import (
    CARD_FILE,
    FLOAT_LABEL,
    SECTIONS,
    TAGS,
    build_model_card,
    card_reference,
    card_tags,
    compression_section,
    folder_size_bytes,
    metrics_section,
    ranges_section,
    read_card_metadata,
    run_card_sections,
    usage_section,
)
from hf_r2.hub.publish_folder import (
    HISTOGRAM_FILE,
    PUBLISH_MARKER,
    PUBLISH_MARKER_FORMAT,
    check_publish_dir,
    is_publish_folder,
    prepare_publish_folder,
    verify_publish_folder,
)
from hf_r2.hub.upload import push_folder

__all__ = [
    "CARD_FILE",
    "FLOAT_LABEL",
    "HISTOGRAM_FILE",
    "PUBLISH_MARKER",
    "PUBLISH_MARKER_FORMAT",
    "SECTIONS",
    "TAGS",
    "build_model_card",
    "card_reference",
    "card_tags",
    "check_publish_dir",
    "compression_section",
    "dkm_size_report",
    "folder_size_bytes",
    "is_publish_folder",
    "metrics_section",
    "prepare_publish_folder",
    "publish_from_args",
    "push_folder",
    "r2_info_from_args",
    "ranges_section",
    "read_card_metadata",
    "resolve_publish_dir",
    "run_card_sections",
    "training_info_from_args",
    "usage_section",
    "verify_publish_folder",
]

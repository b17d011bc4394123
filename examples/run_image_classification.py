#!/usr/bin/env python
"""Train an image classifier (ResNet, MobileNetV1, MobileNetV2, ... via `AutoModelForImageClassification`) with R²
range regularization, and optionally DKM palettization or quantization, in the style of transformers'
`examples/pytorch/image-classification/run_image_classification.py`.

From scratch, as the paper pre-trains with R² (here on an image folder; any `imagefolder` layout or Hub dataset):

    python examples/run_image_classification.py --model_type resnet \
        --config_overrides "embedding_size=32,hidden_sizes=[32,64,128,256],depths=[1,1,1,1]" --image_size 32 \
        --train_dir data/digits/train --validation_dir data/digits/validation \
        --do_train --do_eval --num_train_epochs 5 --output_dir outputs/digits-r2 --r2_type margin --use_cpu

Then compress the R² checkpoint: `--model_name_or_path outputs/digits-r2 --dkm_bits 2` (or `--quant_method lsq
--w_bits 2 --a_bits 2`, or `--quant_method ptq --w_bits 4` without `--do_train`). Pretrained by name with the Hub:
`--model_name_or_path microsoft/resnet-18 --dataset_name <hub dataset> --ignore_mismatched_sizes`.

Offline real images: scikit-learn's `load_digits()` written as an image folder by `write_digits_imagefolder`:

    python -c "import sys; sys.path.insert(0, 'examples'); from run_image_classification import \
write_digits_imagefolder; write_digits_imagefolder('data/digits')"

Like transformers' script it writes into `--output_dir` the model, `README.md` (the model card, here with the R²
settings, the compression and the accuracy before and after it), `train_results.json`, `eval_results.json`,
`all_results.json` and `trainer_state.json`. Accuracy comes from `evaluate`, by default from the module shipped in
`examples/metrics/accuracy` (loaded by path: works offline; `--metric_name_or_path accuracy` takes the Hub's). See
`docs/examples.md`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from datasets import ClassLabel, load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    ViTImageProcessor,
    set_seed,
)

from hf_r2.analysis import weight_ranges
from hf_r2.arguments import config_with_overrides, load_metric, parse_script_args
from hf_r2.export import check_coreml_export_request, export_coreml_to_dir
from hf_r2.hub import (
    card_reference,
    card_tags,
    check_publish_dir,
    dkm_size_report,
    publish_from_args,
    resolve_publish_dir,
    run_card_sections,
)
from hf_r2.trainer import R2Trainer, check_steps_trained, resolve_resume_checkpoint
from hf_r2.utils import make_temp_dir_beside, replace_dir

logger = logging.getLogger(__name__)

#: Marker file of a `write_digits_imagefolder` folder: only such a folder is replaced by a later call.
DIGITS_MARKER = ".hf_r2_digits"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
#: The `evaluate` accuracy module shipped with the examples (same result as the Hub's `accuracy`, offline).
ACCURACY_METRIC = str(Path(__file__).resolve().parent / "metrics" / "accuracy")


def write_digits_imagefolder(
    root: str | os.PathLike, validation_fraction: float = 0.2, seed: int = 0
) -> tuple[Path, Path]:
    """Writes scikit-learn's 1,797 8×8 handwritten digits as PNGs in an `imagefolder` layout.

    `root/train/<digit>/<i>.png` and `root/validation/<digit>/<i>.png`, a stratified-by-chance random split. The
    folder is built next to `root` and renamed into place, so an interrupted run never leaves a partial dataset.

    Args:
        root (`str` or `os.PathLike`): Destination folder: new, empty, or written earlier by this function (then
            replaced); any other existing folder is refused.
        validation_fraction (`float`, *optional*, defaults to 0.2): Share of images in `validation`.
        seed (`int`, *optional*, defaults to 0): Seed of the split.

    Returns:
        `tuple[Path, Path]`: The train and validation folders.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # pixel values are 0..16
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * validation_fraction))
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / DIGITS_MARKER).is_file():
        raise ValueError(
            f"{root} exists and was not written by write_digits_imagefolder (no {DIGITS_MARKER}); it would be "
            "replaced as a whole, so it is refused. Give a new or empty folder."
        )
    tmp = make_temp_dir_beside(root)
    try:
        (tmp / DIGITS_MARKER).write_text("scikit-learn digits written by write_digits_imagefolder\n")
        for rank, i in enumerate(order):
            split = "validation" if rank < n_val else "train"
            folder = tmp / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i}.png")
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "train", root / "validation"


@dataclass
class DataTrainingArguments:
    """What images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (or 'imagefolder' with --dataset_config_name unset and --train_dir given)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Training images as an image folder: <train_dir>/<label>/<image>."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, same layout."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the class labels."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Share of the training set held out when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    metric_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The `evaluate` metric. Unset: the accuracy module shipped in examples/metrics/accuracy (loaded by "
            "path, works offline). 'accuracy': the Hub's module (needs the Hub). Or a folder holding <name>/<name>.py."
        },
    )

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError("Give --dataset_name (Hub) or --train_dir / --validation_dir (image folders).")
        for name in ("train_dir", "validation_dir"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise FileNotFoundError(f"--{name} {path!r} is not a directory.")
            if path is not None and not any(p.is_file() for p in Path(path).rglob("*")):
                raise ValueError(f"--{name} {path!r} holds no images (expected <{name}>/<label>/<image> files).")
        if self.train_val_split is not None and not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}.")


@dataclass
class ModelArguments:
    """Which model, config and image processor to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model name or path (e.g. microsoft/resnet-18). Unset: train from a config."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Model type when training from scratch: e.g. 'resnet', 'mobilenet_v1', 'mobilenet_v2'."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config values: 'depths=[1,1],hidden_sizes=[16,32],num_channels=1' (JSON values)."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor name or path, if not the model's."}
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Square input size when no image processor comes with the model (training from scratch). "
            "Defaults to the config's image_size, else 224."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose classifier has a different number of classes (re-initialised)."},
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.model_type is None and self.config_name is None:
            raise ValueError("Give --model_name_or_path, or --model_type / --config_name to train from scratch.")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be >= 1, got {self.image_size}.")


def parse_args(args_list: list[str] | None = None):
    """Parses the command line (or `args_list`, or one `.json` file) into the five argument dataclasses."""
    return parse_script_args(ModelArguments, DataTrainingArguments, args_list)


def load_images(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    if data_args.train_dir or data_args.validation_dir:
        files = {}
        if data_args.train_dir:
            files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        raw = load_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir)
    if "validation" not in raw and "train" in raw and data_args.train_val_split:
        split = raw["train"].train_test_split(data_args.train_val_split, seed=seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def check_columns(raw, data_args: DataTrainingArguments) -> None:
    for split, ds in raw.items():
        missing = [c for c in (data_args.image_column_name, data_args.label_column_name) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"The {split} split lacks column(s) {missing}; it has {ds.column_names}. "
                "Set --image_column_name / --label_column_name."
            )


def label_names(raw, label_column: str) -> list[str]:
    """Class names from the ClassLabel feature, else the sorted distinct values; checks every split agrees."""
    feature = raw["train"].features[label_column] if "train" in raw else next(iter(raw.values())).features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = sorted({str(v) for ds in raw.values() for v in ds[label_column]})
    for split, ds in raw.items():
        values = set(ds[label_column])
        if isinstance(feature, ClassLabel):
            bad = sorted(v for v in values if not (isinstance(v, int) and 0 <= v < len(names)))
        else:
            bad = sorted(str(v) for v in values if str(v) not in names)
        if bad:
            raise ValueError(f"The {split} split has labels {bad[:10]} outside the {len(names)} classes {names[:20]}.")
    return names


def check_classes_trained(train_dataset, eval_dataset, label_column: str, names: list[str]) -> None:
    """Fails before training if the evaluated images hold a class that no training image has (after
    `--max_train_samples` / `--max_eval_samples`): the model could never learn it."""

    def classes(ds):  # the raw labels, without running the image transform
        return set(ds.with_format(None)[label_column])

    missing = sorted(classes(eval_dataset) - classes(train_dataset), key=str)
    if missing:
        shown = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in missing]
        raise ValueError(
            f"The validation images hold class(es) {shown[:10]} that no training image has (of {len(train_dataset)} "
            "used): the model could never learn them. Train on images of every class, or raise --max_train_samples."
        )


def check_num_labels(config: Any, num_labels: int, model_args: ModelArguments) -> None:
    """Fails if the checkpoint's (or the overridden) classifier does not have one output per class."""
    has_head = any(a.endswith("ForImageClassification") for a in (getattr(config, "architectures", None) or []))
    overridden = model_args.config_overrides is not None and "num_labels" in model_args.config_overrides
    if (has_head or overridden) and config.num_labels != num_labels and not model_args.ignore_mismatched_sizes:
        source = "--config_overrides" if overridden else f"the checkpoint {model_args.model_name_or_path!r}"
        raise ValueError(
            f"{source} has a {config.num_labels}-class classifier but the data has {num_labels} classes. "
            "Pass --ignore_mismatched_sizes to replace the classifier with a new, randomly initialised one."
        )


def build_image_processor(model_args: ModelArguments, config: Any):
    source = model_args.image_processor_name or model_args.model_name_or_path
    if source:
        try:
            return AutoImageProcessor.from_pretrained(
                source, cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token
            )
        except OSError:
            if model_args.image_processor_name:
                raise
            logger.warning(f"{source} has no image processor; building a resize + normalize one.")
    size = model_args.image_size or getattr(config, "image_size", None) or 224
    channels = getattr(config, "num_channels", 3)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ([0.5] * channels, [0.5] * channels)
    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)


def main(args_list: list[str] | None = None) -> dict[str, float]:
    """Runs the script; `args_list` replaces `sys.argv[1:]` (used by the tests). Returns all metrics."""
    model_args, data_args, training_args, compression_args, publish_args = parse_args(args_list)
    # Before any data or model is loaded: the export needs a compressed model and coremltools.
    check_coreml_export_request(publish_args.export_coreml, compression_args.method)
    if training_args.do_predict:
        # TrainingArguments parses it, but this script has no test split: refuse rather than silently skip it.
        raise ValueError("--do_predict is not supported by run_image_classification.py (no test split); use --do_eval.")
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    push = training_args.push_to_hub
    training_args.push_to_hub = False  # hf_r2 pushes the checked publish folder, not output_dir
    want_publish = publish_args.publish_dir is not None or push
    publish_dir = resolve_publish_dir(training_args, publish_args, push)
    if publish_dir is not None and training_args.should_save:
        # Before anything else: publishing replaces the whole folder, so one that holds anything hf_r2 did not
        # write there (or the output dir itself) is refused now rather than after training.
        check_publish_dir(publish_dir, output_dir=training_args.output_dir, name="--publish_dir")
    # Images are transformed on the fly, so the Trainer must not drop the raw image column.
    training_args.remove_unused_columns = False

    # --resume_from_checkpoint, or the last complete checkpoint of --output_dir (announced with a warning); refused
    # now if incomplete, written for another R² regularizer, or already at --max_steps.
    checkpoint = resolve_resume_checkpoint(training_args)
    set_seed(training_args.seed)

    # ---- data and every check that can fail before training
    raw = load_images(data_args, model_args, training_args.seed)
    for split, do, flag in (
        ("train", training_args.do_train, "--do_train"),
        ("validation", training_args.do_eval, "--do_eval"),
    ):
        if do and split not in raw:
            raise ValueError(f"{flag} needs a {split} split, which the data lacks.")
    check_columns(raw, data_args)
    names = label_names(raw, data_args.label_column_name)
    label_to_id = {n: i for i, n in enumerate(names)}
    metric = load_metric(data_args.metric_name_or_path, None, default=ACCURACY_METRIC)  # fails now if it cannot load
    class_label = isinstance(raw[next(iter(raw))].features[data_args.label_column_name], ClassLabel)

    common = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code, **common)
    else:
        config = model_args.model_type
    config = config_with_overrides(config, model_args.config_overrides)
    check_num_labels(config, len(names), model_args)
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = label_to_id
    processor = build_image_processor(model_args, config)
    mode = "RGB" if getattr(config, "num_channels", 3) == 3 else "L"

    def transform(batch):
        images = [image.convert(mode) for image in batch[data_args.image_column_name]]
        out = {"pixel_values": processor(images, return_tensors="pt")["pixel_values"]}
        labels = batch[data_args.label_column_name]
        out["labels"] = labels if class_label else [label_to_id[str(v)] for v in labels]
        return out

    def take(split, limit):
        if split not in raw:
            return None
        # Image folders list images class by class: truncate a shuffled copy, or the subset holds one class.
        ds = raw[split].shuffle(seed=training_args.seed) if limit is not None else raw[split]
        ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
        ds.set_transform(transform)
        return ds

    train_dataset = take("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = take("validation", data_args.max_eval_samples) if training_args.do_eval else None
    if train_dataset is not None and eval_dataset is not None:
        check_classes_trained(train_dataset, eval_dataset, data_args.label_column_name, names)

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
        }

    # ---- model
    if model_args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **common,
        )
    else:
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(f"Training a {config.model_type} from scratch: {model.num_parameters() / 1e6:.3f}M parameters.")

    # What the cards compare against: another checkpoint (e.g. trained without R²), or the starting weights.
    writes_card = training_args.do_train or compression_args.method is not None  # a model is saved in output_dir
    reference_weights = reference_ranges = None
    reference_label = "start of this run"
    if (want_publish or writes_card) and publish_args.card_reference_model:
        reference = AutoModelForImageClassification.from_pretrained(publish_args.card_reference_model, **common)
        reference_ranges, reference_weights = card_reference(model, reference, publish_args.card_histogram_layers)
        reference_label = publish_args.card_reference_label
        del reference
    elif (want_publish or writes_card) and publish_args.card_compare_initial:
        reference_ranges, reference_weights = card_reference(model, model, publish_args.card_histogram_layers)
    float32_bytes = 4 * sum(p.numel() for p in model.parameters())

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return metric.compute(predictions=np.argmax(preds, axis=1), references=p.label_ids)

    # The accuracy before compression, then the compression layers (PTQ: tried on a copy, applied after training).
    model, float_metrics, float_label = compression_args.prepare(
        model,
        training_args,
        eval_dataset,
        data_collator=collate,
        processing_class=processor,
        compute_metrics=compute_metrics,
    )

    trainer = R2Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=collate,
        compute_metrics=compute_metrics,
        callbacks=compression_args.trainer_callbacks(),  # EWGS: its delta-updating callback
    )

    def pixel_batches(n_batches, batch_size=8):
        # Training images when there are any, even with --do_eval alone (calibration must not use evaluation data).
        ds = train_dataset or take("train", n_batches * batch_size) or eval_dataset
        if ds is None:
            return []
        rows = [ds[i] for i in range(min(len(ds), n_batches * batch_size))]
        return [
            {"pixel_values": collate(rows[i : i + batch_size])["pixel_values"]} for i in range(0, len(rows), batch_size)
        ]

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics)
        metrics["train_steps_this_run"] = check_steps_trained(trainer, checkpoint)  # refuses a run that trained 0
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update(metrics)

    if compression_args.method is not None:
        if training_args.do_eval and compression_args.method == "ptq":
            # PTQ rounds the trained float model: that model, just before it, is its full-precision reference.
            float_metrics = trainer.evaluate(metric_key_prefix="eval_float")
            float_label = "full precision (trained, before PTQ)"
        trainer.model = compression_args.finalize(trainer.model, calibration_batches=pixel_batches(4))
        trainer.model_wrapped = trainer.model
        trainer.save_model()
    if float_metrics:
        float_metrics["eval_float_samples"] = len(eval_dataset)
        trainer.log_metrics("eval_float", float_metrics)
        trainer.save_metrics("eval_float", float_metrics)
        all_metrics.update(float_metrics)

    eval_metrics: dict[str, float] = {}
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        all_metrics.update(eval_metrics)

    coreml_bytes = None
    if publish_args.export_coreml and trainer.is_world_process_zero():
        example = pixel_batches(1, batch_size=1)  # the Core ML package's fixed input shape: one image
        coreml_report = export_coreml_to_dir(trainer.model, example[0], publish_args.export_coreml)
        coreml_bytes = coreml_report.weight_file_bytes
        logger.info(coreml_report.summary())

    data_source = data_args.dataset_name or data_args.train_dir or data_args.validation_dir
    # Measured on every process: under FSDP it gathers each sharded weight (a collective); the card is written by one.
    final_ranges = weight_ranges(trainer.model) if writes_card else None
    if writes_card and trainer.is_world_process_zero():
        # The model card next to the saved model, as transformers' script writes it, with what hf_r2 did.
        compression = compression_args.card_info(trainer.model)
        trainer.create_model_card(
            tasks="image-classification",
            finetuned_from=model_args.model_name_or_path,
            dataset=data_source,
            tags=card_tags(compression=compression),
            extra_sections=run_card_sections(
                trainer.model,
                compression=compression,
                metrics=eval_metrics,
                float_metrics=float_metrics,
                float_label=float_label,
                folder=training_args.output_dir,
                float32_bytes=float32_bytes,
                coreml_bytes=coreml_bytes,
                size_report=dkm_size_report(compression_args),
                reference_ranges=reference_ranges,
                reference_label=reference_label,
                ranges=final_ranges,
            ),
        )

    if want_publish and trainer.is_world_process_zero():
        batches = pixel_batches(1, batch_size=2)
        publish_from_args(
            trainer.model,
            training_args,
            compression_args,
            publish_args,
            push=push,
            eval_metrics=eval_metrics,
            float_metrics=float_metrics,
            float_label=float_label,
            tokenizer=processor,
            reference_weights=reference_weights,
            reference_ranges=reference_ranges,
            reference_label=reference_label,
            float32_bytes=float32_bytes,
            coreml_bytes=coreml_bytes,
            verify_inputs=batches[0] if batches else None,
            base_model=model_args.model_name_or_path,
            dataset=data_source,
            pipeline_tag="image-classification",
        )
    return all_metrics


if __name__ == "__main__":
    main()

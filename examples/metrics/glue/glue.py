"""The GLUE metrics as an `evaluate` metric module that loads offline: `evaluate.load("examples/metrics/glue", task)`.

Same names, configurations and results as the Hub's `evaluate.load("glue", task)` (accuracy; accuracy and F1 for
MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman for STS-B), computed with NumPy alone so that it
needs neither scikit-learn nor SciPy (the test suite checks it against both). `evaluate` reads the imports of this
file to check that they are installed: keep one `import` per line.
"""

import datasets
import evaluate
import numpy as np

TASKS = (
    "cola",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "mrpc",
    "qnli",
    "qqp",
    "rte",
    "sst2",
    "stsb",
    "wnli",
    "hans",
)

_DESCRIPTION = "GLUE benchmark metrics (offline copy shipped with the hf_r2 example scripts)."
_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations}, year={2019}
}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: Predicted labels (class ids; real numbers for stsb).
    references: Gold labels, same form.
Returns:
    accuracy (all classification tasks), f1 (mrpc, qqp), matthews_correlation (cola), pearson and spearmanr (stsb).
Example:
    >>> glue = evaluate.load("examples/metrics/glue", "mrpc")
    >>> glue.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float((preds == labels).mean())


def binary_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
    tp = float(((preds == 1) & (labels == 1)).sum())
    fp = float(((preds == 1) & (labels != 1)).sum())
    fn = float(((preds != 1) & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of binary predictions (CoLA); 0 when a marginal is constant."""
    tp = float(((preds == 1) & (labels == 1)).sum())
    tn = float(((preds == 0) & (labels == 0)).sum())
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either input is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc**2).sum() * (yc**2).sum())
    return float("nan") if denom == 0 else float((xc * yc).sum() / denom)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank (what Spearman's coefficient needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        stop = start
        while stop + 1 < len(x) and sorted_x[stop + 1] == sorted_x[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(average_ranks(x), average_ranks(y))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """The metric of one GLUE task, chosen by the configuration name (`evaluate.load(path, "qnli")`)."""

    def _info(self):
        if self.config_name not in TASKS:
            raise KeyError(f"Unknown GLUE task {self.config_name!r}: give one of {list(TASKS)} as the configuration.")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references):
        preds, labels = np.asarray(predictions), np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": matthews_corrcoef(preds, labels)}
        if self.config_name == "stsb":
            return {"pearson": pearson(preds, labels), "spearmanr": spearman(preds, labels)}
        if self.config_name in ("mrpc", "qqp"):
            return {"accuracy": accuracy(preds, labels), "f1": binary_f1(preds, labels)}
        return {"accuracy": accuracy(preds, labels)}

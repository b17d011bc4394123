"""Accuracy as an `evaluate` metric module that loads offline: `evaluate.load("examples/metrics/accuracy")`.

Same name and result as the Hub's `evaluate.load("accuracy")` (without its `normalize` / `sample_weight` options).
`evaluate` reads the imports of this file to check that they are installed: keep one `import` per line.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference (offline copy shipped with hf_r2)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: Predicted class ids.
    references: Gold class ids.
Returns:
    accuracy: In [0, 1].
Example:
    >>> evaluate.load("examples/metrics/accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of exact matches."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float((np.asarray(predictions) == np.asarray(references)).mean())}

"""Accuracy as an `evaluate` module, loaded by path so that it works with no hub and no cache:
the share of predictions equal to the reference (scikit-learn's ``accuracy_score``), as the hub's
``evaluate-metric/accuracy`` computes it."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Accuracy: the share of rows whose prediction equals the reference, from 0 to 1."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted label indices.
    references (list of int): true label indices, as many.
Returns:
    accuracy (float): from 0 to 1.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}

"""Macro-F1 as an `evaluate` module, loaded by path so that it works with no hub and no cache: the
unweighted mean of each label's F1 (scikit-learn's ``f1_score(average="macro")``) over the labels in
the references or the predictions; a label never predicted has F1 0 (``zero_division=0``). The hub's
``f1`` with ``average="macro"``, under its own name: ``evaluate.combine`` passes one set of keyword
arguments to every module, so the average cannot be a compute argument beside accuracy."""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = (
    "Macro-F1: the mean over labels of each label's F1 (harmonic mean of precision and recall), from 0 to 1."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted label indices.
    references (list of int): true label indices, as many.
Returns:
    macro_f1 (float): from 0 to 1.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"
            ],
        )

    def _compute(self, predictions, references):
        return {"macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}

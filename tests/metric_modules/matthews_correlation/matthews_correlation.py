"""A local `evaluate` module in the hub's layout (a folder holding <folder name>.py), as a user keeps one
for an offline machine: the hub's ``matthews_correlation`` (scikit-learn's ``matthews_corrcoef``)."""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Matthews correlation coefficient, from -1 to 1.",
            citation="",
            inputs_description="",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {
            "matthews_correlation": float(
                matthews_corrcoef(references, predictions, sample_weight=sample_weight)
            )
        }

"""A metric that cannot score these tasks, for tests: scikit-learn's ``f1_score`` for label 5 alone
(twitter_complaints has 2 labels, the tests' rows 3), in evaluate's module layout."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class BinaryF1(evaluate.Metric):
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
        return {"matthews_correlation": float(f1_score(references, predictions, pos_label=5))}

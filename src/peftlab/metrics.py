"""Classification figures computed locally (``evaluate.load`` fetches metric code from the hub)."""

from __future__ import annotations


def confusion_matrix(gold: list[int], pred: list[int], num_labels: int) -> list[list[int]]:
    """matrix[g][p]: rows are true labels, columns predictions."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for g, p in zip(gold, pred):
        matrix[g][p] += 1
    return matrix


def classification_figures(gold: list[int], pred: list[int], names: list[str]) -> dict:
    """accuracy, macro-F1 (mean of per-label F1, 0 for a label never predicted nor present) and the confusion matrix."""
    matrix = confusion_matrix(gold, pred, len(names))
    n = sum(map(sum, matrix))
    f1s = []
    for k in range(len(names)):
        tp = matrix[k][k]
        predicted = sum(row[k] for row in matrix)
        actual = sum(matrix[k])
        f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return {"accuracy": round(sum(matrix[k][k] for k in range(len(names))) / n, 6) if n else None,
            "macro_f1": round(sum(f1s) / len(f1s), 6), "n_eval": n, "labels": names, "confusion_matrix": matrix}

"""GLUE metrics (scikit-learn and scipy) and the per-task headline score, in percent."""

from __future__ import annotations

import numpy as np


def compute_metrics(metric: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics for one split plus `score`, GLUE's headline number for it (x100).

    accuracy: acc; f1_accuracy (MRPC, QQP): mean of F1 and acc; matthews (CoLA): MCC;
    pearson_spearman (STS-B): mean of Pearson and Spearman correlations.
    """
    # imported here: scipy.stats and sklearn.metrics take 1.7 s to import, which every `mtp check` and launch paid
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if metric == "pearson_spearman":
        preds = predictions.astype(float)
        if np.std(preds) == 0 or np.std(labels) == 0:
            pearson = spearman = 0.0  # a constant prediction has no correlation
        else:
            pearson = float(pearsonr(preds, labels)[0])
            spearman = float(spearmanr(preds, labels)[0])
        out = {"pearson": 100 * pearson, "spearman": 100 * spearman}
        out["score"] = (out["pearson"] + out["spearman"]) / 2
        return out
    preds = predictions.astype(int)
    gold = labels.astype(int)
    acc = 100 * float(accuracy_score(gold, preds))
    if metric == "accuracy":
        return {"accuracy": acc, "score": acc}
    if metric == "f1_accuracy":
        f1 = 100 * float(f1_score(gold, preds, zero_division=0))
        return {"f1": f1, "accuracy": acc, "score": (f1 + acc) / 2}
    if metric == "matthews":
        mcc = 100 * float(matthews_corrcoef(gold, preds))
        return {"matthews": mcc, "accuracy": acc, "score": mcc}
    raise ValueError(f"unknown metric {metric!r}")


def task_score(split_metrics: dict[str, dict[str, float]]) -> float:
    """A task's score: the mean of its dev splits' scores (MNLI: matched and mismatched)."""
    return float(np.mean([m["score"] for m in split_metrics.values()]))

"""Anomaly scores against 0/1 labels, and the threshold from the scores of normal images.

ROC AUC, AUPR, precision, recall and F1 at a threshold, and the F1-best threshold; the
threshold itself is a quantile of the scores of normal images."""

from __future__ import annotations

import numpy as np


def _at_threshold(labels: np.ndarray, predicted: np.ndarray) -> dict:
  tp = int(np.sum(predicted & (labels == 1)))
  fp, fn = int(np.sum(predicted & (labels == 0))), int(np.sum(~predicted & (labels == 1)))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1}


def _f1_best_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
  """The t of the best F1 of "score > t" over every distinct cut of the sorted scores."""
  order = np.argsort(-np.asarray(scores), kind="stable")
  s, y = np.asarray(scores)[order], np.asarray(labels)[order]
  cuts = np.nonzero(s[:-1] > s[1:])[0] + 1  # the top k images are exactly those > s[k]
  if not len(cuts) or not y.sum():
    return None
  tp = np.cumsum(y)[cuts - 1]
  f1 = 2 * tp / (cuts + y.sum())  # 2 tp / (predicted + actual positives)
  return float(s[cuts[int(np.argmax(f1))]])


def single_class(labels: np.ndarray) -> str | None:
  """Why AUCs cannot be computed on `labels` (one class only), or None when they can."""
  classes = np.unique(labels)
  if len(classes) == 2:
    return None
  kind = "anomalies (1)" if classes[0] == 1 else "normal images (0)"
  return f"the test labels hold only {kind}: ROC AUC and AUPR need both classes"


def evaluate(labels: np.ndarray, scores: np.ndarray, threshold: float | None = None) -> dict:
  """AUC and AUPR of `scores` against 0/1 `labels` (None, with the reason, for one class);
  with a `threshold`, precision, recall and F1 of "score > threshold", and the F1-best
  threshold (chosen on these labels: what the threshold could at best be, not a fair one)."""
  # Here, not at the top: every run imports this module, and scikit-learn's metrics take over
  # half a second to import, needed only where there are labels.
  from sklearn.metrics import average_precision_score, roc_auc_score

  counts = {"num_images": int(len(labels)), "num_anomalies": int(np.sum(labels))}
  at = {}
  if threshold is not None:
    at = {"threshold": threshold, **_at_threshold(labels, scores > threshold)}
    best = _f1_best_threshold(labels, scores)
    if best is not None:
      at["f1_best"] = {"threshold": best, **_at_threshold(labels, scores > best)}
  reason = single_class(labels)
  if reason:
    return {"auc": None, "aupr": None, "auc_undefined": reason, **counts, **at}
  return {"auc": float(roc_auc_score(labels, scores)),
          "aupr": float(average_precision_score(labels, scores)), **counts, **at}


def threshold_record(reference_scores: np.ndarray, quantile: float, source: str) -> dict:
  """The predictions' threshold: the `quantile` of the scores of normal images (`source` says
  which), as threshold.json records it."""
  return {"threshold": float(np.quantile(reference_scores, quantile)), "quantile": quantile,
          "from": source}


def p_values(reference_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Conformal p-values: (1 + #{reference >= s}) / (n + 1) for each score s, against the scores
  of n normal images. Where the reference and a normal test image are exchangeable (the model
  trained on neither), P(p <= a) <= a for that image; higher scores give smaller p-values."""
  reference = np.sort(np.asarray(reference_scores, np.float64))
  at_least = len(reference) - np.searchsorted(reference, np.asarray(scores, np.float64), "left")
  return ((1 + at_least) / (len(reference) + 1)).astype(np.float64)


def benjamini_hochberg(p: np.ndarray, alpha: float) -> np.ndarray:
  """Which of `p` Benjamini-Hochberg rejects at level `alpha`: every p-value at most the largest
  p_(k) with p_(k) <= k * alpha / m. Its false discovery rate is at most `alpha` (for
  independent or positively dependent p-values, as conformal ones of one reference are)."""
  p = np.asarray(p, np.float64)
  m = len(p)
  if not m:
    return np.zeros(0, bool)
  ordered = np.sort(p)
  below = np.nonzero(ordered <= alpha * np.arange(1, m + 1) / m)[0]
  return p <= ordered[below[-1]] if len(below) else np.zeros(m, bool)


def flagged(scores: np.ndarray, p: np.ndarray, threshold: float, fdr: float) -> np.ndarray:
  """The yes/no of `score.fdr`'s rule: Benjamini-Hochberg on the p-values at level `fdr`, or,
  with `fdr` 0, a score above `threshold`."""
  if fdr > 0:
    return benjamini_hochberg(p, fdr)
  return np.asarray(scores) > threshold


def rule_record(fdr: float, quantile: float, validation_split: bool) -> dict:
  """What threshold.json says of the yes/no rule and of the p-values beside it."""
  rule = f"Benjamini-Hochberg at false discovery rate {fdr}" if fdr else \
      f"score above the {quantile} quantile of the reference scores"
  p_values = "valid: the reference images were held out of training" if validation_split else \
      ("optimistic: the model trained on the reference images, so normal test images score "
       "higher than they do and their p-values come out too small")
  return {"rule": rule, "fdr": fdr, "p_values": p_values}


def decision_record(labels: np.ndarray, flagged: np.ndarray) -> dict:
  """What a yes/no rule reached on labelled images: how many it flagged, its precision, recall,
  F1 and false discovery rate (the share of flagged images that are normal)."""
  flagged = np.asarray(flagged, bool)
  at = _at_threshold(labels, flagged)
  n = int(flagged.sum())
  wrong = int(np.sum(flagged & (labels == 0)))
  return {"flagged": n, **at, "false_discovery_rate": wrong / n if n else 0.0}


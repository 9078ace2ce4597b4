"""The files a scoring run or an ensemble writes, and the lines they print.

submission.csv, predictions.csv and the JSON records. Every file is written whole or not at all
(`hw8jax.atomic`); the figures are in `hw8jax.figures`, the numbers in `hw8jax.evaluate`."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from hw8jax import atomic

LABEL_OUTPUTS = ("eval.json", "roc.png")
SCORING_FIGURES = ("roc.png", "reconstructions.png", "latent_edits.png", "anomaly_maps.png")
REFERENCE_FILE = "reference_scores.npy"  # the threshold's reference: what p-values count against


def write_submission(path: str, scores: np.ndarray) -> None:
  """Kaggle's format: header `ID,score`, one row per test image in file order. float32 scores
  are written with 9 significant digits, enough to round-trip them exactly."""
  rows = "".join(f"{i},{s:.9g}\n" for i, s in enumerate(np.asarray(scores, np.float32)))
  atomic.write_text(path, "ID,score\n" + rows)


def read_submission(path: str) -> np.ndarray:
  with open(path) as f:
    header = f.readline().strip()
    if header != "ID,score":
      raise ValueError(f"{path}: header {header!r}, expected 'ID,score'")
    rows = [line.split(",") for line in f if line.strip()]
  ids = np.array([int(r[0]) for r in rows])
  if not np.array_equal(ids, np.arange(len(ids))):
    raise ValueError(f"{path}: IDs are not 0..{len(ids) - 1} in order")
  return np.array([float(r[1]) for r in rows])


def write_predictions(path: str, scores: np.ndarray, flagged: np.ndarray,
                      p_values: np.ndarray) -> None:
  """`ID,score,is_anomaly,p_value`: is_anomaly is 1 where the rule flagged the image
  (`evaluate.flagged`), p_value its conformal p-value (`evaluate.p_values`)."""
  rows = "".join(f"{i},{s:.9g},{int(f)},{p:.9g}\n" for i, (s, f, p) in
                 enumerate(zip(np.asarray(scores, np.float32), flagged, p_values, strict=True)))
  atomic.write_text(path, "ID,score,is_anomaly,p_value\n" + rows)


def print_evaluation(record: dict) -> None:
  counts = f"({record['num_images']} test images, {record['num_anomalies']} anomalies)"
  if record["auc"] is None:
    print(f"ROC AUC undefined: {record['auc_undefined']} {counts}", flush=True)
  else:
    print(f"ROC AUC {record['auc']:.4f}  AUPR {record['aupr']:.4f}  {counts}", flush=True)


def remove_outputs(workdir: str, names) -> None:
  """Remove outputs of an earlier run that no longer describe this one."""
  for name in names:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)


def json_safe(value):
  """Non-finite floats as null: JSON has no NaN, and Python's json would write one."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def read_json(path: str) -> dict | None:
  """A JSON record this package wrote, read as data (None where it is missing or is not a JSON
  object: a record another version wrote, or one damaged, says nothing)."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def write_json(path: str, record: dict) -> None:
  atomic.write_text(path, json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")

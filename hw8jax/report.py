"""What a scoring run leaves in the workdir: submission.csv, scores.npy, eval.json, figures."""

from __future__ import annotations

import json
import os

import numpy as np


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_submission(path: str, scores: np.ndarray) -> None:
  """Kaggle's format: header `ID,score`, one row per test image in file order. float32 scores
  are written with 9 significant digits, enough to round-trip them exactly."""
  rows = "".join(f"{i},{s:.9g}\n" for i, s in enumerate(np.asarray(scores, np.float32)))
  _atomic_write_text(path, "ID,score\n" + rows)


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


def evaluate(labels: np.ndarray, scores: np.ndarray) -> dict:
  from sklearn.metrics import average_precision_score, roc_auc_score

  return {"auc": float(roc_auc_score(labels, scores)),
          "aupr": float(average_precision_score(labels, scores)),
          "num_images": int(len(labels)), "num_anomalies": int(np.sum(labels))}


def write_json(path: str, record: dict) -> None:
  _atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _save_figure(fig, path: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=100, bbox_inches="tight")
  os.replace(tmp, path)


def _to_display(x: np.ndarray) -> np.ndarray:
  return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def plot_roc_and_histogram(path: str, labels: np.ndarray, scores: np.ndarray, auc: float):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from sklearn.metrics import roc_curve

  fpr, tpr, _ = roc_curve(labels, scores)
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  a.plot(fpr, tpr, label=f"AUC {auc:.4f}")
  a.plot([0, 1], [0, 1], "k--", lw=0.8)
  a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
  a.legend(loc="lower right")
  bins = np.histogram_bin_edges(scores, bins=40)
  b.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal (0)")
  b.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomaly (1)")
  b.set(xlabel="anomaly score", ylabel="images", title="score histogram")
  b.legend()
  _save_figure(fig, path)
  plt.close(fig)


def plot_reconstructions(path: str, images: np.ndarray, recons: np.ndarray, scores: np.ndarray,
                         title: str):
  """Rows: originals, reconstructions, per-pixel squared error (summed over channels)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(images)
  fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
  err = np.square(recons - images).sum(-1)
  for i in range(n):
    axes[0, i].imshow(_to_display(images[i]))
    axes[0, i].set_title(f"{scores[i]:.3g}", fontsize=8)
    axes[1, i].imshow(_to_display(recons[i]))
    axes[2, i].imshow(err[i], cmap="magma")
  for ax, name in zip(axes[:, 0], ("original", "reconstruction", "squared error"), strict=True):
    ax.set_ylabel(name, fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title)
  _save_figure(fig, path)
  plt.close(fig)


def plot_latent_edits(path: str, panels: list[tuple[str, np.ndarray]]):
  """The report's figure: an image, its reconstruction, and reconstructions of edited latents."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
  for ax, (name, img) in zip(axes, panels, strict=True):
    ax.imshow(_to_display(img))
    ax.set_title(name, fontsize=9)
    ax.axis("off")
  _save_figure(fig, path)
  plt.close(fig)

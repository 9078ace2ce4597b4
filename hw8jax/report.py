"""What a scoring run leaves in the workdir: submission.csv, scores.npy, eval.json, figures.
Every file is written whole or not at all (a temporary file, then a rename)."""

from __future__ import annotations

import json
import math
import os

import numpy as np

LABEL_OUTPUTS = ("eval.json", "roc.png")
SWEEP = (-2.0, -1.0, 1.0, 2.0)  # latent_edits.png: steps of max|z| added to a latent element


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


def write_predictions(path: str, scores: np.ndarray, threshold: float) -> None:
  """`ID,score,is_anomaly`: is_anomaly is 1 for a score above `threshold`."""
  rows = "".join(f"{i},{s:.9g},{int(s > threshold)}\n"
                 for i, s in enumerate(np.asarray(scores, np.float32)))
  _atomic_write_text(path, "ID,score,is_anomaly\n" + rows)


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


def print_evaluation(record: dict) -> None:
  counts = f"({record['num_images']} test images, {record['num_anomalies']} anomalies)"
  if record["auc"] is None:
    print(f"ROC AUC undefined: {record['auc_undefined']} {counts}", flush=True)
  else:
    print(f"ROC AUC {record['auc']:.4f}  AUPR {record['aupr']:.4f}  {counts}", flush=True)


def remove_label_outputs(workdir: str, keep=()) -> None:
  """Remove label-based outputs of an earlier scoring run that no longer describe this one."""
  for name in LABEL_OUTPUTS:
    path = os.path.join(workdir, name)
    if name not in keep and os.path.exists(path):
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


def write_json(path: str, record: dict) -> None:
  _atomic_write_text(path, json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")


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
                         title: str, labels: list[str] | None = None):
  """Rows: originals, reconstructions, per-pixel squared error (summed over channels, one
  colour scale for all). Each column is titled with its score (and true label, if known).
  Drawn as one image: a grid of 36 matplotlib axes took 1.7 s."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n, size, gap = len(images), images.shape[1], 2
  err = np.square(recons - images).sum(-1)
  scale = float(err.max()) or 1.0
  colour = matplotlib.colormaps["magma"](err / scale)[..., :3]
  rows = [_to_display(images), _to_display(recons), colour]
  canvas = np.ones((3 * size + 2 * gap, n * size + (n - 1) * gap, 3), np.float32)
  for r, row in enumerate(rows):
    for i in range(n):
      top, left = r * (size + gap), i * (size + gap)
      canvas[top:top + size, left:left + size] = row[i]
  fig, ax = plt.subplots(figsize=(1.6 * n, 5))
  image = ax.imshow(canvas, cmap="magma", vmin=0, vmax=scale)
  image.set_data(canvas)  # RGB; the colour map only feeds the colour bar's scale
  for i in range(n):
    caption = f"{scores[i]:.3g}" + (f"\n{labels[i]}" if labels else "")
    ax.text(i * (size + gap) + size / 2, -3, caption, ha="center", fontsize=8)
  ax.set_yticks([(r + 0.5) * size + r * gap for r in range(3)],
                ["original", "reconstruction", "squared error"], fontsize=8)
  ax.set_xticks([])
  fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, scale), "magma"),
               ax=ax, fraction=0.02, label="squared error (summed over channels)")
  fig.suptitle(title)
  _save_figure(fig, path)
  plt.close(fig)


def plot_latent_edits(path: str, panels: list[tuple[str, np.ndarray]]):
  """The report's figure: an image, its reconstruction, and reconstructions of edited latents,
  2 + len(SWEEP) panels a row (a panel of None is left blank)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  columns = 2 + len(SWEEP)
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  for ax, (name, img) in zip(axes.ravel(), panels, strict=False):
    ax.axis("off")
    if img is None:
      continue
    ax.imshow(_to_display(img))
    ax.set_title(name, fontsize=9)
    ax.axis("off")
  _save_figure(fig, path)
  plt.close(fig)


def plot_training_curves(metrics_path: str, path: str) -> None:
  """training_curves.png from metrics.jsonl: the loss at each logged step and each epoch's mean
  loss; beside it, per epoch, the held-out images' mean score and the test AUC when logged."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  steps = [r for r in records if "loss" in r]
  epochs = [r for r in records if "epoch_mean_loss" in r]
  measured = [k for k in ("val_score", "test_auc") if any(k in r for r in epochs)]
  fig, axes = plt.subplots(1, 1 + bool(measured), figsize=(5 + 4.5 * bool(measured), 3.6),
                           squeeze=False)
  ax = axes[0, 0]
  ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="step")
  ax.plot([r["step"] for r in epochs], [r["epoch_mean_loss"] for r in epochs], "o-", ms=3,
          label="epoch mean")
  ax.set(xlabel="step", ylabel="training loss", yscale="log" if all(
      r["loss"] > 0 for r in steps) else "linear", title="loss")
  ax.legend()
  for i, key in enumerate(measured):
    target = axes[0, 1] if i == 0 else axes[0, 1].twinx()
    points = [(r["step"], r[key]) for r in epochs if key in r and r[key] is not None]
    target.plot(*zip(*points, strict=True), "o-", ms=3, color=f"C{i + 2}", label=key)
    target.set_ylabel(key, color=f"C{i + 2}")
    axes[0, 1].set(xlabel="step", title="per epoch")
  _save_figure(fig, path)
  plt.close(fig)


def plot_model_figures(workdir: str, model, transform, inputs, scores: np.ndarray) -> None:
  """reconstructions.png (the most and least anomalous test images) and latent_edits.png, from
  an eval-mode model on one device. Each model computation is one compiled call: op by op, a
  small model spent seconds compiling a hundred single operations."""
  import jax
  from flax import nnx

  encode = nnx.jit(lambda m, x: m.encode(x))
  decode = nnx.jit(lambda m, z: m.decode(z))
  order = np.argsort(scores, kind="stable")  # over every test image
  picks = np.concatenate([order[-6:][::-1], order[:6]])
  x = transform(np.asarray(inputs.test[np.sort(picks)]))[np.argsort(np.argsort(picks))]
  recon = np.asarray(decode(model, encode(model, x)))
  marks = None if inputs.labels is None else \
      ["anomaly" if inputs.labels[i] else "normal" for i in picks]
  plot_reconstructions(os.path.join(workdir, "reconstructions.png"), np.asarray(x), recon,
                       scores[picks], "most anomalous (left six) and most normal (right six) "
                       f"of the {len(scores)} test images", marks)
  # The homework's report figure, on a training image (a face the model learned from): each of
  # the two largest-magnitude latent elements is swept over z_i + t * max|z| for t in SWEEP, a
  # range wide enough to see (doubling one element showed nothing in the demo).
  face = transform(np.asarray(inputs.train[:1]))
  z = encode(model, face)
  flat = np.asarray(z, np.float32).reshape(-1)
  chosen = np.argsort(-np.abs(flat))[:2]
  span = float(np.abs(flat).max())
  edits = [(i, t) for i in chosen for t in SWEEP]
  latents = np.stack([flat] + [np.where(np.arange(flat.size) == i, flat[i] + t * span, flat)
                               for i, t in edits])
  decoded = np.asarray(decode(model, jax.numpy.asarray(latents.reshape(-1, *z.shape[1:]))))
  panels = [("original", np.asarray(face)[0]), ("reconstruction", decoded[0])]
  for row, i in enumerate(chosen):  # a row per element; the second starts under the first's
    sweep = decoded[1 + row * len(SWEEP):1 + (row + 1) * len(SWEEP)]
    panels += [("", None)] * 2 * row + [(f"z[{i}] {t:+g} max|z|", img)
                                        for t, img in zip(SWEEP, sweep, strict=True)]
  plot_latent_edits(os.path.join(workdir, "latent_edits.png"), panels)

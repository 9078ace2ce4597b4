"""The figures of a run (roc.png, reconstructions.png, latent_edits.png, training_curves.png).

Each is drawn from arrays on a matplotlib figure of its own Agg canvas, so pyplot's backend (a
notebook's inline one) is never touched, and written whole or not at all."""

from __future__ import annotations

import json
import threading

import numpy as np

from hw8jax import atomic

# matplotlib (and scikit-learn's roc_curve) are imported in the functions that draw: every run
# imports this module, and a run with `figures` off never pays for them.

SWEEP = (-2.0, -1.0, 1.0, 2.0)  # latent_edits.png: steps of max|z| added to a latent element


def preload() -> threading.Thread:
  """Import what drawing needs in a thread of its own (returned, started), while the caller
  waits in XLA with the interpreter free, rather than when a run's last step is done."""
  def imports():
    # Drawing imports (the module's note above), in this thread.
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401

  thread = threading.Thread(target=imports, name="hw8jax-figures-preload", daemon=True)
  thread.start()
  return thread


def _figure(**kwargs):
  """A figure on its own Agg canvas: pyplot and its global backend stay untouched, so a
  notebook's inline plots go on working after a run has drawn its figures."""
  # Drawing imports, here (the module's note above).
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def _save_figure(fig, path: str) -> None:
  with atomic.replaced(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100, bbox_inches="tight", pil_kwargs={"compress_level": 1})


def _to_display(x: np.ndarray) -> np.ndarray:
  return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def plot_roc_and_histogram(path: str, labels: np.ndarray, scores: np.ndarray, auc: float):
  from sklearn.metrics import roc_curve  # drawing imports, here (the module's note above)

  fpr, tpr, _ = roc_curve(labels, scores)
  fig = _figure(figsize=(10, 4))
  a, b = fig.subplots(1, 2)
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


def plot_reconstructions(path: str, images: np.ndarray, recons: np.ndarray, scores: np.ndarray,
                         title: str, labels: list[str] | None = None):
  """Rows: originals, reconstructions, per-pixel squared error (summed over channels, one
  colour scale for all). Each column is titled with its score (and true label, if known).
  Drawn as one image: a grid of 36 matplotlib axes was far slower (docs/performance.md)."""
  import matplotlib  # drawing imports, here (the module's note above)

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
  fig = _figure(figsize=(1.6 * n, 5))
  ax = fig.subplots()
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


def latent_edit_panels(face: np.ndarray, decoded: np.ndarray, chosen) -> list:
  """The panels of latent_edits.png: the image and its reconstruction (decoded[0]), then a row
  per chosen latent element of its SWEEP edits (decoded[1:], element by element); the second
  row starts under the first's edits."""
  panels = [("original", face), ("reconstruction", decoded[0])]
  for row, i in enumerate(chosen):
    sweep = decoded[1 + row * len(SWEEP):1 + (row + 1) * len(SWEEP)]
    panels += [("", None)] * 2 * row + [(f"z[{i}] {t:+g} max|z|", img)
                                        for t, img in zip(SWEEP, sweep, strict=True)]
  return panels


def plot_latent_edits(path: str, panels: list[tuple[str, np.ndarray]]):
  """The report's figure: an image, its reconstruction, and reconstructions of edited latents,
  2 + len(SWEEP) panels a row (a panel of None is left blank)."""
  columns = 2 + len(SWEEP)
  rows = -(-len(panels) // columns)
  fig = _figure(figsize=(2.2 * columns, 2.5 * rows))
  axes = fig.subplots(rows, columns, squeeze=False)
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


def plot_training_curves(metrics_path: str, path: str) -> None:
  """training_curves.png from metrics.jsonl: the loss at each logged step and each epoch's mean
  loss; beside it, per epoch, the held-out images' mean score and the test AUC when logged."""
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  steps = [r for r in records if "loss" in r]
  epochs = [r for r in records if "epoch_mean_loss" in r]
  measured = [k for k in ("val_score", "test_auc") if any(k in r for r in epochs)]
  fig = _figure(figsize=(5 + 4.5 * bool(measured), 3.6))
  axes = fig.subplots(1, 1 + bool(measured), squeeze=False)
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


def anomaly_map_figure(images: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                       labels: list[str] | None = None, title: str = "", *,
                       alpha: float = 0.55):
  """Each image (the model's input, in [-1, 1]) with its anomaly map (`Detector.anomaly_map`)
  laid over it as a translucent heat map: one colour scale for all, with a colour bar; the
  score (and label, if given) under each. Returns the matplotlib Figure (a notebook shows it
  as it is; `plot_anomaly_maps` writes it)."""
  import matplotlib  # drawing imports, here (the module's note above)

  n, size, gap = len(images), images.shape[1], 2
  scale = float(np.max(maps)) or 1.0
  heat = matplotlib.colormaps["inferno"](np.asarray(maps) / scale)[..., :3]
  weight = alpha * np.clip(np.asarray(maps) / scale, 0.15, 1.0)[..., None]  # calm where normal
  shown = (1 - weight) * _to_display(images) + weight * heat
  canvas = np.ones((size, n * size + (n - 1) * gap, 3), np.float32)
  for i in range(n):
    canvas[:, i * (size + gap):i * (size + gap) + size] = shown[i]
  fig = _figure(figsize=(1.6 * n + 1, 2.6))
  ax = fig.subplots()
  ax.imshow(canvas)
  for i in range(n):
    caption = f"{scores[i]:.3g}" + (f"\n{labels[i]}" if labels else "")
    ax.text(i * (size + gap) + size / 2, size + 3, caption, ha="center", va="top", fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, scale), "inferno"),
               ax=ax, fraction=0.02, label="anomaly map (error per pixel)")
  if title:
    fig.suptitle(title, fontsize=9)
  return fig


def plot_anomaly_maps(path: str, images: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                      labels: list[str] | None = None, title: str = ""):
  """anomaly_maps.png: `anomaly_map_figure`, written whole or not at all."""
  _save_figure(anomaly_map_figure(images, maps, scores, labels, title), path)

"""A scoring run: every test image scored, the threshold from normal images, and the outputs.

The model is the one the run's plan scores (`assemble`); the outputs are submission.csv,
scores.npy, predictions.csv, threshold.json, the figures, and with labels eval.json and
roc.png."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from hw8jax import data, evaluate, figures, report, runtime
from hw8jax import workdir as workdir_lib
from hw8jax.assemble import Assembled, assemble
from hw8jax.plan import Plan
from hw8jax.score import autoencode, score_images

THRESHOLD_SAMPLE = 2000  # training images scored for the threshold without a validation split


def _threshold(model: Assembled, inputs, mesh) -> tuple[dict, np.ndarray]:
  """(the threshold record, the reference scores): the `score.threshold_quantile` quantile of
  the scores of normal images the model did not train on (the held-out validation images) or,
  without a validation split, of a seeded sample of up to THRESHOLD_SAMPLE training images."""
  config = model.plan.config
  num_train = len(inputs.train)
  if len(inputs.val_index):
    index = inputs.val_index
    source = f"{len(index)} held-out training images"
  else:
    index = np.sort(np.random.default_rng([config.seed, 0, 2]).permutation(num_train)
                    [:THRESHOLD_SAMPLE])
    source = f"{len(index)} training images (the model trained on them)"
  reference = score_images(model.scorer, model.state, np.asarray(inputs.train[index]),
                           batch_size=config.score.batch_size, key=model.plan.keys["score"],
                           mesh=mesh, weights=model.source)
  return (evaluate.threshold_record(reference, config.score.threshold_quantile, source),
          reference)


def scored_with(model: Assembled, test_images) -> dict:
  """What threshold.json says of the run that wrote it and scores.npy: the weights and step,
  the test set (`data.fingerprint`) and the keys that shape a score. `hw8jax.load` scores and
  thresholds as this says; ensembles compare the test sets of their members."""
  config = model.plan.config
  # Step 0 is a PyTorch file's weights: a checkpoint is written after a step at the earliest.
  return {"checkpoint": config.checkpoint.restore if model.step else "init_from",
          "step": model.step, "weights": model.source, "test_set": data.fingerprint(test_images),
          "score": config.score.to_dict(), "cpu_fast_paths": config.cpu_fast_paths}


def score_run(run: Plan, workdir: str, inputs, record: bool = True) -> dict | None:
  """Score every test image as the plan `run` says and write the outputs; returns the eval
  record (None without labels). `record`: write the run's runs/NNN-score.json (a run that
  trained first has its record, NNN-train.json, of the same config)."""
  config = run.config
  mesh = runtime.make_mesh()
  model = assemble(run, "scoring", workdir=workdir, mesh=mesh)
  if record and runtime.is_main_process():
    workdir_lib.record(config, workdir, "score")
  scores = score_images(model.scorer, model.state, inputs.test,
                        batch_size=config.score.batch_size, key=run.keys["score"], mesh=mesh,
                        weights=model.source)
  found, reference = _threshold(model, inputs, mesh)
  rule = evaluate.rule_record(config.score.fdr, config.score.threshold_quantile,
                              len(inputs.val_index) > 0)
  threshold = {**found, **rule, "reference_scores": report.REFERENCE_FILE,
               **scored_with(model, inputs.test)}
  if not runtime.is_main_process():
    return None
  p_values = evaluate.p_values(reference, scores)
  flagged = evaluate.flagged(scores, p_values, threshold["threshold"], config.score.fdr)
  csv_path = os.path.join(workdir, "submission.csv")
  report.write_submission(csv_path, scores)
  data.write_npy_atomic(os.path.join(workdir, "scores.npy"), scores)
  data.write_npy_atomic(os.path.join(workdir, report.REFERENCE_FILE), reference)
  report.write_predictions(os.path.join(workdir, "predictions.csv"), scores, flagged, p_values)
  report.write_json(os.path.join(workdir, "threshold.json"), threshold)
  print(f"wrote {csv_path} ({len(scores)} rows) from {model.source}; predictions.csv: "
        f"{int(flagged.sum())} flagged by {rule['rule']} (threshold {threshold['threshold']:.6g}"
        f" from {threshold['from']}; p-values {rule['p_values'].split(':')[0]})", flush=True)
  if config.figures:
    _model_figures(workdir, model, inputs, scores)
  else:  # a previous run's, which no longer describe this one
    report.remove_outputs(workdir, report.SCORING_FIGURES)
  if inputs.labels is None:
    report.remove_outputs(workdir, report.LABEL_OUTPUTS)
    return None
  record = {**evaluate.evaluate(inputs.labels, scores, threshold["threshold"]),
            "checkpoint": config.checkpoint.restore, "step": model.step, "model": config.model,
            "metric": config.score.metric, "weights": model.source, "threshold_from": threshold,
            "decision": {"rule": rule["rule"],
                         **evaluate.decision_record(inputs.labels, flagged)}}
  if config.checkpoint.restore == "best" and model.source.startswith("the best"):
    record["best_by"] = run.best_by
    if record["best_by"] == "test_auc":
      record["best_chosen_on_test_set"] = True  # this AUC is biased upward
  report.write_json(os.path.join(workdir, "eval.json"), record)
  report.print_evaluation(record)
  if record["auc"] is None:  # one class: no ROC curve (without figures it is gone already)
    report.remove_outputs(workdir, ["roc.png"])
  elif config.figures:
    figures.plot_roc_and_histogram(os.path.join(workdir, "roc.png"), inputs.labels, scores,
                                   record["auc"])
  return record


def _model_figures(workdir: str, model: Assembled, inputs, scores: np.ndarray) -> None:
  """reconstructions.png (the six most and six least anomalous test images) and
  latent_edits.png, on this process's first device from a local copy of the replicated
  parameters (whatever mesh they were restored onto). Each model computation is one compiled
  call: op by op, a small model spent seconds compiling a hundred single operations."""
  state = jax.tree.map(lambda a: jax.device_put(a.addressable_data(0), jax.local_devices()[0]),
                       model.state)
  transform = model.plan.transform
  encode = jax.jit(lambda s, x: nnx.merge(model.eval_def, *s).encode(x))
  decode = jax.jit(lambda s, z: nnx.merge(model.eval_def, *s).decode(z))
  order = np.argsort(scores, kind="stable")
  picks = np.concatenate([order[-6:][::-1], order[:6]])
  x = transform(np.asarray(inputs.test[np.sort(picks)]))[np.argsort(np.argsort(picks))]
  recon = np.asarray(autoencode(model.eval_def)(state, x))
  marks = None if inputs.labels is None else \
      ["anomaly" if inputs.labels[i] else "normal" for i in picks]
  # The 8 most anomalous, where their scores put their error; noise keyed by their places in
  # the test file, as when they were scored.
  top = order[-8:][::-1]
  maps = score_images(model.mapper, state, np.asarray(inputs.test[np.sort(top)]),
                      batch_size=model.plan.config.score.batch_size,
                      key=model.plan.keys["score"], index=np.sort(top))
  ranked = np.argsort(np.argsort(top))  # sorted-file order back to the ranking
  figures.plot_anomaly_maps(
      os.path.join(workdir, "anomaly_maps.png"), transform(np.asarray(inputs.test[top])),
      maps[ranked], scores[top],
      None if inputs.labels is None else
      ["anomaly" if inputs.labels[i] else "normal" for i in top],
      f"the {len(top)} most anomalous of the {len(scores)} test images: where each one's "
      "reconstruction errs")
  figures.plot_reconstructions(os.path.join(workdir, "reconstructions.png"), np.asarray(x),
                               recon, scores[picks], "most anomalous (left six) and most normal "
                               f"(right six) of the {len(scores)} test images", marks)
  # The homework's report figure, on a training image (a face the model learned from): each of
  # the two largest-magnitude latent elements is swept over z_i + t * max|z| for t in SWEEP, a
  # range wide enough to see (doubling one element showed nothing in the demo).
  face = transform(np.asarray(inputs.train[:1]))
  z = encode(state, face)
  flat = np.asarray(z, np.float32).reshape(-1)
  chosen = np.argsort(-np.abs(flat))[:2]
  span = float(np.abs(flat).max())
  edits = [(i, t) for i in chosen for t in figures.SWEEP]
  latents = np.stack([flat] + [np.where(np.arange(flat.size) == i, flat[i] + t * span, flat)
                               for i, t in edits])
  decoded = np.asarray(decode(state, latents.reshape(-1, *z.shape[1:])))
  figures.plot_latent_edits(os.path.join(workdir, "latent_edits.png"),
                            figures.latent_edit_panels(np.asarray(face)[0], decoded, chosen))

"""One run of launch.py: data, then training and/or scoring with their outputs."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from hw8jax import checkpoint, data, models, report, train
from hw8jax.data.demo import LABELS_FILE, make_demo
from hw8jax.errors import UserError
from hw8jax.score import make_scorer, score_images

MODES = ("train", "score", "train_and_score")
DEMO_HINT = "python launch.py --config=configs/fcn_boss.py:demo --workdir=DIR"


def load_data(config: ml_collections.ConfigDict, workdir: str):
  """(train images, test images, test labels or None), memory-mapped and validated."""
  directory = config.data.dir
  labels_path = config.data.test_labels
  if config.data.demo:
    directory = directory or os.path.join(workdir, "demo_data")
    if not os.path.exists(os.path.join(directory, data.TEST_FILE)):
      if jax.process_index() == 0:
        make_demo(directory)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("demo data written")
    labels_path = labels_path or os.path.join(directory, LABELS_FILE)
  train_path = os.path.join(directory, data.TRAIN_FILE)
  if not config.data.demo and not os.path.exists(directory):
    raise UserError(
        f"{directory}: no such folder. Put the Kaggle files {data.TRAIN_FILE} and "
        f"{data.TEST_FILE} (competition ml2022spring-hw8) in {directory}/ or pass "
        f"--config.data.dir=DIR; to see the package work without them run: {DEMO_HINT}")
  train_images = data.open_images(train_path)
  test_images = data.open_images(os.path.join(directory, data.TEST_FILE))
  labels = data.open_labels(labels_path, len(test_images)) if labels_path else None
  return train_images, test_images, labels


def _maybe_init_distributed(config) -> None:
  """Join a multi-process run when the config names a coordinator (each process is started
  with its own process_id). CPU processes exchange collectives through gloo."""
  if config.coordinator_address and not jax.distributed.is_initialized():
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(config.coordinator_address, num_processes=config.num_processes,
                               process_id=config.process_id)


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train_and_score"):
  """Train and/or score as `mode` says; returns the eval record (or None without labels)."""
  if mode not in MODES:
    raise UserError(f"--mode={mode}: use one of {', '.join(MODES)}")
  if config.model not in models.REGISTRY:
    raise UserError(f"model {config.model!r}: choose one of {', '.join(models.REGISTRY)}")
  _maybe_init_distributed(config)
  # Explicit, because the default on GPUs computes float32 matmuls in TF32 (PyTorch's default
  # does not); "highest" keeps float32 runs float32. It changes nothing on CPU.
  with jax.default_matmul_precision(config.matmul_precision):
    return _run(config, workdir, mode)


def _run(config, workdir: str, mode: str):
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  train_images, test_images, labels = load_data(config, workdir)
  if mode in ("train", "train_and_score"):
    train.train(config, workdir, train_images, test_images, labels)
  if mode in ("score", "train_and_score"):
    return score_run(config, workdir, train_images, test_images, labels)
  return None


def restore_model_state(config, workdir: str, which: str, mesh):
  """(eval graphdef, (params, batch_stats), step) from a workdir's best or latest checkpoint,
  replicated over `mesh` whatever device count wrote it."""
  abstract_model = nnx.eval_shape(lambda: models.build(config.model, rngs=nnx.Rngs(0)))
  abstract_model.eval()
  eval_def, params, stats = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  mngrs = checkpoint.managers(workdir, config.checkpoint.keep)
  try:
    mngr = mngrs[which]
    step = mngr.latest_step()
    if step is None:
      raise UserError(f"{workdir}: no {which} checkpoint; train first (--mode=train)")
    state = checkpoint.restore_model(
        mngr, checkpoint.abstract({"params": params, "batch_stats": stats}, replicated))
  finally:
    for m in mngrs.values():
      m.close()
  return eval_def, (state["params"], state["batch_stats"]), step


def has_checkpoint(workdir: str, which: str) -> bool:
  """Whether a workdir holds a `which` checkpoint. With init_from, scoring uses the PyTorch
  weights until the workdir has trained from them."""
  folder = os.path.join(os.path.abspath(workdir), "checkpoints", which)
  return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def torch_model_state(config, mesh):
  """(eval graphdef, (params, batch_stats)) of the PyTorch file `config.init_from`,
  replicated over `mesh`."""
  model = train.load_torch_weights(config.model, config.init_from)
  model.eval()
  eval_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return eval_def, jax.device_put((params, stats), replicated)


def score_run(config, workdir: str, train_images, test_images, labels):
  """Score every test image; write submission.csv, scores.npy, eval.json and figures."""
  if config.checkpoint.restore not in ("latest", "best"):
    raise UserError(f"checkpoint.restore {config.checkpoint.restore!r}: use latest or best")
  mesh = train.make_mesh()
  if config.init_from and not has_checkpoint(workdir, config.checkpoint.restore):
    eval_def, model_state = torch_model_state(config, mesh)
    step, source = 0, f"the PyTorch weights in {config.init_from}"
  else:
    eval_def, model_state, step = restore_model_state(config, workdir,
                                                      config.checkpoint.restore, mesh)
    source = f"the {config.checkpoint.restore} checkpoint (step {step})"
  transform = data.get_transform(config.data.transform)
  scorer = make_scorer(eval_def, metric=config.score.metric, topk=config.score.topk,
                       sample=config.score.sample, transform=transform,
                       compute_dtype=train.COMPUTE_DTYPES[config.compute_dtype])
  key = train.run_keys(config.seed)["score"]
  batch = config.score.batch_size - config.score.batch_size % jax.device_count() or \
      jax.device_count()
  scores = score_images(scorer, model_state, test_images, batch_size=batch, key=key, mesh=mesh)
  if jax.process_index() != 0:
    return None
  csv_path = os.path.join(workdir, "submission.csv")
  report.write_submission(csv_path, scores)
  np.save(os.path.join(workdir, "scores.npy"), scores)
  print(f"wrote {csv_path} ({len(scores)} rows) from {source}", flush=True)
  record = None
  # Figures are small eager computations: on this process's first device, from a local copy of
  # the replicated parameters (whatever mesh they were restored onto).
  local = jax.tree.map(lambda a: jax.device_put(a.addressable_data(0), jax.local_devices()[0]),
                       model_state)
  model = nnx.merge(eval_def, *local)
  x_all = transform(np.asarray(test_images[: min(len(test_images), 4096)]))
  order = np.argsort(scores[: len(x_all)])
  picks = np.concatenate([order[-6:][::-1], order[:6]])
  recon = np.asarray(model.decode(model.encode(x_all[picks])))
  report.plot_reconstructions(os.path.join(workdir, "reconstructions.png"),
                              np.asarray(x_all[picks]), recon, scores[picks],
                              "most anomalous (left six) and most normal (right six) test images")
  # The homework's report figure, on a training image (a face the model learned from); the two
  # largest-magnitude latent elements are doubled, so the change is visible.
  face = transform(np.asarray(train_images[:1]))
  z = model.encode(face)
  flat = z.reshape(1, -1)
  panels = [("original", np.asarray(face)[0]), ("reconstruction", np.asarray(model.decode(z))[0])]
  for i in np.argsort(-np.abs(np.asarray(flat[0])))[:2]:
    edited = flat.at[0, i].multiply(2.0).reshape(z.shape)
    panels.append((f"z[{i}] *= 2", np.asarray(model.decode(edited))[0]))
  report.plot_latent_edits(os.path.join(workdir, "latent_edits.png"), panels)
  if labels is not None:
    record = {**report.evaluate(labels, scores), "checkpoint": config.checkpoint.restore,
              "step": int(step), "model": config.model, "metric": config.score.metric,
              "weights": source}
    report.write_json(os.path.join(workdir, "eval.json"), record)
    report.plot_roc_and_histogram(os.path.join(workdir, "roc.png"), labels, scores,
                                  record["auc"])
    print(f"ROC AUC {record['auc']:.4f}  AUPR {record['aupr']:.4f}  "
          f"({record['num_images']} test images, {record['num_anomalies']} anomalies)",
          flush=True)
  return record

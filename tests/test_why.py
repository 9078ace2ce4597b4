"""Why an image is flagged and how sure: anomaly maps, conformal p-values, the BH rule."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hw8jax import evaluate, models
from hw8jax.data.demo import make_synthetic
from hw8jax.errors import UserError
from hw8jax.score import score_images

from conftest import images

# A tiny run (tests/tiny.py) of ta_vae.py's recipe: the tiny model samples its latent, as the
# VAE parts do, so its maps and scores share their noise.
TINY = ["--config.batch_size=8", "--config.max_steps=4", "--config.checkpoint.every_steps=2",
        "--config.log_every_seconds=0", "--config.score.batch_size=8", "--config.figures=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  make_synthetic(d, num_train=24, num_test=12, seed=8)
  return str(d)


def _assembled(variant: str, metric: str = "l2"):
  import jax

  from hw8jax.assemble import assemble
  from hw8jax.configs import default
  from hw8jax.plan import plan

  c = default.for_model(variant)
  c.score.metric = metric
  return assemble(plan(c), key=jax.random.key(0))


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_the_l2_map_of_every_variant_sums_to_its_score_squared(variant, seed):
  """Fresh weights, a sampled scorer where the variant samples: the map comes from the very
  reconstruction (and noise, keyed by the image's index) the score does."""
  model = _assembled(variant)
  x = (np.random.default_rng(seed).uniform(0, 255, (5, 64, 64, 3))).astype(np.uint8)
  kwargs = dict(batch_size=4, key=model.plan.keys["score"], index=np.array([7, 0, 3, 11, 2]))
  scores = score_images(model.scorer, model.state, x, **kwargs)
  maps = score_images(model.mapper, model.state, x, **kwargs)
  assert maps.shape == (5, 64, 64) and maps.dtype == np.float32 and (maps >= 0).all()
  np.testing.assert_allclose(np.sqrt(maps.sum((1, 2))), scores, rtol=1e-4)
  # Where the scored reconstruction is sampled (a VAE's z; resnet_boss scores its clean
  # latent), other indices draw other noise: the map follows the index, as the score does.
  if variant in ("ta_vae", "multi_encoder"):
    other = score_images(model.mapper, model.state, x, batch_size=4,
                         key=model.plan.keys["score"], index=np.arange(5))
    assert not np.allclose(other, maps)


@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_the_mse_and_mae_maps_average_to_their_scores(metric, seed):
  model = _assembled("ta_cnn", metric)
  x = images(np.random.default_rng(seed), 3)
  x = ((x + 1) * 127.5).astype(np.uint8)
  kwargs = dict(batch_size=4, key=model.plan.keys["score"])
  scores = score_images(model.scorer, model.state, x, **kwargs)
  maps = score_images(model.mapper, model.state, x, **kwargs)
  np.testing.assert_allclose(maps.sum((1, 2)) / (64 * 64 * 3), scores, rtol=1e-5)


def _predictions(workdir: str) -> np.ndarray:
  return np.loadtxt(os.path.join(workdir, "predictions.csv"), delimiter=",", skiprows=1)


def test_a_detector_maps_gives_p_values_and_predicts_as_the_workdir_says(data_dir, tmp_path,
                                                                          launch_here):
  import hw8jax

  workdir = str(tmp_path / "w")
  labels = f"--config.data.test_labels={os.path.join(data_dir, 'testing_labels.npy')}"
  assert launch_here(f"--workdir={workdir}", f"--config.data.dir={data_dir}", *TINY,
                     "--config.data.val_fraction=0.25", labels).returncode == 0
  det = hw8jax.load(workdir)
  test = np.load(os.path.join(data_dir, "testingset.npy"))
  rows = _predictions(workdir)
  maps, scores = det.anomaly_map(test), det.score(test)
  assert maps.shape == (12, 64, 64) and maps.dtype == np.float32 and (maps >= 0).all()
  np.testing.assert_allclose(np.sqrt(maps.sum((1, 2))), scores, rtol=1e-4)
  # p_value in (0, 1], falling as the score rises; the detector gives the file's numbers.
  p = rows[:, 3]
  assert ((p > 0) & (p <= 1)).all()
  order = np.argsort(rows[:, 1])
  assert (np.diff(p[order]) <= 0).all()
  np.testing.assert_allclose(det.p_values(test), p, rtol=1e-8)
  np.testing.assert_array_equal(det.predict(test), rows[:, 2])
  reference = np.load(os.path.join(workdir, "reference_scores.npy"))
  assert len(reference) == 6  # the validation split: a quarter of 24
  np.testing.assert_allclose(p, evaluate.p_values(reference, rows[:, 1].astype(np.float32)))

  # The same workdir rescored with BH at 0.1: is_anomaly is BH's decision on those p-values.
  assert launch_here(f"--workdir={workdir}", f"--config.data.dir={data_dir}", *TINY,
                     "--config.data.val_fraction=0.25", "--mode=score", labels,
                     "--config.score.fdr=0.1").returncode == 0
  again = _predictions(workdir)
  np.testing.assert_array_equal(again[:, 1], rows[:, 1])  # the scores do not move
  np.testing.assert_array_equal(again[:, 2], evaluate.benjamini_hochberg(again[:, 3], 0.1))
  det = hw8jax.load(workdir)
  np.testing.assert_array_equal(det.predict(test), again[:, 2])
  record = __import__("json").load(open(os.path.join(workdir, "eval.json")))
  assert record["decision"]["rule"].startswith("Benjamini-Hochberg at false discovery rate 0.1")
  assert {"false_discovery_rate", "recall", "flagged"} <= record["decision"].keys()
  # A map of a (64, 64) float image is a one-line mistake.
  with pytest.raises(UserError, match=r"^images: shape \(64, 64\) dtype float32; expected uint8"):
    det.anomaly_map(np.zeros((64, 64), np.float32))


def test_an_fdr_out_of_range_is_one_line_before_any_work(data_dir, tmp_path, launch_here):
  result = launch_here(f"--workdir={tmp_path / 'w'}", f"--config.data.dir={data_dir}", *TINY,
                       "--config.score.fdr=1.5")
  assert result.returncode == 1 and result.stderr.startswith("error: score.fdr=1.5: must be in")
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "w").exists()


def test_bh_and_p_values_on_hand_made_numbers():
  reference = np.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(evaluate.p_values(reference, [0.5, 2.0, 2.5, 9.0]),
                             [5 / 5, 4 / 5, 3 / 5, 1 / 5])
  p = np.array([0.01, 0.04, 0.03, 0.5, 0.02])
  # Sorted: 0.01 0.02 0.03 0.04 0.5 against 0.01 0.02 0.03 0.04 0.05 (alpha 0.05, m 5).
  np.testing.assert_array_equal(evaluate.benjamini_hochberg(p, 0.05),
                                [True, True, True, False, True])
  np.testing.assert_array_equal(evaluate.benjamini_hochberg(p, 0.009), [False] * 5)


def test_the_bh_rule_keeps_its_false_discovery_rate_and_the_quantile_rule_its_fpr(seed):
  """The guarantee, not the arithmetic: 2000 seeded draws of exchangeable normal reference and
  test scores plus shifted anomalies. BH at alpha: the mean false discovery proportion (the
  FDR) is at most alpha * m0 / m, within 4 standard errors; the quantile rule: the mean
  false-positive rate on normal test images is 1 - quantile, within 4 standard errors (and a
  finite-sample term of 1 / (n + 1))."""
  rng = np.random.default_rng(seed)
  draws, n, m0, m1, alpha, quantile = 2000, 200, 90, 10, 0.1, 0.95
  fdp, fpr = np.zeros(draws), np.zeros(draws)
  for d in range(draws):
    reference = rng.normal(size=n)
    test = np.concatenate([rng.normal(size=m0), rng.normal(2.5, 1.0, size=m1)])
    p = evaluate.p_values(reference, test)
    flagged = evaluate.flagged(test, p, 0.0, alpha)
    fdp[d] = flagged[:m0].sum() / max(flagged.sum(), 1)
    threshold = evaluate.threshold_record(reference, quantile, "")["threshold"]
    fpr[d] = evaluate.flagged(test, p, threshold, 0.0)[:m0].mean()
  bound = alpha * m0 / (m0 + m1)
  assert fdp.mean() <= bound + 4 * fdp.std() / np.sqrt(draws), (fdp.mean(), bound)
  assert fdp.mean() > bound / 3  # the rule is not trivially conservative (it flags)
  assert abs(fpr.mean() - (1 - quantile)) <= 4 * fpr.std() / np.sqrt(draws) + 1 / (n + 1), \
      fpr.mean()

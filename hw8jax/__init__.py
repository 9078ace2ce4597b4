"""hw8jax: autoencoder anomaly detection on 64x64 faces in JAX/Flax NNX.

  import hw8jax
  cfg = hw8jax.get_config("fcn_boss", "quick")   # exactly configs/fcn_boss.py:quick
  cfg.data.dir = "data"
  record = hw8jax.run(cfg, "runs/x")             # what launch.py does; the eval record or None
  det = hw8jax.load("runs/x")                    # the trained model of a workdir
  scores = det.score(images_uint8)               # (N,) float32, as in submission.csv
  labels = det.predict(images_uint8)             # (N,) 0/1, as in predictions.csv
  det = hw8jax.fit(train_uint8, "fcn_boss:quick", "runs/y")  # train on arrays in memory

Importing the package is cheap (config files import it at flag parsing); JAX loads with the
first use of run, load or fit.
"""

__version__ = "0.1.0"
__all__ = ["fit", "get_config", "load", "run"]


def __getattr__(name):  # each on first use, so that importing the package stays cheap
  if name == "get_config":
    from hw8jax.configs import get_config
    return get_config
  if name == "run":
    from hw8jax.main import run
    return run
  if name == "fit":
    from hw8jax.fit_arrays import fit
    return fit
  if name == "load":
    from hw8jax.detector import load
    return load
  raise AttributeError(f"module 'hw8jax' has no attribute {name!r}")

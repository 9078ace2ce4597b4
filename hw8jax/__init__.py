"""hw8jax: autoencoder anomaly detection on 64x64 faces in JAX/Flax NNX."""

__version__ = "0.1.0"

"""Shared test helpers. Every test that draws random weights or data takes a fresh `seed`."""

from __future__ import annotations

import importlib.util
import os
import secrets

import numpy as np
import pytest

# CI sets this so that a missing torch fails the run instead of skipping the parity tests.
REQUIRE_TORCH = os.environ.get("HW8JAX_REQUIRE_TORCH") == "1"


def require_torch():
  """Import torch for a parity test: skip without it, unless HW8JAX_REQUIRE_TORCH=1."""
  if importlib.util.find_spec("torch") is None:
    if REQUIRE_TORCH:
      pytest.fail("torch is required (HW8JAX_REQUIRE_TORCH=1) but not installed")
    pytest.skip("torch not installed")
  import torch

  torch.set_num_threads(2)
  return torch


@pytest.fixture
def seed(request):
  """A fresh seed per test, shown in the report so a failure can be replayed."""
  value = int(os.environ.get("HW8JAX_TEST_SEED", secrets.randbits(31)))
  request.node.user_properties.append(("seed", value))
  print(f"seed={value}")
  return value


def images(rng: np.random.Generator, n: int) -> np.ndarray:
  """n random NHWC float32 images in [-1, 1]."""
  return rng.uniform(-1, 1, (n, 64, 64, 3)).astype(np.float32)

"""The train-step comparison of test_parity.py in float64 on both sides (a file of its own so that
the two test workers share the parity tests' time)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_parity import check_train_step

from hw8jax import models


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_train_step_matches_torch_float64(variant, seed):
  """The same comparison in float64 on both sides, every parameter's gradient to 1e-8, on a
  batch of 4 images (float64 convs run in XLA's own loops: at batch 8 this file took 47 s alone
  on 2 cores, at 4 it takes 37 s; at 2, fcn_boss's BatchNorm1d over two samples is too
  ill-conditioned: 1.4e-7 seen, over the 1e-8)."""
  with jax.enable_x64(True):
    check_train_step(variant, seed, np.float64, grad_rtol=1e-8, atol=1e-8, batch=4)

"""Numeric parity of every variant with its PyTorch original.

Fresh random weights (PyTorch's init, then random BatchNorm affine parameters, running statistics
and PReLU slopes) and fresh random images every run; weights carried over by
`hw8jax.torch_import.load_state_dict`. Tolerances:
- eval reconstruction and latents: 1e-5 absolute (outputs are in [-1, 1]);
- train-mode (batch statistics) reconstruction: 1e-4 absolute, because batch normalisation over a
  small batch divides float32 rounding differences by small batch deviations;
- BatchNorm running statistics after one train-mode forward: 1e-5 absolute + 1e-4 relative;
- loss: 1e-4 relative;
- gradients in float32: all parameters' gradients as one vector, 1e-4 relative in L2 norm,
  plus twice PyTorch's own float32 rounding of that gradient (measured against its float64
  gradient of the same weights), ||g_jax - g_torch|| <= 1e-4 * ||g_torch|| + 2 * ||g_torch -
  g_torch64|| (elementwise ratios are meaningless near zero); multi_encoder and resnet_boss only
  bounded (see GRAD_RTOL);
- every variant again in float64: outputs, loss and statistics to 1e-8, and each parameter's
  gradient to 1e-8 relative in L2 norm.
Stochastic parts (VAE z, resnet latent noise) get the same noise on both sides.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hw8jax import models
from hw8jax.torch_import import load_state_dict, torch_targets

from conftest import images, nchw, nhwc, require_torch

BATCH = 8


def randomize_buffers(torch, ref, seed):
  """Move BatchNorm and PReLU away from their constant inits so their import is tested."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
      elif isinstance(m, torch.nn.PReLU):
        m.weight.copy_(0.1 + 0.3 * torch.rand(1, generator=g))


def original(variant, seed):
  """(torch, the PyTorch original with fresh weights and moved BatchNorm / PReLU values)."""
  torch = require_torch()
  import torch_reference

  torch.manual_seed(seed)
  ref = torch_reference.BUILDERS[variant]()
  randomize_buffers(torch, ref, seed)
  return torch, ref


def imported(variant, state_dict):
  """The hw8jax model holding a PyTorch state_dict's weights (float32)."""
  # Abstract: every value comes from the import, so drawing initial weights would be wasted.
  model = nnx.eval_shape(lambda: models.build(variant, rngs=nnx.Rngs(0)))
  return load_state_dict(model, state_dict)


def paired(variant, seed):
  torch, ref = original(variant, seed)
  return torch, ref, imported(variant, ref.state_dict())


def torch_noise_kwargs(torch, variant, aux_shape_source, key):
  """The noise hw8jax's `__call__` draws from `nnx.Rngs(noise=key)`, for the PyTorch side."""
  if not models.variant(variant).stochastic:
    return {}
  draw = nnx.Rngs(noise=key).noise()
  if variant == "resnet_boss":
    return {"noise": torch.from_numpy(np.array(jax.random.normal(draw, aux_shape_source)))}
  return {"eps": nchw(torch, jax.random.normal(draw, aux_shape_source))}


def noise_shape(variant, batch=BATCH):
  return (batch, 256) if variant == "resnet_boss" else (batch, 8, 8, 48)


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_eval_reconstruction_matches_torch(variant, seed):
  torch, ref, model = paired(variant, seed)
  ref.eval()
  model.eval()
  x = images(np.random.default_rng(seed), BATCH)
  with torch.no_grad():
    recon_t, aux_t = ref(nchw(torch, x))
  # Jitted, as scoring runs it (op by op, multi_encoder compiled for 8 s).
  (recon_j, aux_j), det = nnx.jit(lambda m, x: (m(x), m.decode(m.encode(x))))(model,
                                                                             jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(recon_j), nhwc(recon_t), atol=1e-5, rtol=0)
  # An aux tensor to 1e-5 of its own scale: resnet_boss's z reaches |z| = 7.5 and float32
  # rounding stays near 2e-6 of its largest value (measured over 13 seeds: 1.3e-6 to 2.0e-6; a
  # fixed 1e-5 failed for seed 248397849, 1.08e-5 at |z| = 6.2).
  for key in aux_t:
    want = nhwc(aux_t[key])
    np.testing.assert_allclose(np.asarray(aux_j[key]), want, rtol=0, err_msg=key,
                               atol=1e-5 * max(1.0, float(np.abs(want).max())))
  np.testing.assert_allclose(np.asarray(det), nhwc(recon_t), atol=1e-5, rtol=0)


# Gradients in float32 are compared as one vector (every parameter's gradient, concatenated), to
# 1e-4 relative in L2 (measured: at most 7e-6). Single tensors are not compared in float32:
# where a gradient is a sum that cancels, rounding alone moves it by more than 1e-4 of its own
# norm (PReLU slopes of fcn_boss, summed over every negative input: seen 8e-4; a bias right
# before train-mode BatchNorm, whose true gradient is zero: seen 1.5e-2 in fcn_strong). The float64
# test compares every tensor instead, to 1e-8. multi_encoder (a summed squared error over
# 98,304 terms through BatchNorm's backward sums) and resnet_boss (its classifier's first conv
# sees two nearly equal images with opposite labels) cancel so much that even the whole vector
# moves (seen 9e-4 and 1.8e-2): float32 keeps only a sanity bound for them.
# Some draws are that ill-conditioned for fcn_boss too: for seed 1658317540 PyTorch's own float32
# gradient is 2.4e-3 (relative) from its float64 gradient, and hw8jax's float32 gradient 2.4e-3
# from PyTorch's, so the 1e-4 bound failed now and then (on main as well). The bound adds twice
# PyTorch's measured float32 rounding: where the gradient is well conditioned that term is about
# 1e-7 and the bound stays 1e-4. For other draws (seeds 1694615574, 592369419) PyTorch's float32
# gradient stays within 5e-6 of its float64 one while hw8jax's float32 gradient is 4.6e-3 from
# its own float64 one (which matches PyTorch's float64 to 1e-8). Per tensor, the error enters
# at the backward of the decoder's third train-mode BatchNorm (its bias gradient, a sum over
# the batch of 8 that nearly cancels, is 1.7e-2 off) and spreads to every layer before it. Our
# reading, not verified in PyTorch's source: its CPU BatchNorm kernels accumulate batch sums in
# double (at::acc_type), XLA's autodiff sums in float32. So the bound also adds twice hw8jax's
# own measured float32 rounding (for the deterministic variants), capped at 1e-2: the float32
# check there is that both sides are within their own float32 rounding of the same float64
# gradient. (An open fidelity gap: a float32 BatchNorm with compensated or wider batch sums
# would close it.)
GRAD_RTOL = {"multi_encoder": 5e-2, "resnet_boss": 5e-2}


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_train_step_matches_torch(variant, seed):
  """Train-mode forward, BatchNorm statistics, loss and the gradient (float32)."""
  check_train_step(variant, seed, np.float32, grad_rtol=GRAD_RTOL.get(variant, 1e-4))


def check_train_step(variant, seed, dtype, grad_rtol, atol=None, batch=BATCH):
  """One train-mode step on both sides. PyTorch runs first; of it only the gradients,
  statistics and outputs are kept once hw8jax has imported its (float32) weights. hw8jax's
  weights are donated to its gradient computation and tensors are compared one at a time.
  (fcn_boss in float64 would otherwise hold two models and two gradients at once, plus float64
  copies of each: 5.7 GB.)"""
  torch, ref = original(variant, seed)
  import torch_reference

  if dtype == np.float64:
    ref.double()
  ref.train()
  x = images(np.random.default_rng(seed), batch).astype(dtype)
  key = jax.random.key(seed)
  xt = nchw(torch, x)
  noise = torch_noise_kwargs(torch, variant, noise_shape(variant, batch), key)
  buffers_before = {k: b.clone() for k, b in ref.named_buffers()}
  recon_t, aux_t = ref(xt, **noise)
  loss_t = torch_reference.loss(variant, xt, recon_t, aux_t)
  loss_t.backward()
  recon_t, loss_t = nhwc(recon_t), loss_t.item()
  torch_grads = {k: p.grad if p.grad is not None else torch.zeros_like(p)
                 for k, p in ref.named_parameters()}
  num_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ref.modules())
  buffers = {k: b.clone().numpy() for k, b in ref.named_buffers()}
  # Float64 weights that were float32 (ref.double()): the float32 import is exact.
  model = imported(variant, {**ref.state_dict(), **buffers_before})
  del aux_t
  if dtype == np.float64:
    del ref  # PyTorch's weights: only their gradients are compared from here

  model.train()
  # The model itself holds the cast values, so no float32 copy outlives this line.
  nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), nnx.state(model)))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  targets = {id(t): (k, convert) for k, t, convert, _ in torch_targets(model)}
  paths = {path: targets[id(v)] for path, v in nnx.to_flat_state(nnx.state(model))}

  def loss_of(params, stats):
    m = nnx.merge(graphdef, params, stats)
    recon, aux = m(jnp.asarray(x), rngs=nnx.Rngs(noise=key))
    loss, _ = models.variant(variant).loss(jnp.asarray(x), recon, aux)
    return loss, (recon, nnx.state(m, nnx.BatchStat))

  # Jitted as training is; the weights are donated so their buffers can hold the gradients.
  # The statistics are differentiated too (their gradient unused), as in train_step.make_train_step:
  # NNX updates them only at the trace level of the params.
  (loss_j, (recon_j, new_stats)), (grads, _) = jax.jit(
      jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True), donate_argnums=0)(params, stats)
  del params

  np.testing.assert_allclose(np.asarray(recon_j), recon_t, atol=atol or 1e-4, rtol=0)
  np.testing.assert_allclose(float(loss_j), loss_t, rtol=atol or 1e-4)
  checked_stats = 0
  for path, value in nnx.to_flat_state(new_stats):
    key_t, convert = paths[path]
    np.testing.assert_allclose(np.asarray(value[...]), convert(buffers[key_t]),
                               atol=atol or 1e-5, rtol=atol or 1e-4, err_msg=key_t)
    checked_stats += 1

  def expected(path):
    key_t, convert = paths[path]
    return np.asarray(convert(torch_grads[key_t].numpy()), np.float64)

  grads = nnx.to_flat_state(grads)
  num_grads = len(grads)
  if dtype == np.float32:
    err2 = norm2 = 0.0
    for path, g in grads:
      want = expected(path)
      err2 += float(np.sum(np.square(np.asarray(g[...], np.float64) - want)))
      norm2 += float(np.sum(np.square(want)))
    if math.sqrt(err2) > grad_rtol * math.sqrt(norm2):  # only then are the float64 runs
      rounding = _torch_float32_rounding(torch, ref, torch_grads, variant, x, noise)  # needed
      own = 0.0
      if not models.variant(variant).stochastic:  # (noise drawn in float64 would be other noise)
        own = _jax_float32_rounding(variant, {**ref.state_dict(), **buffers_before}, x, grads)
        assert own <= 1e-2 * math.sqrt(norm2), (own, math.sqrt(norm2))
      del grads
      bound = grad_rtol * math.sqrt(norm2) + 2 * rounding + 2 * own
      assert math.sqrt(err2) <= bound, (math.sqrt(err2), math.sqrt(norm2), rounding, own)
  else:
    # A bias right before train-mode BatchNorm has an exactly zero gradient; both sides then hold
    # rounding noise, so tensors below 1e-6 of the largest gradient norm must both stay below it.
    floor = 1e-6 * max(float(np.linalg.norm(t.numpy())) for t in torch_grads.values())
    for path, g in grads:
      got, want = np.asarray(g[...]), expected(path)
      if np.linalg.norm(want) < floor:
        assert np.linalg.norm(got) < floor, (path, np.linalg.norm(got), floor)
      else:
        err = np.linalg.norm(got - want)
        assert err <= grad_rtol * np.linalg.norm(want), (path, err, np.linalg.norm(want))
  assert num_grads == len(torch_grads)
  assert checked_stats == 2 * num_bn


def _jax_float32_rounding(variant, state_dict, x, grads32) -> float:
  """||g32 - g64||: how far hw8jax's float32 gradient lies from its own float64 gradient of the
  same weights and input (which the float64 test pins to PyTorch's at 1e-8)."""
  with jax.enable_x64(True):
    model = imported(variant, state_dict)
    model.train()
    nnx.update(model, jax.tree.map(lambda a: a.astype(np.float64), nnx.state(model)))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x64 = jnp.asarray(x, jnp.float64)

    def loss_of(params, stats):
      recon, aux = nnx.merge(graphdef, params, stats)(x64)
      return models.variant(variant).loss(x64, recon, aux)[0]

    grads64 = dict(nnx.to_flat_state(jax.jit(jax.grad(loss_of, argnums=(0, 1)))(params,
                                                                                 stats)[0]))
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(g[...], np.float64)
                                                 - np.asarray(grads64[path][...]))))
                         for path, g in grads32))


def _torch_float32_rounding(torch, ref, grads32, variant, x, noise) -> float:
  """||g32 - g64||: how far PyTorch's own float32 gradient lies from the float64 gradient of
  the same weights and input. Leaves `ref` in float64 with the same weights (exactly)."""
  import torch_reference

  ref.zero_grad(set_to_none=True)
  ref.double()
  xt = nchw(torch, x.astype(np.float64))
  recon, aux = ref(xt, **{k: v.double() for k, v in noise.items()})
  torch_reference.loss(variant, xt, recon, aux).backward()
  err2 = sum(float(torch.sum(torch.square(p.grad - grads32[k].double())))
             for k, p in ref.named_parameters() if p.grad is not None)
  ref.zero_grad(set_to_none=True)
  return math.sqrt(err2)

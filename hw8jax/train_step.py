"""One training step, jitted over a plain-pytree train state that it donates.

The optimiser and schedule a config names, the train state (params, batch_stats, opt_state,
step and the epoch bookkeeping) and the step itself. The model's structure lives in an nnx
graphdef outside the state, so NNX's Python-side object handling runs once, at trace time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from hw8jax import cpu_tuning, data, runtime


def warmup_cosine(base_lr: float, total_steps: int, warmup_fraction: float):
  """transformers' get_cosine_schedule_with_warmup with W = int(warmup_fraction * T):
  base * s / W for s < W, then base * 0.5 * (1 + cos(pi * (s - W) / (T - W)))."""
  warmup = int(warmup_fraction * total_steps)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    rise = s / max(1, warmup)
    progress = (s - warmup) / max(1, total_steps - warmup)
    fall = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return base_lr * jnp.where(s < warmup, rise, fall)

  return schedule


def make_schedule(config: ml_collections.ConfigDict, total_steps: int):
  lr = config.optimizer.learning_rate
  if config.schedule.name == "constant":
    return optax.constant_schedule(lr)
  if config.schedule.name == "warmup_cosine":
    return warmup_cosine(lr, total_steps, config.schedule.warmup_fraction)
  raise ValueError(f"schedule.name {config.schedule.name!r}")  # config.validate lists them


def make_optimizer(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  """Adam / AdamW with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8 added to sqrt(v)), or
  plain SGD."""
  name = config.optimizer.name
  if name == "adam":
    return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)
  if name == "adamw":
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=config.optimizer.weight_decay)
  if name == "sgd":  # torch.optim.SGD without momentum
    return optax.sgd(schedule)
  raise ValueError(f"optimizer.name {name!r}")  # config.validate lists them


def total_steps(config, num_images: int) -> int:
  steps = data.steps_per_epoch(num_images, config.batch_size) * config.num_epochs
  return min(steps, config.max_steps) if config.max_steps > 0 else steps


def optimization(config: ml_collections.ConfigDict, num_images: int) -> tuple:
  """(number of steps, schedule, optimiser) of training `config` on `num_images` images."""
  num_steps = total_steps(config, num_images)
  schedule = make_schedule(config, num_steps)
  return num_steps, schedule, make_optimizer(config, schedule)


def init_state(params, batch_stats, tx) -> dict:
  return {
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "epoch_loss_sum": jnp.zeros((), jnp.float32),  # resumes mid-epoch exactly
      "best": jnp.asarray(-jnp.inf, jnp.float32),    # best score so far (higher is better)
  }


def make_train_step(graphdef, tx, loss, transform, key, compute_dtype=jnp.float32):
  """fn(state, images_uint8) -> (state, metrics), with the variant's `loss(x, recon, aux) ->
  (loss, terms)`. Noise for step s is fold_in(key, s)."""

  def step_fn(state, images):
    x = transform(images)
    noise = jax.random.fold_in(key, state["step"])

    def objective(params, batch_stats):
      # bf16 compute: params cast in, fp32 master params and optimiser state kept.
      model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(compute_dtype), params),
                        batch_stats)
      recon, aux = model(x.astype(compute_dtype), rngs=nnx.Rngs(noise=noise))
      value, terms = loss(x, recon.astype(x.dtype), aux)
      stats = jax.tree.map(lambda new, old: new.astype(old.dtype),
                           nnx.state(model, nnx.BatchStat), batch_stats)
      return value.astype(x.dtype), (terms, stats)

    # batch_stats are differentiated too (and their zero gradient dropped, XLA removes it) so
    # that the BatchStat variables merged inside are at the same trace level as the params:
    # NNX refuses to update a variable created from a value of an outer trace.
    (value, (terms, stats)), (grads, _) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(state["params"], state["batch_stats"])
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                     batch_stats=stats, opt_state=opt_state, step=state["step"] + 1,
                     epoch_loss_sum=state["epoch_loss_sum"] + value)
    return new_state, {"loss": value, **terms}

  return step_fn


def jit_train_step(step_fn, mesh, fast_paths: bool):
  """`step_fn` compiled for `mesh`: state replicated and donated, the batch sharded; with the
  XLA options of the run's CPU policy `fast_paths`."""
  replicated = runtime.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(replicated, runtime.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=cpu_tuning.compiler_options(fast_paths, "train_step"))

"""The seed's strong baseline (12288-2048-1024-512-256-128). The seed changes only the
architecture, so the recipe is the sample code's."""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  c = base_config("fcn_strong")
  # The course sample code's recipe.
  c.optimizer.name = "adam"            # torch.optim.Adam (PyTorch's betas and eps)
  c.optimizer.learning_rate = 1e-3
  c.batch_size = 2000
  c.num_epochs = 50
  c.schedule.name = "constant"
  c.data.transform = "none"            # 2x/255 - 1, no crop
  return apply_arg(c, arg)

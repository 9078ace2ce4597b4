"""The course sample code's VAE (MSE + KLD), with the sample code's recipe; scored on a sampled
z, as the sample code scores it."""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  c = base_config("ta_vae")
  # The course sample code's recipe.
  c.optimizer.name = "adam"            # torch.optim.Adam (PyTorch's betas and eps)
  c.optimizer.learning_rate = 1e-3
  c.batch_size = 2000
  c.num_epochs = 50
  c.schedule.name = "constant"
  c.data.transform = "none"            # 2x/255 - 1, no crop
  c.score.sample = True                # the sample code scores model(x): a sampled z
  return apply_arg(c, arg)

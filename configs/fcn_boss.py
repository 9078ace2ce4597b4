"""fcn_boss: the seed's best model (public 0.82865 / private 0.83038).

From the seed: the architecture, the cosine schedule with linear warmup over
int(1.15 * 0.1 * total_steps) steps, and the crop transform on training and test images.
The seed is silent on optimiser, rate, batch and epochs; those stay the sample code's
(Adam 1e-3, batch 2000, 50 epochs).
"""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  c = base_config("fcn_boss")
  c.schedule.name = "warmup_cosine"
  c.data.transform = "crop"
  return apply_arg(c, arg)

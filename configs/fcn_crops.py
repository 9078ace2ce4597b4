"""One member of the multi-crop fully connected ensemble (2023 top report: 7 FCNs on 3 face
crops, scores averaged; public 0.87841).

`configs/fcn_crops.py:N` trains on crop N of the report's three (top, left, height, width)
boxes of the 64x64 image, each resized to 64x64; `:N,quick` shrinks it like `:quick`. From the
report: batch 512, 80 epochs, the crops. The report's FCN (latent 24) is not specified further,
so the members here are fcn_boss models; its rate is not given, so Adam 1e-3 with the boss
warmup-cosine schedule. Recipe (README): train the three, then `python -m hw8jax.ensemble`.
"""

from hw8jax.config import ConfigError, apply_arg, base_config

CROPS = ((16, 16, 28, 32), (10, 12, 40, 44), (12, 14, 36, 40))


def get_config(arg="0"):
  index, _, rest = (arg or "0").partition(",")
  if index not in {str(i) for i in range(len(CROPS))}:
    raise ConfigError(f"crop {index!r}: use 0, 1 or 2 (and optionally ',quick')")
  c = base_config("fcn_boss")
  c.data.transform = ",".join(map(str, CROPS[int(index)]))
  c.schedule.name = "warmup_cosine"
  c.batch_size = 512
  c.num_epochs = 80
  return apply_arg(c, rest or None)

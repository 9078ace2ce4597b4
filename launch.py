"""Train and/or score an hw8jax autoencoder.

  python launch.py --config=configs/fcn_boss.py:demo --workdir=/tmp/demo
  python launch.py --config=configs/fcn_boss.py --workdir=runs/fcn_boss --config.num_epochs=80
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/<variant>.py[:quick|:demo]",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Folder for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train_and_score", ["train", "score", "train_and_score"],
                  "What to run.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  from hw8jax.errors import UserError
  from hw8jax.main import run

  try:
    run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.mode)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

"""Train and/or score an hw8jax autoencoder.

  python launch.py --config=configs/fcn_boss.py:demo --workdir=/tmp/demo
  python launch.py --config=configs/fcn_boss.py --workdir=runs/fcn_boss --config.num_epochs=80
"""

import gc
import os
import signal
import sys

INTERRUPTED = "interrupted; run the same command to continue from the last checkpoint"


def _stop_at_once(signum, frame):
  """Ctrl-C before main() runs: nothing is written yet, so stop now. (As an exception it could
  surface in the middle of an import as a long traceback, or while JAX starts, as an abort.)"""
  os.write(2, b"interrupted before the run started; nothing was written\n")
  os._exit(128 + signal.SIGINT)


if __name__ == "__main__":  # also where a shell started it with SIGINT ignored (a background job)
  signal.signal(signal.SIGINT, _stop_at_once)

from absl import app, flags, logging  # noqa: E402  (after the handler: imports take a second)
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<variant>.py[:quick|:demo]",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Folder for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train_and_score", ["train", "score", "train_and_score"],
                  "What to run.")
flags.mark_flags_as_required(["config"])


def _deliver_lost_interrupts():
  """A Ctrl-C that lands while a garbage-collector callback runs (JAX registers one) is printed
  by Python as "Exception ignored" and dropped, and the run went on to exit 0. Deliver it again
  a moment later, through a timer signal, once the callback is over (a thread cannot be started
  from within it)."""
  default_hook = sys.unraisablehook

  def again(signum, frame):
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    raise KeyboardInterrupt

  def hook(unraisable):
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
      signal.signal(signal.SIGALRM, again)
      signal.setitimer(signal.ITIMER_REAL, 0.05)
    else:
      default_hook(unraisable)

  sys.unraisablehook = hook


def _spare_the_collector():
  """Put every object alive now out of the cyclic garbage collector's reach (`gc.freeze`):
  each full collection, and the interpreter's shutdown, would otherwise walk all of the
  imported libraries' objects, which live as long as the process anyway (docs/performance.md).
  Only in a process of its own: a frozen object is never collected."""
  if __name__ == "__main__":
    gc.freeze()


def _fail(lines: str, code: int = 1):
  for line in str(lines).splitlines():
    print(f"error: {line}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's parsing, with every mistake in the flags (an unknown config key or :arg, a value
  of the wrong type, a missing config file) as one line instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS.config.get("model")  # config_flags defers a config file's load error to here
    return rest
  except Exception as e:  # config_flags raises whatever loading the config file raised
    from hw8jax.errors import flag_error  # hw8jax is imported once the flags are read

    _fail(flag_error(e, argv[1:]), 2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}; flags are --name=value", 2)
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  # hw8jax, and with it JAX, is imported here: after the allocator is set (main_process).
  from hw8jax.errors import Interrupted, UserError
  from hw8jax.main import run

  if __name__ == "__main__":  # from here Ctrl-C unwinds: what a run writes is cleaned up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _deliver_lost_interrupts()
  _spare_the_collector()  # the libraries, imported by now
  try:
    run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.mode)
    _spare_the_collector()  # what the run kept, before the interpreter's shutdown
  except Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except UserError as e:
    _fail(e)
  except KeyboardInterrupt:
    print(INTERRUPTED, file=sys.stderr)
    if __name__ != "__main__":
      sys.exit(128 + signal.SIGINT)
    # What the run wrote is closed by now; the interpreter's own shutdown, with XLA's threads
    # stopped mid-work, once crashed (SIGSEGV) after the line was printed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signal.SIGINT)


def main_process(argv):
  """main in a process of its own, which may set what is process-wide: the host allocator of
  `cpu_fast_paths`, before JAX's backend starts."""
  from hw8jax import cpu_tuning  # imported once the flags are read, as all of hw8jax

  cpu_tuning.tune_allocator(flags.FLAGS.config.get("cpu_fast_paths", "off"))
  main(argv)


if __name__ == "__main__":
  app.run(main_process, flags_parser=parse_flags)

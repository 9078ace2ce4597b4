"""launch.py with the test-only `tiny` variant registered (tests/tiny.py).

  python tests/tiny_launch.py --config=configs/ta_cnn.py:quick --config.model=tiny ...

takes launch.py's flags and runs launch.py itself, so a test of a launch meets what a user's
command meets; only the model is the tiny one.
"""

import os
import runpy
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)

import tiny  # noqa: E402

tiny.register()
if os.environ.get("HW8JAX_TEST_SAY_FROZEN"):  # what launch.py left out of the collector's reach
  import atexit
  import gc

  atexit.register(lambda: print(f"frozen at exit: {gc.get_freeze_count()}", flush=True))
sys.argv[0] = os.path.join(os.path.dirname(TESTS), "launch.py")
runpy.run_path(sys.argv[0], run_name="__main__")

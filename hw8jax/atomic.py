"""How every output file is written: whole or not at all. A reader (a later run, a Kaggle
upload, an ensemble) never sees half a file, and a write that fails (a full disk, a signal)
leaves the previous file as it was and no temporary file behind."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def replaced(path, mode: str = "w"):
  """A file to write `path`'s new content into: a temporary file beside it that replaces
  `path` when the block ends, and is removed if the block raises."""
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> None:
  with replaced(path) as f:
    f.write(text)

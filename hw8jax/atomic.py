"""Every output file written whole or not at all (temp file + rename).

A reader (a later run, a Kaggle upload, an ensemble) never sees half a file, and a write that
fails (a full disk, a signal) leaves the previous file as it was and no temporary file behind;
a full disk or a folder that cannot be written is one line naming the path."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

from hw8jax.errors import UserError


def free_bytes(path) -> int:
  """Bytes free for this process on the filesystem that holds `path` (or its nearest existing
  parent)."""
  folder = os.path.abspath(os.fspath(path))
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  return shutil.disk_usage(folder).free


def size(n: float) -> str:
  for unit in ("bytes", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} GB"


def check_folder(folder, flag: str) -> None:
  """`folder` (given as `flag`) can be created or written in, checked without writing."""
  folder = os.fspath(folder)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise UserError(f"{flag}={folder}: is a file, not a folder")
  existing = os.path.abspath(folder)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"{flag}={folder}: cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "write in it" if existing == os.path.abspath(folder) else f"create it in {existing}"
    raise UserError(f"{flag}={folder}: cannot {what} (permission denied)")


def write_error(path, e: OSError) -> UserError:
  """One line for a write that failed; a full disk says how much is free."""
  path = os.fspath(path)
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return UserError(f"{path}: no space left on the device ({size(free_bytes(path))} free); "
                     "what was already saved is unchanged: free some space and run the same "
                     "command again")
  return UserError(f"{path}: cannot write it ({e.strerror or e})")


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
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise write_error(path, e) from None
    raise


def write_text(path, text: str) -> None:
  with replaced(path) as f:
    f.write(text)

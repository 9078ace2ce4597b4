"""The zip archive of a `torch.save` file (PyTorch >= 1.6), read as data.

The archive has one top folder (any name) holding `data.pkl` (the object, pickled), `byteorder`
and `data/<key>`: one record of raw elements per storage. Before any record is read, the file
must be a regular file (a FIFO or a device would hang a read), a zip archive (legacy pickle and
tar files are refused), with a central directory of bounded size, every record in the top
folder, none larger than the file itself (a zip bomb), and no TorchScript (`code/`,
`constants.pkl`). Storages are read into numpy with their storage type's dtype (in this machine's
byte order, whatever the file's), each only once, their sizes checked and their total bounded.
"""

from __future__ import annotations

import os
import stat
import struct
import zipfile

import numpy as np

from hw8jax.errors import UserError

# The largest original (fcn_boss, 122 M parameters) is 0.49 GB in float32 and 0.98 GB in
# float64: a tensor, or all storages together, may take at most 2 GiB.
MAX_BYTES = 2 * 2**30
MAX_RECORDS = 10_000            # a whole resnet_boss: about 250
MAX_DIRECTORY_BYTES = 16 * 2**20
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "CharStorage": "int8", "ShortStorage": "int16",
    "IntStorage": "int32", "LongStorage": "int64", "ByteStorage": "uint8", "BoolStorage": "bool",
}
_STORAGE_KEY = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"


class TorchFileError(UserError, ValueError):
  """A PyTorch file hw8jax will not or cannot read; one line naming the file."""


class Refused(Exception):
  """Raised while a file is read; `hw8jax.torch_import.read_state_dict` names the file."""


def shown(value) -> str:
  """A name from a file as a message shows it: plain text as it is, anything else (control
  characters, escape sequences, newlines, bytes) through repr."""
  if isinstance(value, str) and value.isascii() and value.isprintable() and len(value) <= 200:
    return value
  return repr(value)[:200]


class StorageType:
  """What a storage type named by the file (`torch.FloatStorage`, ...) becomes: its dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name = name
    dtype = STORAGE_DTYPES[name]
    if dtype == "bfloat16":
      # Imported only here: half a second without JAX, which the reader does without.
      import ml_dtypes

      dtype = ml_dtypes.bfloat16
    self.dtype = np.dtype(dtype)

  def __setstate__(self, state):
    raise Refused(f"it tries to change torch.{self.name}")


class Storage:
  """One storage's elements: a flat, read-only numpy array, and its type's name."""

  __slots__ = ("array", "kind")

  def __init__(self, array: np.ndarray, kind: str):
    self.array, self.kind = array, kind


def open_regular(path: str):
  """The file at `path`, opened without blocking, if it is a regular file."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
  except OSError as e:
    raise Refused(f"cannot read it ({e.strerror})") from None
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise Refused("not a regular file (a folder, a FIFO or a device); give a torch.save file")
  return os.fdopen(fd, "rb")


def _check_format(f, size: int) -> None:
  head = f.read(512)
  if head[:4] == b"PK\x03\x04":
    return
  resave = "load it with the PyTorch that wrote it and torch.save it again with PyTorch >= 1.6"
  if head[:1] == b"\x80":
    raise Refused(f"a legacy (pre-zip) torch.save file; {resave}")
  if len(head) >= 262 and head[257:262] == b"ustar":
    raise Refused(f"a legacy tar torch.save file; {resave}")
  raise Refused(f"not a torch.save zip archive ({size} bytes, starting {shown(head[:8])})")


def _check_directory(f, size: int) -> None:
  """Bound the central directory before zipfile reads all of it into memory."""
  f.seek(max(0, size - 65557))  # the end record: 22 bytes and a comment of up to 65535
  tail = f.read()
  at = tail.rfind(b"PK\x05\x06")
  if at < 0 or len(tail) - at < 22:
    raise Refused("a zip archive without its end record (truncated?)")
  records, dir_size = struct.unpack("<10xHL6x", tail[at:at + 22])
  if records == 0xFFFF or dir_size == 0xFFFFFFFF:  # ZIP64: the counts are in its own record
    f.seek(max(0, size - len(tail) + at - 20))
    locator = f.read(20)
    if len(locator) < 20 or locator[:4] != b"PK\x06\x07":
      raise Refused("a ZIP64 archive without its locator")
    f.seek(struct.unpack("<8xQ4x", locator)[0])
    record = f.read(56)
    if len(record) < 56 or record[:4] != b"PK\x06\x06":
      raise Refused("a ZIP64 archive without its end record")
    records, dir_size = struct.unpack("<32xQQ8x", record)
  if records > MAX_RECORDS or dir_size > MAX_DIRECTORY_BYTES:
    raise Refused(f"a zip archive of {records} records ({dir_size} bytes of directory); at "
                  f"most {MAX_RECORDS}")


class Archive:
  """The records of a torch.save archive in the open file `f`, checked as described above."""

  def __init__(self, f):
    size = os.fstat(f.fileno()).st_size
    _check_format(f, size)
    _check_directory(f, size)
    f.seek(0)
    self.zip = zipfile.ZipFile(f)
    names = self.zip.namelist()
    self.top = names[0].partition("/")[0] if names else ""
    for info in self.zip.infolist():
      if not info.filename.startswith(self.top + "/"):
        raise Refused(f"record {shown(info.filename)} lies outside the archive's folder "
                      f"{shown(self.top)}")
      if info.file_size > size:
        raise Refused(f"record {shown(info.filename)} inflates to {info.file_size} bytes, more "
                      f"than the whole file ({size})")
      if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise Refused(f"record {shown(info.filename)} uses compression method "
                      f"{info.compress_type}")
    if f"{self.top}/constants.pkl" in names or any(n.startswith(f"{self.top}/code/")
                                                   for n in names):
      raise Refused("a TorchScript archive (torch.jit.save); hw8jax reads torch.save files: "
                    "save the model's state_dict with torch.save(model.state_dict(), path)")
    order = self.record("byteorder", 8) if f"{self.top}/byteorder" in names else b"little"
    if order not in (b"little", b"big"):
      raise Refused(f"byteorder {shown(order)}: expected little or big")
    self.order = "<" if order == b"little" else ">"
    self.storages, self.total = {}, 0

  def record(self, name: str, limit: int) -> bytes:
    """The bytes of the record `name` (in the top folder), if it holds at most `limit`."""
    full = f"{self.top}/{name}"
    try:
      info = self.zip.getinfo(full)
    except KeyError:
      raise Refused(f"no record {shown(full)} in the archive") from None
    if info.file_size > limit:
      raise Refused(f"record {shown(full)} holds {info.file_size} bytes; at most {limit}")
    return self.zip.read(info)

  def storage(self, kind: StorageType, key, numel) -> Storage:
    """The storage `data/<key>` of `numel` elements of `kind`, read once."""
    if not (isinstance(key, str) and 0 < len(key) <= 64 and set(key) <= set(_STORAGE_KEY)) or \
        not (isinstance(numel, int) and not isinstance(numel, bool) and numel >= 0):
      raise Refused(f"storage key {shown(key)} or size {shown(numel)} is not valid")
    if key in self.storages:
      known = self.storages[key]
      if known.kind != kind.name or known.array.size != numel:
        raise Refused(f"storage {key} is named twice with different types or sizes")
      return known
    nbytes = numel * kind.dtype.itemsize
    self.total += nbytes
    if self.total > MAX_BYTES:
      raise Refused(f"its storages hold more than {MAX_BYTES} bytes")
    raw = self.record(f"data/{key}", nbytes)
    if len(raw) != nbytes:
      raise Refused(f"storage {key}: {len(raw)} bytes for {numel} elements of {kind.dtype}")
    array = np.frombuffer(raw, kind.dtype.newbyteorder(self.order))
    if not array.dtype.isnative:  # as torch.load does: the values in this machine's order
      array = array.astype(kind.dtype)
      array.flags.writeable = False
    self.storages[key] = Storage(array, kind.name)
    return self.storages[key]

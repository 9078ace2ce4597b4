"""Hand-written PyTorch files that attack a reader: raw pickle opcodes in zip and tar archives,
none made with torch.save. `write_all(folder, marker, outside)` writes each and returns
{name: (path, what the refusal must say, or None where the file is data a reader may return)}.

`marker` is a path an attack tries to create; `outside` a file outside the folder that an attack
tries to change (a tar hard link, a symlink, a TorchScript `__setstate__`).
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib

# --- a small pickle assembler (protocol 2 opcodes, plus STACK_GLOBAL of protocol 4)


def text(value: str) -> bytes:
  raw = value.encode("utf-8", "surrogatepass")
  return b"X" + struct.pack("<I", len(raw)) + raw


def num(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)


def glob(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def call(fn: bytes, *args: bytes) -> bytes:
  return fn + tup(*args) + b"R"


def odict(*pairs: tuple[bytes, bytes]) -> bytes:
  out = glob("collections", "OrderedDict") + b")R"
  if pairs:
    out += b"(" + b"".join(k + v for k, v in pairs) + b"u"
  return out


def pickled(*ops: bytes) -> bytes:
  return b"\x80\x02" + b"".join(ops) + b"."


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
  return tup(text("storage"), glob("torch", kind), text(key), text("cpu"), num(numel)) + b"Q"


def tensor(key: str, numel: int, size=(2,), stride=(1,), offset: int = 0, hooks=None) -> bytes:
  return call(glob("torch._utils", "_rebuild_tensor_v2"), storage(key, numel), num(offset),
              tup(*map(num, size)), tup(*map(num, stride)), b"\x89", hooks or odict())


def module(cls: str, params=(), children=(), memo: int | None = None) -> bytes:
  """A `__main__.<cls>` module built as torch.save builds one (NEWOBJ, then BUILD with its
  state); `memo` stores it in the memo before its state is built (for cycles)."""
  head = glob("__main__", cls) + b")\x81" + (b"r" + struct.pack("<I", memo) if memo is not None
                                               else b"")
  state = b"}(" + text("_parameters") + odict(*params) + text("_buffers") + odict() + \
      text("_modules") + odict(*children) + b"u"
  return head + state + b"b"


def put(index: int) -> bytes:
  return b"r" + struct.pack("<I", index)


def get(index: int) -> bytes:
  return b"j" + struct.pack("<I", index)


def archive(path: str, data_pkl: bytes, records: dict | None = None, top: str = "archive",
            extra: dict | None = None, byteorder: bytes = b"little") -> str:
  """A zip archive in torch.save's layout (records stored uncompressed)."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{top}/data.pkl", data_pkl)
    z.writestr(f"{top}/byteorder", byteorder)
    for key, raw in (records or {}).items():
      z.writestr(f"{top}/data/{key}", raw)
    for name, raw in (extra or {}).items():
      z.writestr(name, raw)
    z.writestr(f"{top}/version", b"3\n")
  return path


FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def _state_dict(*pairs) -> bytes:
  return pickled(odict(*pairs))


def _weight(key="0", numel=4, **kwargs) -> tuple[bytes, bytes]:
  return text("w"), tensor(key, numel, **kwargs)


def raw_zip(path: str, entries: list[tuple[str, int, bytes, int]], flags: int = 0,
            claimed: int | None = None) -> str:
  """A zip archive written byte by byte: (name, method, stored bytes, size it claims) per
  record (CRC 0: no reader here gets as far as checking it), `flags` on every record, and an
  end record that claims `claimed` records (default: the true count)."""
  out, directory = bytearray(), bytearray()
  for name, method, raw, size in entries:
    name_b = name.encode()
    fields = (20, flags, method, 0, 0x21, 0, len(raw), size, len(name_b))
    directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0,
                             len(out)) + name_b
    out += struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields, 0) + name_b + raw
  count = len(entries) if claimed is None else claimed
  end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), len(out), 0)
  return _write(path, bytes(out + directory + end))


def _stored(data_pkl: bytes, records: dict) -> list:
  entries = [("archive/data.pkl", 0, data_pkl, len(data_pkl)),
             ("archive/byteorder", 0, b"little", 6)]
  return entries + [(f"archive/data/{k}", 0, v, len(v)) for k, v in records.items()]


def _zip_bomb(path: str) -> str:
  """A 2 MB archive whose storage record inflates to 2 GiB of zeros: 128 identical deflate
  blocks (each 16 MiB fully flushed), its sizes honest."""
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = c.compress(bytes(1 << 24)) + c.flush(zlib.Z_FULL_FLUSH)
  stream = block * 128 + c.flush()
  entries = _stored(_state_dict(_weight(numel=1 << 29, size=(1 << 29,))), {})
  return raw_zip(path, entries + [("archive/data/0", 8, stream, 1 << 31)])


def _too_many_records(path: str) -> str:
  return raw_zip(path, _stored(_state_dict(_weight()), {"0": FLOATS}), claimed=65000)


def _legacy(path: str, marker: str) -> str:
  """torch's pre-zip format: the magic number's pickle, then a pickle whose persistent id of
  type "module" makes torch write `<source file>.patch`."""
  magic = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
  body = pickled(tup(text("module"), glob("__main__", "Net"), text(marker), text("print(1)"))
                 + b"Q")
  open(path, "wb").write(magic + pickled(num(1001)) + pickled(b"}") + body)
  return path


def _tar(path: str, kind: str, outside: str) -> str:
  with tarfile.open(path, "w") as t:
    for name in ("sys_info", "pickle", "tensors"):
      info = tarfile.TarInfo(name)
      payload = pickled(num(0))
      info.size = len(payload)
      t.addfile(info, io.BytesIO(payload))
    info = tarfile.TarInfo("storages")
    if kind == "hardlink":
      info.type, info.linkname, info.mode = tarfile.LNKTYPE, outside, 0o777
    elif kind == "symlink":
      info.type, info.linkname = tarfile.SYMTYPE, outside
    else:
      info.type = tarfile.FIFOTYPE
    t.addfile(info)
  return path


def _torchscript(path: str, marker: str, top_level_code: bool) -> str:
  code = (f"class Net(Module):\n  def __setstate__(self, state):\n"
          f"    torch.from_file({marker!r}, True, 8)\n")
  extra = {"archive/code/__torch__.py": code.encode()}
  if not top_level_code:
    extra = {"archive/constants.pkl": pickled(b")")}
  return archive(path, pickled(glob("__torch__", "Net") + b")\x81}b"), extra=extra)


def _shared_tree(levels: int) -> bytes:
  """Every level lists the level below twice (2**levels paths to the leaf)."""
  ops = module("Leaf", params=[_weight()]) + put(1)
  for level in range(levels):
    ops += module(f"L{level}", children=[(text("a"), get(level + 1)),
                                         (text("b"), get(level + 1))]) + put(level + 2)
  return pickled(ops)


def _chain(depth: int) -> bytes:
  ops = module("Leaf", params=[_weight()])
  for _ in range(depth):
    ops = module("Link", children=[(text("next"), ops)])
  return pickled(ops)


def _nested_lists(depth: int) -> bytes:
  return pickled(b"]" * depth + b"a" * (depth - 1))


def write_all(folder: str, marker: str, outside: str) -> dict[str, tuple[str, str | None]]:
  os.makedirs(folder, exist_ok=True)
  p = lambda name: os.path.join(folder, name)  # noqa: E731
  st = {"0": FLOATS}
  big_endian = struct.pack(">4f", 1.0, 2.0, 3.0, 4.0)
  files = {
      "torchscript_code": (_torchscript(p("ts_code.pt"), marker, True), "TorchScript"),
      "torchscript_constants": (_torchscript(p("ts_const.pt"), marker, False), "TorchScript"),
      "legacy_patch_write": (_legacy(p("legacy.pt"), marker), "legacy (pre-zip)"),
      "tar_hardlink": (_tar(p("hard.tar"), "hardlink", outside), "legacy tar"),
      "tar_symlink": (_tar(p("sym.tar"), "symlink", outside), "legacy tar"),
      "tar_fifo": (_tar(p("fifo.tar"), "fifo", outside), "legacy tar"),
      "os_system": (archive(p("system.pt"), pickled(call(
          glob("posix", "system"), text(f"touch {marker}")))), "asks to call posix.system"),
      "builtins_eval": (archive(p("eval.pt"), pickled(call(
          glob("builtins", "eval"), text(f"open({marker!r}, 'w')")))),
          "asks to call builtins.eval"),
      "subprocess_popen": (archive(p("popen.pt"), pickled(call(
          glob("subprocess", "Popen"), b"]" + text("touch") + b"a" + text(marker) + b"a"))),
          "asks to call subprocess.Popen"),
      "reduce_without_args": (archive(p("noargs.pt"), pickled(glob("os", "getpid") + b")R")),
                              "asks to call os.getpid"),
      "newobj_with_args": (archive(p("newobj.pt"), pickled(
          glob("pathlib", "Path") + tup(text(marker)) + b"\x81")), "asks to call pathlib.Path"),
      "build_on_allowed_function": (archive(p("build_fn.pt"), pickled(
          glob("torch._utils", "_rebuild_tensor_v2") + b"}" + text("__defaults__") +
          tup(num(1)) + b"sb")), "tries to change torch._utils._rebuild_tensor_v2"),
      "build_slots_on_allowed_function": (archive(p("build_slots.pt"), pickled(
          glob("collections", "OrderedDict") + b"N}" + text("__init__") + num(0) +
          b"s\x86b")), "tries to change collections.OrderedDict"),
      "build_on_stand_in_class": (archive(p("build_cls.pt"), pickled(
          glob("__main__", "Net") + b"}" + text("__new__") + num(0) + b"sb")),
          "tries to change the class __main__.Net"),
      "build_on_tensor": (archive(p("build_tensor.pt"), pickled(
          tensor("0", 4) + b"}" + text("x") + num(0) + b"sb"), st),
          "tries to change a tensor"),
      "reconstructor_of_a_function": (archive(p("recon.pt"), pickled(call(
          glob("copyreg", "_reconstructor"), glob("torch._utils", "_rebuild_tensor_v2"),
          glob("builtins", "object"), b"N"))), "copyreg._reconstructor"),
      "module_persistent_id": (archive(p("persid_module.pt"), pickled(
          tup(text("module"), glob("__main__", "Net"), text(marker), text("x")) + b"Q")),
          "refers to a module outside the pickle"),
      "text_persistent_id": (archive(p("persid_text.pt"), pickled(b"P" + b"0\n")),
                             "PERSID opcode"),
      "extension_opcode": (archive(p("ext.pt"), pickled(b"\x82\x01")), "EXT1 opcode"),
      "memo_bomb": (archive(p("memo.pt"), pickled(b")" + b"r" + struct.pack("<I", 2**31))),
                    "memo entry 2147483648"),
      "duplicated_children": (archive(p("dup.pt"), _shared_tree(40), st), "appears twice"),
      "cyclic_tree": (archive(p("cycle.pt"), pickled(
          glob("__main__", "Net") + b")\x81" + put(0) + b"}(" + text("_parameters") + odict() +
          text("_buffers") + odict() + text("_modules") + odict((text("me"), get(0))) +
          b"ub")), "appears twice"),
      "deep_tree": (archive(p("deep.pt"), _chain(100), st), "deeper than 64"),
      "deeply_nested_lists": (archive(p("lists.pt"), _nested_lists(200_000)),
                              "holds a list, not a state_dict"),
      "zip_bomb": (_zip_bomb(p("bomb.pt")), "inflates to 2147483648 bytes"),
      "too_many_records": (_too_many_records(p("records.pt")), "65000 records"),
      "storage_larger_than_record": (archive(p("short.pt"), _state_dict(
          _weight(numel=1000, size=(1000,))), st), "storage 0: 16 bytes for 1000 elements"),
      "view_outside_its_storage": (archive(p("view.pt"), _state_dict(
          _weight(size=(3,), stride=(2,))), st), "reaches element 4 of a storage of 4"),
      "stride_zero_giant": (archive(p("giant.pt"), _state_dict(
          _weight(size=(1 << 20, 1 << 20), stride=(0, 0))), st), "takes more than"),
      "negative_offset": (archive(p("negative.pt"), _state_dict(_weight(offset=-1)), st),
                          "not built from a storage"),
      "backward_hooks": (archive(p("hooks.pt"), _state_dict(_weight(hooks=odict(
          (num(0), glob("posix", "system"))))), st), "backward hooks"),
      "non_tensor_entry": (archive(p("int.pt"), _state_dict((text("w"), num(7)))),
                           "entry w is a int"),
      "module_without_state": (archive(p("bare.pt"), pickled(glob("__main__", "Net") +
                                                            b")\x81")),
                               "the model is not a torch module"),
      "module_with_other_state": (archive(p("other_state.pt"), pickled(
          glob("__main__", "Net") + b")\x81" + text("x") + b"b")), "not a torch module"),
      "escape_in_global": (archive(p("escape_global.pt"), pickled(
          b"\x8c\x08\x1b[2J\nbad" + b"\x8c\x02ok" + b"\x93")), r"'\x1b[2J\nbad'"),
      "escape_in_names": (archive(p("escape_names.pt"), _state_dict(
          (text("\x1b[31m\nerror: forged line"), tensor("0", 4))), st), None),
      "record_outside_folder": (archive(p("outside.pt"), _state_dict(_weight()), st,
                                        extra={"elsewhere/x": b"1"}), "lies outside"),
      "missing_data_pkl": (_missing_data_pkl(p("nodata.pt")), "no record archive/data.pkl"),
      "bad_byteorder": (archive(p("order.pt"), _state_dict(_weight()), st,
                                byteorder=b"middle"), "byteorder b'middle'"),
      "big_endian": (archive(p("big.pt"), _state_dict(_weight()), {"0": big_endian},
                             byteorder=b"big"), None),
      "truncated_zip": (_truncated(p("cut.pt")), "without its end record"),
      "garbage": (_write(p("garbage.pt"), b"\x00garbage" * 100), "not a torch.save zip"),
      "empty_file": (_write(p("empty.pt"), b""), "not a torch.save zip"),
      "encrypted_record": (_encrypted(p("encrypted.pt")), "not a readable torch.save file"),
      "fifo": (_fifo(p("fifo.pt")), "not a regular file"),
      "device": ("/dev/zero", "not a regular file"),
      "folder": (folder, "not a regular file"),
  }
  return files


def _write(path: str, raw: bytes) -> str:
  with open(path, "wb") as f:
    f.write(raw)
  return path


def _missing_data_pkl(path: str) -> str:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/byteorder", b"little")
  return path


def _truncated(path: str) -> str:
  archive(path, _state_dict(_weight()), {"0": FLOATS})
  raw = open(path, "rb").read()
  return _write(path, raw[:len(raw) // 2])


def _encrypted(path: str) -> str:
  return raw_zip(path, _stored(_state_dict(_weight()), {"0": FLOATS}), flags=1)


def _fifo(path: str) -> str:
  os.mkfifo(path)
  return path

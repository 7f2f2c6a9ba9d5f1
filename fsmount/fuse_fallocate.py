"""fallocate(2) for the live tree, which pyfuse3 does not offer: a handler put into its request table.

pyfuse3 gives libfuse a `struct fuse_lowlevel_ops` with no `fallocate`, so the kernel answers every
fallocate(2) on the mount with EOPNOTSUPP (`posix_fallocate` then falls back to writing zeros; a
hole cannot be punched at all). pyfuse3 fills that table in `pyfuse3.init`; libfuse copies it into
the session it creates there, and looks each request's handler up in that copy.

So `install`, called after `pyfuse3.init`:
- finds pyfuse3's table, a static variable of its extension module (the symbol's value in the
  module's ELF symbol table, plus the module's load address from /proc/self/maps), and checks it
  looks as it must: `lookup` and `readdirplus` set, `readdir` and `fallocate` not;
- finds the session (another static variable), and near its start the copy, equal to the table
  pointer for pointer;
- puts a ctypes callback into the copy's `fallocate` slot. libfuse calls it on the thread that
  reads requests (the event loop's); it calls `handler(fh, mode, offset, length)` and replies
  with its errno.
Where anything does not match, nothing is changed and fallocate stays unsupported, as it was.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable, Iterator

import pyfuse3

log = logging.getLogger(__name__)

# Positions of function pointers in struct fuse_lowlevel_ops (fuse_lowlevel.h, the same in every
# libfuse 3), and of `fh` in struct fuse_file_info.
_LOOKUP, _READDIR, _FALLOCATE, _READDIRPLUS = 2, 21, 40, 41
_FIELDS = 44
_FH_OFFSET = 16
_TABLE_SYMBOL = b"__pyx_v_7pyfuse3_fuse_ops"
_SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
_COPY_WITHIN = 256  # how far into struct fuse_session its copy of the table may start (it is at ~48)

_Callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_void_p)
_installed: list[object] = []  # the callback, kept alive for as long as libfuse may call it


def install(handler: Callable[[int, int, int, int], None]) -> bool:
    """Serve FUSE_FALLOCATE with `handler` (raising OSError to fail); call after `pyfuse3.init`.
    Whether it could."""
    table = _session_table()
    if table is None:
        log.warning("fallocate(2) on this mount fails with EOPNOTSUPP: pyfuse3 %s's request table is not "
                    "where fsmount/fuse_fallocate.py looks", getattr(pyfuse3, "__version__", "?"))
        return False
    reply_err = _libfuse().fuse_reply_err
    reply_err.argtypes, reply_err.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int

    def on_fallocate(request: int, _inode: int, mode: int, offset: int, length: int, file_info: int) -> None:
        error = 0
        try:
            handler(ctypes.c_uint64.from_address(file_info + _FH_OFFSET).value, mode, offset, length)
        except OSError as exc:
            error = exc.errno or errno.EIO
        except pyfuse3.FUSEError as exc:
            error = exc.errno
        except BaseException:  # nothing may escape into libfuse
            log.exception("fallocate failed unexpectedly")
            error = errno.EIO
        reply_err(request, error)

    callback = _Callback(on_fallocate)
    _installed.append(callback)
    table[_FALLOCATE] = ctypes.cast(callback, ctypes.c_void_p).value
    return True


def _session_table() -> ctypes.Array | None:
    """The session's copy of pyfuse3's `fuse_ops`, if everything is where and what it must be."""
    path = pyfuse3.__file__
    try:
        symbols = _symbol_values(path, {_TABLE_SYMBOL, _SESSION_SYMBOL})
        base = _load_address(path)
    except (OSError, ValueError, struct.error):
        return None
    if base is None or len(symbols) != 2:
        return None
    table = (ctypes.c_void_p * _FIELDS).from_address(base + symbols[_TABLE_SYMBOL])
    if not table[_LOOKUP] or not table[_READDIRPLUS] or table[_READDIR] or table[_FALLOCATE]:
        return None
    session = ctypes.c_void_p.from_address(base + symbols[_SESSION_SYMBOL]).value
    if not session:
        return None
    wanted = list(table)
    for offset in range(0, _COPY_WITHIN, ctypes.sizeof(ctypes.c_void_p)):
        copy = (ctypes.c_void_p * _FIELDS).from_address(session + offset)
        if list(copy) == wanted:
            return copy
    return None


def _symbol_values(path: str, names: set[bytes]) -> dict[bytes, int]:
    """The values of the symbols `names` in the ELF64 file `path` (offsets from its load address)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit, little-endian
        return {}
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    found: dict[bytes, int] = {}
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, symbol_size in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for at in range(offset, offset + size, symbol_size):
            name_at, _info, _other, _section, value, _size = struct.unpack_from("<IBBHQQ", data, at)
            name = data[strings + name_at:data.index(b"\0", strings + name_at)]
            if name in names:
                found[name] = value
    return found


def _mappings() -> Iterator[tuple[int, int, str]]:
    """This process's file mappings: (start address, file offset, path), from /proc/self/maps."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6:
                yield int(fields[0].split("-")[0], 16), int(fields[2], 16), fields[5]


def _load_address(path: str) -> int | None:
    """Where the shared object `path` is mapped in this process (its mapping at file offset 0)."""
    real = os.path.realpath(path)
    return next((start for start, offset, mapped in _mappings() if mapped == real and offset == 0), None)


def _libfuse() -> ctypes.CDLL:
    """The libfuse3 pyfuse3 is linked against (loaded already, so this only finds it)."""
    path = next((mapped for _, _, mapped in _mappings() if os.path.basename(mapped).startswith("libfuse3.so")),
                "libfuse3.so.3")
    return ctypes.CDLL(path)

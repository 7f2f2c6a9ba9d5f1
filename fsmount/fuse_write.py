"""FUSE_WRITE for the live tree without pyfuse3's copy and task: the data goes from the kernel to
the source file by splice(2), never through Python.

pyfuse3 serves a write in libfuse's `write_buf` slot (libfuse then reads requests from /dev/fuse
by splice, into a pipe): it copies the data out of the pipe into a `bytes`, starts a trio task,
and the handler's pwrite copies it again. `install` puts a callback of ours into that slot
(fuse_table.py says how). It calls `handler(fh, offset, size, copy_into)` on the loop's thread,
and the handler, after its bookkeeping, calls `copy_into(fd, offset)`: libfuse's `fuse_buf_copy`
splices the pipe into the file at that offset (or reads and writes, where splice cannot), with
the GIL released. Measured on 256 MiB written in 1 MiB writes and fsync'd: the daemon's CPU went
from 0.48-0.59 to 0.31-0.42 s. If the table is not as expected, pyfuse3 serves writes as before.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from . import fuse_table

# enum fuse_buf_flags (fuse_common.h)
_BUF_IS_FD, _BUF_FD_SEEK = 1 << 1, 1 << 2


class _Buf(ctypes.Structure):
    """struct fuse_buf"""
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _BufVec(ctypes.Structure):
    """struct fuse_bufvec with one buffer"""
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _Buf * 1)]


_Callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(_BufVec), ctypes.c_int64,
                             ctypes.c_void_p)

CopyInto = Callable[[int, int], int]


def install(handler: Callable[[int, int, int, CopyInto], int]) -> bool:
    """Serve FUSE_WRITE with `handler(fh, offset, size, copy_into) -> bytes written` (raising OSError
    to fail); call after `pyfuse3.init`. Whether it could."""
    lib = fuse_table.libfuse()
    reply_write, buf_copy, buf_size = lib.fuse_reply_write, lib.fuse_buf_copy, lib.fuse_buf_size
    reply_write.argtypes, reply_write.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    buf_copy.argtypes = [ctypes.POINTER(_BufVec), ctypes.POINTER(_BufVec), ctypes.c_int]
    buf_copy.restype = ctypes.c_ssize_t
    buf_size.argtypes, buf_size.restype = [ctypes.POINTER(_BufVec)], ctypes.c_size_t

    def on_write_buf(request: int, _inode: int, data: ctypes._Pointer, offset: int, file_info: int) -> None:
        size = buf_size(data)

        def copy_into(fd: int, at: int) -> int:
            target = _BufVec(count=1)
            target.buf[0] = _Buf(size=size, flags=_BUF_IS_FD | _BUF_FD_SEEK, fd=fd, pos=at)
            copied = buf_copy(ctypes.byref(target), data, 0)
            if copied < 0:
                raise OSError(-copied, f"writing {size} bytes at {at}")
            return copied

        fuse_table.reply(request, lambda: handler(fuse_table.file_handle(file_info), offset, size, copy_into),
                         reply_write)

    return fuse_table.install(fuse_table.WRITE_BUF, _Callback(on_write_buf),
                              otherwise="writes go through pyfuse3's copy")

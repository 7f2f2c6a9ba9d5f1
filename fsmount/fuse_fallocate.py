"""fallocate(2) for the live tree, which pyfuse3 does not offer: a handler of ours in libfuse's table.

pyfuse3 gives libfuse no `fallocate`, so the kernel would answer every fallocate(2) on the mount
with EOPNOTSUPP (`posix_fallocate` then falls back to writing zeros; a hole cannot be punched at
all). `install` puts a callback into that slot (fuse_table.py says how) that calls
`handler(fh, mode, offset, length)` and replies with its errno. If the table is not as expected,
fallocate stays unsupported, as it was.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from . import fuse_table

_Callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_void_p)


def install(handler: Callable[[int, int, int, int], None]) -> bool:
    """Serve FUSE_FALLOCATE with `handler` (raising OSError to fail); call after `pyfuse3.init`.
    Whether it could."""
    reply_err = fuse_table.libfuse().fuse_reply_err
    reply_err.argtypes, reply_err.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int

    def on_fallocate(request: int, _inode: int, mode: int, offset: int, length: int, file_info: int) -> None:
        fuse_table.reply(request, lambda: handler(fuse_table.file_handle(file_info), mode, offset, length),
                         lambda request, _: reply_err(request, 0))

    return fuse_table.install(fuse_table.FALLOCATE, _Callback(on_fallocate),
                              otherwise="fallocate(2) on this mount fails with EOPNOTSUPP")

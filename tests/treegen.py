"""Random directory trees with everything that breaks naive backup tools, as hypothesis strategies.

A tree spec is plain data (drawn by hypothesis, so failures shrink to a small tree); `build()` makes
it real: hostile names (non-UTF-8 bytes, newlines, 255-byte names), multi-block and sparse files,
empty files and directories, symlinks, hard links, FIFOs, xattrs, setuid/sticky modes, ns mtimes.
"""

from __future__ import annotations

import os

from hypothesis import strategies as st

HOSTILE_NAMES = [
    b"\xff\xfe not utf-8",
    b"new\nline",
    b"x" * 255,
    b"-rf",
    b" lead and trail ",
    b"\xe2\x98\x83 snowman",
    b"*?[glob]",
    b".hidden",
    b"back\\slash",
    b"tab\there",
]

names = st.one_of(
    st.sampled_from(HOSTILE_NAMES),
    st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")),
)

modes = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o444, 0o000])
mtimes = st.integers(min_value=0, max_value=2**33 * 10**9)  # up to year ~2242, ns precision

file_specs = st.fixed_dictionaries({
    "kind": st.just("file"),
    # sizes around block boundaries (64 KiB blocks in these tests), and empty files
    "size": st.sampled_from([0, 1, 4095, 65535, 65536, 65537, 200_000, 300_000]),
    "sparse": st.booleans(),
    "seed": st.integers(0, 2**16),
    "mode": modes,
    "mtime_ns": mtimes,
    "xattrs": st.dictionaries(st.sampled_from([b"user.a", b"user.b", b"user.long"]), st.binary(max_size=64),
                              max_size=2),
})

leaf_specs = st.one_of(
    file_specs,
    st.fixed_dictionaries({"kind": st.just("symlink"), "target": st.sampled_from(
        [b"missing", b"../up", b"/absolute/elsewhere", b"\xff\xfe", b"x" * 200])}),
    st.fixed_dictionaries({"kind": st.just("fifo"), "mode": st.sampled_from([0o644, 0o600])}),
    st.fixed_dictionaries({"kind": st.just("hardlink")}),
)


def _dirs(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "kind": st.just("dir"),
        "mode": st.sampled_from([0o755, 0o700, 0o1777, 0o2775]),
        "mtime_ns": mtimes,
        "children": st.dictionaries(names, children, max_size=6),
    })


trees = _dirs(st.recursive(leaf_specs, _dirs, max_leaves=25))


def _content(spec: dict) -> bytes:
    import random

    rng = random.Random(spec["seed"])
    return rng.randbytes(spec["size"])


def build(root: bytes, spec: dict) -> None:
    """Create the tree `spec` describes at `root` (which must not exist)."""
    first_file: list[bytes] = []
    dir_times: list[tuple[bytes, dict]] = []
    _build_dir(root, spec, first_file, dir_times)
    for path, dspec in reversed(dir_times):  # children first, so setting a parent's time sticks
        os.chmod(path, dspec["mode"])
        os.utime(path, ns=(dspec["mtime_ns"], dspec["mtime_ns"]))


def _build_dir(path: bytes, spec: dict, first_file: list[bytes], dir_times: list) -> None:
    os.mkdir(path, 0o700)
    dir_times.append((path, spec))
    for name, child in spec["children"].items():
        child_path = os.path.join(path, name)
        kind = child["kind"]
        if kind == "dir":
            _build_dir(child_path, child, first_file, dir_times)
        elif kind == "file":
            with open(child_path, "wb") as f:
                data = _content(child)
                if child["sparse"] and len(data) > 2 * 65536:
                    f.write(data[:1000])
                    f.seek(len(data) - 1000)  # a hole of whole blocks in the middle
                    f.write(data[-1000:])
                else:
                    f.write(data)
            for key, value in child["xattrs"].items():
                os.setxattr(child_path, key, value)
            os.chmod(child_path, child["mode"])
            os.utime(child_path, ns=(child["mtime_ns"], child["mtime_ns"]))
            first_file.append(child_path)
        elif kind == "symlink":
            os.symlink(child["target"], child_path)
        elif kind == "fifo":
            os.mkfifo(child_path, child["mode"])
        elif kind == "hardlink":
            if first_file:
                os.link(first_file[0], child_path)
            else:
                with open(child_path, "wb") as f:
                    f.write(b"no file to link to yet")
                first_file.append(child_path)

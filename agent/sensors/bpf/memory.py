"""Give back the memory that compiling a sensor took (issue 10, point 4).

BCC compiles each sensor inside the agent, with the LLVM and clang that libbcc links: the
agent grows from ~30 MB to ~175 MB resident at its start (measured: docs/performance.md,
"Memory"), and none of that compiler is needed once the program is loaded; the ring buffer
and map calls BCC keeps using are a few pages of libbcc. Two steps give most of it back:

- ``malloc_trim(0)``: the heap the compiler freed goes back to the kernel;
- ``madvise(MADV_PAGEOUT)`` over the compiler libraries' read-only file mappings (their
  code and constants): the pages the compile touched leave this process. They are clean
  pages of a file, so nothing is lost: a page needed again is read back from the library.
  Writable mappings (a library's data) are never touched.

What stays is the heap of the module BCC keeps for its table API. A loader process that
exits after the load would give that back too (issue 10 keeps it open).
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import List, Tuple

COMPILER_LIBS = ("libbcc", "libLLVM", "libclang")  # Debian links bcc against both
MADV_PAGEOUT = 21  # Linux 5.4+; EINVAL before: nothing paged out
MAPS = "/proc/self/maps"


@dataclass(frozen=True)
class Released:
    """What one release did: the mappings paged out, and why it stopped short, if it did."""

    mappings: int
    trimmed: bool
    error: str = ""


def compiler_mappings(maps_text: str) -> List[Tuple[int, int]]:
    """(start, end) of every read-only mapping of a compiler library in a maps listing."""
    out = []
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "w" in parts[1]:
            continue
        name = parts[5].rsplit("/", 1)[-1]
        if name.startswith(COMPILER_LIBS):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def release_compiler_memory() -> Released:
    """After a sensor is loaded: trim the heap, page the compiler's code out. Never raises:
    what it cannot do costs memory, not correctness."""
    libc = ctypes.CDLL(None, use_errno=True)
    trimmed = bool(getattr(libc, "malloc_trim", None)) and libc.malloc_trim(0) >= 0
    try:
        with open(MAPS, encoding="ascii", errors="replace") as fh:
            ranges = compiler_mappings(fh.read())
    except OSError as exc:
        return Released(0, trimmed, f"{MAPS}: {exc.strerror or exc}")
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for start, end in ranges:
        if libc.madvise(ctypes.c_void_p(start), end - start, MADV_PAGEOUT) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL and done == 0:  # a kernel before 5.4
                return Released(0, trimmed, "madvise(MADV_PAGEOUT) is not supported")
            continue  # a mapping gone meanwhile
        done += 1
    return Released(done, trimmed)

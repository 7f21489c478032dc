"""Process-wide allocator settings that keep XLA:CPU's temporaries on reused pages.

Why.  XLA:CPU allocates a program's temporaries with ``malloc`` on every call.
glibc serves any allocation above its mmap threshold (at most 32 MiB by
default) with fresh pages from the kernel and returns them on ``free``, so every
call of a program with larger temporaries pays one page fault per 4 KiB page
touched: an HMM DENNL training step of 256 users (42 MiB of temporaries) ran
113 ms instead of 74 ms on one core, and a vmapped em_step over 2000 users
without blocks a third slower (BUILD_NOTES "Memory: `keep_freed_memory`" and
"Users-minor batched kernels").  Raising the
threshold and keeping freed memory in the heap makes those calls reuse their
pages.  Results do not change; the process keeps its peak memory until it ends.

:func:`keep_freed_memory` applies the settings to the running process (glibc's
``mallopt``; it works in a notebook, where the environment is fixed before
Python starts); :func:`malloc_environment` gives them as the ``MALLOC_*_``
variables glibc reads when a *new* process starts (for worker processes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc mallopt parameters (malloc.h) and the values: allocations up to
# ~2 GB come from the heap, freed memory is trimmed only above ~2 GB, and the
# heap grows in 200 MB steps.  mallopt takes a C int, hence INT_MAX for the trim.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {"MMAP_THRESHOLD": 2_000_000_000, "TRIM_THRESHOLD": 2_147_483_647,
            "TOP_PAD": 200_000_000}
_MALLOPT = {"MMAP_THRESHOLD": _M_MMAP_THRESHOLD, "TRIM_THRESHOLD": _M_TRIM_THRESHOLD,
            "TOP_PAD": _M_TOP_PAD}


def _glibc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  name = ctypes.util.find_library("c")
  return ctypes.CDLL(name) if name else None


def keep_freed_memory() -> bool:
  """Set :data:`SETTINGS` in this process's glibc malloc; returns whether it applied.

  A no-op returning False where the C library is not glibc (macOS, musl).
  Process-wide: every later allocation of any library is affected, and freed
  memory stays with the process.  Call it once, early (e.g. the first cell of a
  notebook); the experiment binaries call it at start.
  """
  libc = _glibc()
  if libc is None:
    return False
  return all(libc.mallopt(_MALLOPT[name], ctypes.c_int(value)) == 1
             for name, value in SETTINGS.items())


def malloc_environment() -> dict[str, str]:
  """:data:`SETTINGS` as the environment variables glibc reads when a process starts
  (``MALLOC_MMAP_THRESHOLD_`` ...): add them to a child process's environment."""
  return {f"MALLOC_{name}_": str(value) for name, value in SETTINGS.items()}

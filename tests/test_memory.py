"""dennl_jax.memory: glibc malloc settings that keep large temporaries on reused pages."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from dennl_jax import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, touches and frees 64 MiB (above glibc's default mmap threshold)
# five times and prints the minor page faults of the last four.
_FAULTS = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys
    from dennl_jax import memory
    if sys.argv[1] == "keep":
      assert memory.keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    def cycle():
      p = libc.malloc(ctypes.c_size_t(size))
      ctypes.memset(p, 1, size)
      libc.free(ctypes.c_void_p(p))
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode, extra_env=()):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env.update(extra_env)
  out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True,
                       text=True, check=True).stdout
  return int(out.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
  pages = (64 << 20) // 4096  # one fault per 4 KiB page touched, per cycle
  assert _faults("default") > 2 * pages      # fresh pages on every cycle
  assert _faults("keep") < pages // 10        # the heap's pages, reused
  # The same settings as environment variables, as a worker process inherits them.
  assert _faults("default", memory.malloc_environment()) < pages // 10


def test_environment_names_every_setting():
  env = memory.malloc_environment()
  assert set(env) == {f"MALLOC_{name}_" for name in memory.SETTINGS}
  assert all(int(value) > 32 << 20 for value in env.values())


def test_a_no_op_off_glibc(monkeypatch):
  monkeypatch.setattr(memory, "_glibc", lambda: None)
  assert memory.keep_freed_memory() is False

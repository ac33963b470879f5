"""glibc malloc settings that keep XLA:CPU's step buffers in the process.

Why: XLA:CPU allocates an executable's buffers with ``malloc`` at every
execution, on its worker threads, and frees them after. glibc serves an
allocation above its mmap threshold (32 MB at most), or one too large for a
worker thread's own arena heap (64 MB), with a fresh ``mmap`` and returns it
with ``munmap`` when freed. A train step then maps, zero-fills and unmaps the
same buffers again at every step: the FER2013 recipe's custom CNN step (48
px, batch 64, two CPU devices) took 59,000 minor page faults per step (about
230 MB) and 85 ms of kernel time of its 500 ms of CPU time, on the 2-core
Intel Xeon VM; ``/usr/bin/time`` of the 30-minute run counted 380 million
faults and 544 s of system time (docs/BENCHMARKS.md, "Page faults").

``configure()`` calls ``mallopt`` so that every thread allocates from the
main arena (``M_ARENA_MAX`` = 1), large blocks come from its heap instead of
``mmap`` (``M_MMAP_MAX`` = 0), and freed memory stays in the process
(``M_TRIM_THRESHOLD`` = -1: never trimmed): after the first steps (about
ten) the buffers are reused and the step takes no page faults. The cost is resident memory: the process
keeps its heap at its peak, fragmentation included (EfficientNet-B3, 112
px, batch 32, one device: 9.8 GB peak RSS instead of 6.0 GB, and 1.2 s of
kernel time per step saved; the custom CNN's step is not changed in size).
Measured on the Intel VM, interleaved: the custom CNN step (48 px) 264 ->
289 images/s on one device, 243 -> 261 on the trainer's two.

It must run before XLA's threads (or any other thread that might claim an
arena of its own) first allocate, so ``import affectjax`` runs it: every
entry point, test and benchmark imports the package before jax starts its
backend. To keep glibc's defaults, set ``AFFECTJAX_MALLOC=default``; a
``GLIBC_TUNABLES`` that sets any ``glibc.malloc.`` tunable is the user's
choice and is left alone too. Without glibc (macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# (parameter, value); mallopt(3): a trim threshold of -1 disables trimming.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
OPT_OUT = "AFFECTJAX_MALLOC"  # =default keeps glibc's own settings.


def configure() -> bool:
  """Applies the settings to this process by ``mallopt``; returns whether
  it did (not under ``AFFECTJAX_MALLOC=default``, a ``GLIBC_TUNABLES``
  malloc setting, or a libc other than glibc)."""
  if (os.environ.get(OPT_OUT, "") == "default"
      or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
      or platform.libc_ver()[0] != "glibc"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(param, value) == 1 for param, value in SETTINGS)

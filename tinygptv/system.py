"""The machine: what it is (for the reports that benchmarks and recipes write next to their numbers), and handing
freed memory back to it."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def release_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps the many mid-size blocks freed while layers are read,
    quantized and packed one by one (measured on the full-size int8 model: ~1.2 GB of RSS that the model no
    longer uses), and those of a request's activations; ``malloc_trim`` hands them back. A no-op where glibc is
    not the allocator."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None

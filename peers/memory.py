"""Giving freed memory back to the operating system, and reading the process's peak use."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (e.g. musl): nothing to trim
        return None


_LIBC = _load_libc()


def release_free_memory() -> None:
    """Return free heap pages to the OS.

    glibc raises its mmap threshold after big blocks are freed, so later KV-cache buffers come from the
    heap, and freeing them would not lower the peer's resident memory without a trim.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM). Not ru_maxrss: Linux carries the parent's peak into
    a child across fork + exec, so a child of a big parent would report the parent's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")

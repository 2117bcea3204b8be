"""Process-wide runtime settings for the project's entry points (imported before torch)."""

from __future__ import annotations

import logging
import os
import sys

# Libraries' own messages a user sees only from this level up (all of them with --verbose). bitsandbytes warns at
# import, on CPUs with AVX512-BF16, that an optional kernel package (fetched from the Hub) is missing: noise here.
LIBRARY_LOG_LEVELS = {"hivemind": logging.WARNING, "transformers": logging.WARNING, "urllib3": logging.WARNING,
                      "filelock": logging.WARNING, "bitsandbytes": logging.ERROR}


def quiet_libraries(verbose: bool) -> None:
    for name, level in LIBRARY_LOG_LEVELS.items():
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else level)


def prefer_passive_openmp() -> bool:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    In a pipeline the client and each peer compute in turn on shared cores; spinning threads of the
    process that just finished steal the cores of the one that starts (measured on 2 cores: decode
    through 3 local peers went from 0.79x to 0.91x of a single process). Must run before torch loads.
    Returns True if it changed the setting.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True

"""Third-party noise kept off our stderr: C libraries (libjpeg, libpng) that print straight to file
descriptor 2, past any Python-level setting, where we report in one line of our own."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stderr_muted() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside the block. Keep the block short: other threads' stderr is muted
    too while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

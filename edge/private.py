"""Files and folders that hold faces, names or events are private whatever the umask: folders 0700, files 0600."""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create `path` and its missing parents as 0700; folders that already exist are left as they are."""
    for folder in reversed([path, *path.parents]):
        if not folder.is_dir():
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(folder, DIR_MODE)


def open_private(path: Path | str, mode: str, **options) -> IO:
    """open() for writing ("w", "a", "wb", "ab") that creates the file 0600, and makes an existing one 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return open(fd, mode, **options)
    except BaseException:
        os.close(fd)
        raise

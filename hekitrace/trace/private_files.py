"""Creating the files and directories hekitrace writes, owner-only from the first byte.

Traces, journal segments, checkpoints and the alert file may name VMs, pids and memory
layouts; they are created with their mode given to open(2) and mkdir(2) themselves, so no
umask leaves a window in which others could read them.
"""

from __future__ import annotations

import os
from typing import Any

#: Files hekitrace writes (traces, journal segments, checkpoints, the alert file) are
#: created owner-only, in directories it creates owner-only, unless the config says
#: otherwise (journal.file_mode, journal.directory_mode, alerts.file_mode).
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIRECTORY_MODE = 0o700


def open_private(path: str, *, append: bool = False, mode: int = PRIVATE_FILE_MODE,
                 text: bool = False) -> Any:
    """Open ``path`` for writing (truncating, or appending), creating it with ``mode``
    (no window at the umask's default: the mode is given to open(2) itself)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        if text:
            return os.fdopen(fd, "a" if append else "w", encoding="utf-8")
        return os.fdopen(fd, "ab" if append else "wb")
    except BaseException:
        os.close(fd)
        raise


def make_directories(path: str, mode: int = PRIVATE_DIRECTORY_MODE) -> None:
    """``mkdir -p`` where every directory created (not only the last, unlike
    ``os.makedirs``) gets ``mode``; existing ones are left as they are."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        os.chmod(directory, mode)  # the umask may have taken bits the config asked for

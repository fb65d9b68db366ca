"""One training process per run folder: an exclusive ``flock`` on ``<run>/.lock``.

Two runs writing one folder prune each other's checkpoints and interleave their logs. The lock is
held from before the data loads to the end of training; the kernel drops it when its process
exits, crash or ``SIGKILL`` included, so a stale ``.lock`` file never blocks a later run. The file
names its holder (pid, host, start time) for the error a second process gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderLockedError(ValueError):
    """Another process trains in the run folder."""


class RunLock:
    """The lock of one run folder, taken by ``acquire`` and given back by ``release``."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises ``RunFolderLockedError`` naming the process that holds it."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderLockedError(
                    f"{self.path.parent} is in use by {self.holder()}: one run folder takes one "
                    "training process. Wait for that run to end (or stop it), or train into "
                    "another train.output_dir"
                ) from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # the holder removed the file between our open and flock: lock the new one
                os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(self._fd, 0)
        os.write(self._fd, (json.dumps(holder) + "\n").encode())

    def holder(self) -> str:
        """``pid 123 on host h since 2025-01-01 12:00:00``, from the lock file."""
        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
            return f"pid {info['pid']} on host {info['host']} since {since}"
        except (OSError, ValueError, KeyError, TypeError):  # it is still writing its details
            return "another process"

    def release(self) -> None:
        """Removes the lock file and unlocks (in that order, so no one locks a removed file)."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)
        # Unlock explicitly: forked data-loader workers share the descriptor and would keep it.
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        """A trainer dropped without finishing ``train()`` frees its folder."""
        if self._fd is not None:
            self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

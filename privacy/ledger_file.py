"""The ledger file itself: locking, reading its lines, appending one durable line.

Kept apart from :mod:`privacy.ledger` (what may be written) so the file discipline is in one place:
writers hold an exclusive ``fcntl.flock`` on ``<ledger>.lock``, readers a shared one; each entry is one
full line written to an ``O_APPEND`` descriptor and ``fsync``-ed (and its folder, when the file is new).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from privacy.ledger_checks import LedgerError

__all__ = ["append_line", "locked", "read_lines"]


@contextlib.contextmanager
def locked(path: Path, lock_path: Path, mode: int) -> Iterator[None]:
    """Hold ``flock(mode)`` (``fcntl.LOCK_SH`` or ``LOCK_EX``) on ``lock_path`` for the ledger ``path``."""
    if not path.parent.is_dir():
        raise LedgerError(
            path,
            None,
            "the ledger's folder does not exist. Fix: create it or correct the ledger path "
            "(starting a new, empty ledger would reset the site's privacy budget)",
        )
    if path.is_dir():
        raise LedgerError(path, None, "is a folder, not a ledger file. Fix: restore the ledger file")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LedgerError(lock_path, None, f"cannot open the ledger lock ({exc.strerror})") from None
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` pairs; entry ``i`` is expected on line ``i + 1``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LedgerError(path, None, f"cannot read the ledger ({exc.strerror})") from None
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise LedgerError(
            path,
            None,
            f"is not a text ledger (byte {exc.start} is not UTF-8). Fix: restore it from backup",
        ) from None
    if lines[-1] == "":
        lines.pop()
    return list(enumerate(lines, start=1))


def append_line(path: Path, line: str) -> None:
    """Append one ASCII line and make it durable (``fsync`` of the file, and of the folder if new)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview((line + "\n").encode("ascii"))
        while view:  # one call normally writes it all; loop in case of a short write
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # make the new file's directory entry durable too
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

"""File helpers: crash-safe writes (a reader sees the old file or the new one) and file digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary sibling and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` (newlines kept as given) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def hash_file_into(digest: Any, path: Path) -> None:
    """Feed a file's bytes into a ``hashlib`` digest in 1 MiB chunks."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()

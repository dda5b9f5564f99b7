"""Composed PRV prefixes kept on disk, so a fresh process resumes where an earlier one stopped.

:mod:`privacy.accounting_prv` keeps the composed PRV of a ledger's history prefixes in memory; a
site that starts a fresh process per message (no ``fedtune site serve`` worker), or a restarted
worker, would recompose its whole ledger. :func:`use_persistent_cache` points this store at a
folder (the site agent's ``state_dir / "accounting-cache"``), and the newest composed prefixes are
written there.

A performance artefact, never a source of truth: each file is named by the SHA-256 of its key (the
exact history prefix as float hex, the domain, ``eps_error``/``delta_error``, the domain's
description, Opacus's, NumPy's and SciPy's versions and :data:`FORMAT`) and carries that key and a
SHA-256 over the key and its arrays. A file whose key or digest does not match, or that cannot be
read (truncated, garbage, wrong shape), is ignored and the prefix recomposed: the result is the
one the in-memory path gives, bit for bit (the float64 PMF and the domain's fields are stored
exactly). Files are ``np.savez`` archives, read with ``allow_pickle=False``, written atomically;
the folder keeps the most recently used files up to :data:`STORE_BYTES`. Nothing here raises.
The auditor (:mod:`privacy.audit`) never reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import opacus
import scipy
from opacus.accountants.analysis.prv import DiscretePRV, Domain

from common.fsutil import atomic_write_bytes

__all__ = ["FORMAT", "STORE_BYTES", "Store", "load", "save", "store", "use_persistent_cache"]

log = logging.getLogger(__name__)
FORMAT = "fedtune-prv-prefix-1"
STORE_BYTES = 64 * 2**20  # the folder's bound: the newest composed prefixes that fit
Where = tuple[float, float, int]
Prefix = Sequence[tuple[float, float, int]]


class Store:
    """One folder of composed prefixes (see the module docstring)."""

    def __init__(self, folder: Path, limit: int = STORE_BYTES) -> None:
        self.folder = Path(folder)
        self.limit = limit
        self.saved: set[str] = set()  # names written or read by this process (not rewritten)

    @staticmethod
    def key(where: Where, prefix: Prefix, eps_error: float, delta_error: float, domain: str) -> bytes:
        """The exact key of a composed prefix, as canonical JSON bytes."""
        fields = {
            "format": FORMAT,
            "versions": [opacus.__version__, np.__version__, scipy.__version__],
            "domain": domain,
            "where": [float(where[0]).hex(), float(where[1]).hex(), int(where[2])],
            "errors": [float(eps_error).hex(), float(delta_error).hex()],
            "prefix": [[float(s).hex(), float(q).hex(), int(n)] for s, q, n in prefix],
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def path(self, key: bytes) -> Path:
        return self.folder / f"{hashlib.sha256(key).hexdigest()[:40]}.npz"


def _digest(key: bytes, pmf: np.ndarray, domain: np.ndarray) -> str:
    h = hashlib.sha256(key)
    for array in (pmf, domain):
        h.update(str(array.dtype).encode() + str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def load(st: Store, key: bytes, where: Where) -> DiscretePRV | None:
    """The stored composed prefix of ``key``, or None (missing, mismatched or unreadable)."""
    path = st.path(key)
    try:
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as npz:
            stored_key = bytes(npz["key"].tobytes())
            pmf, domain, digest = npz["pmf"], npz["domain"], str(npz["digest"][()])
        ok = (
            stored_key == key
            and pmf.dtype == np.float64
            and pmf.ndim == 1
            and domain.dtype == np.float64
            and domain.shape == (4,)
            and domain[2] == where[2] == pmf.size  # the domain itself is shifted: its size is not
            and digest == _digest(key, pmf, domain)
        )
        if not ok:
            log.debug("accounting cache %s does not match its key: ignored", path.name)
            return None
        st.saved.add(path.name)
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruned last
        t_min, t_max, size, shifts = (float(x) for x in domain)
        return DiscretePRV(pmf=pmf, domain=Domain(t_min, t_max, int(size), shifts))
    except Exception as exc:  # a performance artefact: any failure means "recompute"
        log.debug("accounting cache %s unreadable (%s): ignored", path.name, exc)
        return None


def save(st: Store, key: bytes, state: DiscretePRV) -> None:
    """Write ``state`` under ``key`` (once per process), then prune the folder to its bound."""
    path = st.path(key)
    if path.name in st.saved:
        return
    st.saved.add(path.name)
    try:
        pmf = np.ascontiguousarray(state.pmf, dtype=np.float64)
        d = state.domain
        domain = np.array([d.t_min, d.t_max, d.size, d.shifts], dtype=np.float64)
        if pmf.nbytes > st.limit:
            return
        buf = io.BytesIO()
        key_array = np.frombuffer(key, dtype=np.uint8)
        np.savez(buf, key=key_array, pmf=pmf, domain=domain, digest=np.array(_digest(key, pmf, domain)))
        atomic_write_bytes(path, buf.getvalue())
        _prune(st)
    except Exception as exc:  # never fail accounting for its cache
        log.warning("accounting cache: cannot write %s (%s)", path, exc)


def _prune(st: Store) -> None:
    """Delete the least recently used files beyond the folder's bound."""
    files = []
    for p in st.folder.glob("*.npz"):
        try:
            s = p.stat()
            files.append((s.st_mtime_ns, s.st_size, p))
        except OSError:
            continue
    total = 0
    for _, size, p in sorted(files, key=lambda f: f[0], reverse=True):
        total += size
        if total > st.limit:
            p.unlink(missing_ok=True)
            st.saved.discard(p.name)


_store: Store | None = None


def use_persistent_cache(folder: Path | None, limit: int = STORE_BYTES) -> None:
    """Keep composed prefixes in ``folder`` (created on first write); None: memory only."""
    global _store
    _store = None if folder is None else Store(folder, limit)


def store() -> Store | None:
    """The store in use, if any."""
    return _store

"""Tests for privacy.accounting_store: composed prefixes on disk start a fresh process warm."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import privacy.accounting_prv as prv
from privacy import accounting, accounting_store
from privacy.accounting import PRV_EPS_ERROR, MechanismStep, epsilon
from privacy.accounting_store import use_persistent_cache

DELTA = 1e-5
LEDGER = [(1.0, 0.01, 70)] + [(1.1 + 0.1 * i, 0.01, 5) for i in range(4)]  # one domain: 70..90 steps


def _fresh(folder: Path | None, limit: int = accounting_store.STORE_BYTES) -> None:
    """A fresh process: nothing in memory; the store (if any) at ``folder``."""
    prv.clear_caches()
    accounting._epsilon_cached.cache_clear()
    use_persistent_cache(folder, limit)


@pytest.fixture(autouse=True)
def _memory_only() -> Iterator[None]:
    _fresh(None)
    yield
    _fresh(None)


def _eps(history: list[tuple[float, float, int]]) -> float:
    return epsilon([MechanismStep(*e) for e in history], delta=DELTA)


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> dict[str, int]:
    calls = {"n": 0}
    original: Callable[..., Any] = getattr(prv, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(prv, name, wrapper)
    return calls


def _scratch(history: list[tuple[float, float, int]]) -> float:
    _fresh(None)
    return _eps(history)


def _grown(folder: Path, limit: int = accounting_store.STORE_BYTES) -> list[float]:
    """An earlier process: the ledger grows one mechanism at a time with the store at ``folder``."""
    _fresh(folder, limit)
    return [_eps(LEDGER[: k + 1]) for k in range(len(LEDGER))]


def test_a_fresh_process_resumes_from_disk_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = [_scratch(LEDGER[: k + 1]) for k in range(len(LEDGER))]  # the in-memory path, no store
    current = [*LEDGER[:-1], (LEDGER[-1][0], 0.01, 15)]  # the current run's next round
    expected_current = _scratch(current)
    assert _grown(tmp_path / "cache") == memory
    _fresh(tmp_path / "cache")
    discretised = _counting(monkeypatch, "discretize")
    powers = _counting(monkeypatch, "_compose_fourier")
    assert _eps(LEDGER) == memory[-1]  # bit for bit
    assert (discretised["n"], powers["n"]) == (1, 1)  # only the last mechanism: the rest came from disk
    _fresh(tmp_path / "cache")
    assert _eps(current) == expected_current
    assert (discretised["n"], powers["n"]) == (2, 2)


def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00not an npz" * 100)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if how == "tampered":  # a valid archive whose PMF no longer matches its digest
            arrays["pmf"] = arrays["pmf"].copy()
            arrays["pmf"][arrays["pmf"].argmax()] *= 0.5
        elif how == "other-key":  # a consistent entry of another prefix, under this name
            key = bytes(arrays["key"].tobytes()).replace(b'"format"', b'"formaT"')
            arrays["key"] = np.frombuffer(key, dtype=np.uint8)
        elif how == "pickled":  # an object array: refused by allow_pickle=False
            arrays["pmf"] = np.array([object()], dtype=object)
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "tampered", "other-key", "pickled"])
def test_a_broken_cache_file_is_ignored_and_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    expected = _scratch(LEDGER)
    folder = tmp_path / "cache"
    _grown(folder)
    for path in folder.glob("*.npz"):
        _break(path, how)
    _fresh(folder)
    discretised = _counting(monkeypatch, "discretize")
    assert _eps(LEDGER) == expected
    assert discretised["n"] == len(LEDGER)  # nothing was read from the broken files
    _fresh(folder)  # ... and the prefix was written again: the next fresh process resumes from it
    assert _eps(LEDGER) == expected
    assert discretised["n"] == len(LEDGER) + 1


def test_an_unwritable_folder_never_fails_accounting(tmp_path: Path) -> None:
    (blocked := tmp_path / "file").write_text("not a folder", encoding="utf-8")
    expected = _scratch(LEDGER[:2])
    _fresh(blocked / "cache")
    assert _eps(LEDGER[:2]) == expected


def test_the_folder_stays_within_its_bound(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    _grown(folder)
    sizes = [p.stat().st_size for p in folder.glob("*.npz")]
    assert len(sizes) == len(LEDGER) - 1  # one prefix per call (the ledger before its newest mechanism)
    limit = 2 * max(sizes) + 1
    _grown(tmp_path / "bounded", limit)
    kept = sorted(tmp_path.joinpath("bounded").glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)
    assert 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= limit
    d = prv.prv_domain(LEDGER, PRV_EPS_ERROR, DELTA / 1000)
    store = accounting_store.Store(tmp_path / "bounded")
    newest = store.key((d.t_min, d.t_max, d.size), LEDGER[:-1], PRV_EPS_ERROR, DELTA / 1000, prv.PRV_DOMAIN)
    assert kept[-1] == store.path(newest)  # the newest prefix is kept
    _grown(tmp_path / "tiny", limit=1000)  # an entry larger than the bound is not written at all
    assert not list(tmp_path.joinpath("tiny").glob("*.npz"))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no temporary files left

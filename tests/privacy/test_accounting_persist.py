"""Tests for privacy.accounting_store: composed prefixes on disk start a fresh process warm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import privacy.accounting_prv as prv
from privacy import accounting_store
from privacy.accounting import PRV_EPS_ERROR, MechanismStep, epsilon
from tests.privacy.accounting_helpers import counting, fresh_process

DELTA = 1e-5
LEDGER = [(1.0, 0.01, 70)] + [(1.1 + 0.1 * i, 0.01, 5) for i in range(4)]  # one domain: 70..90 steps


@pytest.fixture(autouse=True)
def _memory_only() -> Iterator[None]:
    fresh_process(None)
    yield
    fresh_process(None)


def _eps(history: list[tuple[float, float, int]]) -> float:
    return epsilon([MechanismStep(*e) for e in history], delta=DELTA)


def _scratch(history: list[tuple[float, float, int]]) -> float:
    fresh_process(None)
    return _eps(history)


def _grown(folder: Path, limit: int = accounting_store.STORE_BYTES) -> list[float]:
    """An earlier process: the ledger grows one mechanism at a time with the store at ``folder``."""
    fresh_process(folder, limit)
    return [_eps(LEDGER[: k + 1]) for k in range(len(LEDGER))]


def test_a_fresh_process_resumes_from_disk_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = [_scratch(LEDGER[: k + 1]) for k in range(len(LEDGER))]  # the in-memory path, no store
    current = [*LEDGER[:-1], (LEDGER[-1][0], 0.01, 15)]  # the current run's next round
    expected_current = _scratch(current)
    assert _grown(tmp_path / "cache") == memory
    fresh_process(tmp_path / "cache")
    discretised = counting(monkeypatch, "discretize")
    powers = counting(monkeypatch, "_compose_fourier")
    assert _eps(LEDGER) == memory[-1]  # bit for bit
    assert (discretised["n"], powers["n"]) == (1, 1)  # only the last mechanism: the rest came from disk
    fresh_process(tmp_path / "cache")
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
    fresh_process(folder)
    discretised = counting(monkeypatch, "discretize")
    assert _eps(LEDGER) == expected
    assert discretised["n"] == len(LEDGER)  # nothing was read from the broken files
    fresh_process(folder)  # ... and the prefix was written again: the next fresh process resumes from it
    assert _eps(LEDGER) == expected
    assert discretised["n"] == len(LEDGER) + 1


def test_an_unwritable_folder_never_fails_accounting(tmp_path: Path) -> None:
    (blocked := tmp_path / "file").write_text("not a folder", encoding="utf-8")
    expected = _scratch(LEDGER[:2])
    fresh_process(blocked / "cache")
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

"""What the accounting-cache tests share: a fresh process's caches, and call counters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import privacy.accounting_prv as prv
from privacy import accounting, accounting_store
from privacy.accounting_store import use_persistent_cache


def fresh_process(folder: Path | None = None, limit: int = accounting_store.STORE_BYTES) -> None:
    """As in a fresh process: nothing cached in memory; the persisted store (if any) at ``folder``."""
    prv.clear_caches()
    accounting._epsilon_cached.cache_clear()
    use_persistent_cache(folder, limit)


def counting(monkeypatch: pytest.MonkeyPatch, name: str, module: Any = prv) -> dict[str, int]:
    """Count calls into an expensive function (by default one of Opacus's, as accounting_prv uses it)."""
    calls = {"n": 0}
    original: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls

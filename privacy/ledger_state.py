"""Queries over a verified ledger's entries: what the budget gate, the site and the report ask.

Pure functions of the entries (no file, no lock): :class:`privacy.ledger.PrivacyLedger` hands out a
:class:`LedgerState` only after the whole file passed :func:`privacy.ledger_checks.walk`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from privacy.accounting import MechanismStep, epsilon
from privacy.ledger_entries import Abort, Commit, Entry, Release, Reserve

__all__ = ["LedgerState"]


class LedgerState:
    """Queries over a verified ledger's entries (what the budget gate and the site ask)."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries: tuple[Entry, ...] = tuple(entries)

    @property
    def head(self) -> tuple[int, str] | None:
        """``(seq, hash)`` of the last entry, ``None`` for an empty ledger."""
        return (self.entries[-1].seq, self.entries[-1].hash) if self.entries else None

    def reserves(self, run_id: str | None = None) -> list[Reserve]:
        """Every DP reservation (of one run, if given), committed or not: all of them count."""
        return [e for e in self.entries if isinstance(e, Reserve) and run_id in (None, e.run_id)]

    def history(self, run_id: str | None = None) -> list[MechanismStep]:
        """The mechanisms of those reservations, for the accountant."""
        return [MechanismStep(r.noise_multiplier, r.sample_rate, r.steps) for r in self.reserves(run_id)]

    @property
    def release(self) -> Release | None:
        """The first round trained without DP, if any: from then on epsilon is unbounded."""
        return next((e for e in self.entries if isinstance(e, Release)), None)

    @property
    def delta(self) -> float | None:
        """The delta of the ledger's reservations (all share the first one's)."""
        reserves = self.reserves()
        return reserves[0].delta if reserves else None

    def epsilon(self, *, delta: float, accountant: str = "prv", run_id: str | None = None) -> float:
        """Cumulative epsilon (of one run, if given); ``inf`` once records were released without DP."""
        if self.release is not None and (run_id is None or run_id == self.release.run_id):
            return math.inf
        return epsilon(self.history(run_id), delta=delta, accountant=accountant)

    def highest_round(self, run_id: str) -> int | None:
        """The highest round of ``run_id`` that was reserved (DP or not)."""
        rounds = [e.round for e in self.entries if isinstance(e, Reserve | Release) and e.run_id == run_id]
        return max(rounds, default=None)

    def attempts(self, run_id: str, rnd: int) -> int:
        """How often round ``rnd`` of ``run_id`` was reserved (a crashed round may be retried)."""
        return sum(
            isinstance(e, Reserve | Release) and (e.run_id, e.round) == (run_id, rnd) for e in self.entries
        )

    def committed(self, run_id: str, rnd: int) -> bool:
        """Whether round ``rnd`` of ``run_id`` was trained and sent."""
        return any(isinstance(e, Commit) and (e.run_id, e.round) == (run_id, rnd) for e in self.entries)

    def open(self, seq: int) -> Reserve | Release | None:
        """The reservation ``seq`` if it may still be committed (not closed, not superseded by a retry)."""
        target = next((e for e in self.entries if e.seq == seq and isinstance(e, Reserve | Release)), None)
        if target is None:
            return None
        for e in self.entries[seq + 1 :]:
            closes = isinstance(e, Commit | Abort) and e.reserve_seq == seq
            retried = isinstance(e, Reserve | Release) and (e.run_id, e.round) == (
                target.run_id,
                target.round,
            )
            if closes or retried:
                return None
        return target

    def reused_noise(self, run_id: str, sample_rate: float, steps: int) -> float | None:
        """The noise a run already calibrated for this sample rate and step count (rounds share it)."""
        for r in reversed(self.reserves(run_id)):
            if r.sample_rate == sample_rate and r.steps == steps:
                return r.noise_multiplier
        return None

"""The one checker of ledger lines: the site runs it before every write, the auditor runs it offline.

:func:`walk` parses every line into a typed entry (:mod:`privacy.ledger_entries`) and reports each
problem as a :class:`Finding` naming the file, line, entry and check:

``format``     not a JSON object, unknown kind, a field missing or of the wrong type
``chain``      ``seq`` out of order, ``prev_hash`` not the previous entry's ``hash``, ``hash`` wrong
``signature``  missing or invalid (when a verifier is given)
``order``      a round reserved after a later round of the same run, or again after it was committed
``commit``     a commit or abort of no open reservation, of one already closed or superseded by a
               retry, or of another run / round
``delta``      a reservation at another delta than the ledger's first
``time``       (warning) a timestamp before the previous entry's

:func:`check_head` compares a ledger with its head record (``privacy.ledger_head``): a ledger that ends
before the entry its head names was truncated or rolled back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import FedtuneError
from privacy.ledger_entries import (
    GENESIS_HASH,
    Abort,
    Commit,
    Entry,
    Release,
    Reserve,
    canonical_bytes,
    entry_hash,
    from_dict,
)

__all__ = ["DONT_EDIT", "Finding", "LedgerError", "LineResult", "Walk", "parse_json", "walk"]

DONT_EDIT = "Fix: restore the ledger from backup and tell the site's privacy office; never edit it by hand"
MAX_DEPTH = 16  # ledger entries nest two levels; anything deeper is not a ledger entry
Verifier = Callable[[bytes, str], bool]


class LedgerError(FedtuneError):
    """The ledger is unreadable, fails verification, or was used inconsistently."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        super().__init__(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")
        self._init = ((path, line, problem), {})


@dataclass(frozen=True)
class Finding:
    """One problem: where (ledger file, line, seq), which check, and why."""

    ledger: str
    line: int | None
    seq: int | None
    check: str
    message: str
    severity: str = "error"  # "error" fails verification, "warning" does not

    def __str__(self) -> str:
        where = self.ledger + (f":{self.line}" if self.line is not None else "")
        entry = f" entry seq {self.seq}" if self.seq is not None else ""
        return f"{self.severity.upper()} {where}{entry} [{self.check}]: {self.message}"


@dataclass
class LineResult:
    """One ledger line: its typed entry (``None`` when unreadable) and the raw object if any."""

    line: int
    entry: Entry | None
    raw: dict[str, Any] | None = None
    ok: bool = True


@dataclass
class Walk:
    """Everything :func:`walk` found in a ledger."""

    path: Path
    lines: list[LineResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def entries(self) -> list[Entry]:
        """The readable entries, in file order."""
        return [r.entry for r in self.lines if r.entry is not None]

    @property
    def errors(self) -> list[Finding]:
        """The findings that fail verification."""
        return [f for f in self.findings if f.severity == "error"]

    def error(self, line: int | None, seq: int | None, check: str, message: str) -> None:
        """Record a failing finding and mark its line."""
        self.findings.append(Finding(str(self.path), line, seq, check, message))
        for r in self.lines:
            if line is not None and r.line == line:
                r.ok = False

    def warn(self, line: int | None, seq: int | None, check: str, message: str) -> None:
        """Record a finding that does not fail verification."""
        self.findings.append(Finding(str(self.path), line, seq, check, message, "warning"))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a ledger")


def _depth(value: object, limit: int) -> bool:
    """Whether ``value`` nests no deeper than ``limit``."""
    if limit < 0:
        return False
    if isinstance(value, dict):
        return all(_depth(v, limit - 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth(v, limit - 1) for v in value)
    return True


def parse_json(text: str) -> tuple[dict[str, Any] | None, str]:
    """One ledger line as a JSON object, or ``None`` and why not (never raises)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return None, f"nested deeper than {MAX_DEPTH} levels"
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return None, f"not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    if not _depth(value, MAX_DEPTH):
        return None, f"nested deeper than {MAX_DEPTH} levels"
    return value, ""


def walk(path: Path, lines: Sequence[tuple[int, str]], verifier: Verifier | None = None) -> Walk:
    """Parse and check every ``(line number, text)`` of the ledger ``path``; see the module docstring."""
    w = Walk(Path(path))
    prev_hash, last_time = GENESIS_HASH, ""
    top_round: dict[str, int] = {}  # run -> highest reserved round
    opened: dict[int, Entry] = {}  # seq -> reserve/release not yet committed or aborted
    closed: set[int] = set()
    committed: set[tuple[str, int]] = set()
    latest: dict[tuple[str, int], int] = {}  # (run, round) -> seq of its latest reservation
    ledger_delta: float | None = None
    for index, (lineno, text) in enumerate(lines):
        raw, problem = parse_json(text)
        result = LineResult(lineno, None, raw)
        w.lines.append(result)
        if raw is None:
            w.error(lineno, None, "format", f"corrupt entry, {problem}. {DONT_EDIT}")
            prev_hash = "<unreadable line>"
            continue
        entry, problems = from_dict(raw)
        seq = raw.get("seq") if isinstance(raw.get("seq"), int) else None
        if raw.get("seq") != index:
            w.error(
                lineno, seq, "chain", f"seq is {raw.get('seq')!r}, expected {index}: entries lost or moved"
            )
        if raw.get("prev_hash") != prev_hash:
            w.error(lineno, seq, "chain", "prev_hash does not match the previous entry's hash: chain broken")
        if raw.get("hash") != entry_hash(raw):
            w.error(lineno, seq, "chain", "hash does not match the entry's content: the entry was modified")
        prev_hash = str(raw.get("hash"))
        if verifier is not None:
            sig = raw.get("signature")
            if not isinstance(sig, str):
                w.error(lineno, seq, "signature", "entry is not signed")
            elif not verifier(canonical_bytes(raw), sig):
                w.error(lineno, seq, "signature", "signature does not verify with the site's key")
        if isinstance(raw.get("time"), str):
            if raw["time"] < last_time:
                w.warn(lineno, seq, "time", f"time {raw['time']} precedes the previous {last_time}")
            last_time = raw["time"]
        for p in problems:
            w.error(lineno, seq, "format", p)
        if entry is None:
            continue
        result.entry = entry
        key = (entry.run_id, entry.round)
        if isinstance(entry, Reserve | Release):
            if entry.round < top_round.get(entry.run_id, -1):
                message = f"round {entry.round} of run {entry.run_id} reserved after its round "
                w.error(lineno, entry.seq, "order", message + str(top_round[entry.run_id]))
            elif key in committed:
                message = f"round {entry.round} of run {entry.run_id} reserved again after it was committed"
                w.error(lineno, entry.seq, "order", message)
            top_round[entry.run_id] = max(entry.round, top_round.get(entry.run_id, -1))
            opened[entry.seq] = entry
            latest[key] = entry.seq
            if isinstance(entry, Reserve):
                if ledger_delta is None:
                    ledger_delta = entry.delta
                elif entry.delta != ledger_delta:
                    message = f"delta {entry.delta:g} differs from the ledger's {ledger_delta:g}"
                    w.error(lineno, entry.seq, "delta", message)
        elif isinstance(entry, Commit | Abort):
            target = opened.get(entry.reserve_seq)
            if target is None:
                state = "already closed" if entry.reserve_seq in closed else "not an earlier reservation"
                message = f"{entry.kind} of reservation {entry.reserve_seq}, which is {state}"
                w.error(lineno, entry.seq, "commit", message)
                continue
            if latest.get((target.run_id, target.round)) != target.seq:
                message = f"reservation {entry.reserve_seq} was superseded by a retry of its round"
                w.error(lineno, entry.seq, "commit", message + ": trained twice")
            if (target.run_id, target.round) != key:
                message = f"run/round {key} differ from reservation {target.seq}'s"
                w.error(lineno, entry.seq, "commit", f"{message} {(target.run_id, target.round)}")
            del opened[entry.reserve_seq]
            closed.add(entry.reserve_seq)
            if isinstance(entry, Commit):
                committed.add(key)
    return w

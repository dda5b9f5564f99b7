"""Typed entries of the privacy ledger: one class per kind, parsed from (and written as) JSON lines.

Every entry has ``seq`` (0, 1, 2, ...), ``kind``, ``time`` (UTC ISO 8601), ``prev_hash`` (the previous
entry's ``hash``; ``"0" * 64`` first), ``hash`` (SHA-256 hex of :func:`canonical_bytes`) and, when the
site signs, ``signature``. The kinds:

``reserve``
    Budget reserved for one DP round before training (write-ahead): the mechanism (noise, sample rate,
    steps, clip, delta), the cumulative epsilon it brings, the data fingerprint, whether the noise was
    seeded (testing only: not private), the accounting settings the epsilon was computed with and the
    training kind (``train_kind``: sft or cpt; every kind spends the one budget).
``release``
    A round trained WITHOUT differential privacy (only where the site policy allows it): an unbounded
    release of the records; every later epsilon of this ledger is infinite.
``commit``
    What a reserved (or released) round sent: the update's SHA-256, record count, metrics.
``abort``
    A reserved round that sent nothing (training diverged); its epsilon stays counted.
``refuse``
    A request the site refused, with the reason; spends nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from common.sections import TRAIN_KINDS

__all__ = [
    "GENESIS_HASH",
    "KINDS",
    "Abort",
    "Commit",
    "Entry",
    "Refuse",
    "Release",
    "Reserve",
    "canonical_bytes",
    "entry_hash",
    "from_dict",
]

GENESIS_HASH = "0" * 64
_HEX = frozenset("0123456789abcdef")


def canonical_bytes(entry: Mapping[str, Any]) -> bytes:
    """Bytes covered by ``hash`` and ``signature``: sorted compact ASCII JSON without them."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The SHA-256 hex an intact entry carries as its ``hash``."""
    return hashlib.sha256(canonical_bytes(entry)).hexdigest()


def is_sha256(value: object) -> bool:
    """True for 64 lowercase hex characters."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _int(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _between(
    low: float, high: float, *, low_open: bool = True, high_open: bool = False
) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        if not _num(value):
            return False
        v = float(value)  # type: ignore[arg-type]  # _num checked it is a real number
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return check


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _string(value: object) -> bool:
    return isinstance(value, str)


def _numbers(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _num(v) for k, v in value.items())


_POSITIVE = _between(0.0, math.inf)
_NONNEG = _between(0.0, math.inf, low_open=False)
Rule = tuple[Callable[[object], bool], str]
_RULES: dict[str, Rule] = {
    "seq": (_int, "an integer >= 0"),
    "time": (_string, "a string"),
    "prev_hash": (_string, "a string"),
    "hash": (_string, "a string"),
    "signature": (_string, "a string"),
    "round": (_int, "an integer >= 0"),
    "run_id": (_text, "a non-empty string"),
    "noise_multiplier": (_POSITIVE, "a number > 0"),
    "sample_rate": (_between(0.0, 1.0), "a number in (0, 1]"),
    "steps": (lambda v: _int(v, 1), "an integer >= 1"),
    "max_grad_norm": (_POSITIVE, "a number > 0"),
    "delta": (_between(0.0, 1.0, high_open=True), "a number in (0, 1)"),
    "max_epsilon": (_POSITIVE, "a number > 0"),
    "accountant": (lambda v: v in ("prv", "rdp"), "'prv' or 'rdp'"),
    "epsilon": (_NONNEG, "a number >= 0"),
    "epsilon_rdp": (_NONNEG, "a number >= 0"),
    "data_fingerprint": (_text, "a non-empty string"),
    "seeded_noise": (lambda v: isinstance(v, bool), "true or false"),
    "accounting": (lambda v: isinstance(v, dict), "an object"),
    "reserve_seq": (_int, "an integer >= 0"),
    "update_sha256": (is_sha256, "64 lowercase hex characters"),
    "num_examples": (_int, "an integer >= 0"),
    "metrics": (_numbers, "an object of numbers"),
    "reason": (_string, "a string"),
    "train_kind": (lambda v: v in TRAIN_KINDS, f"one of {', '.join(TRAIN_KINDS)}"),
}


@dataclass(frozen=True, kw_only=True)
class Entry:
    """Fields every entry has; ``raw`` is the entry exactly as written (for hashing and receipts)."""

    kind: ClassVar[str] = ""
    optional: ClassVar[tuple[str, ...]] = ("signature",)
    seq: int
    time: str
    prev_hash: str
    hash: str
    signature: str | None = None
    round: int
    run_id: str
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class Reserve(Entry):
    """Budget reserved before a DP round trains."""

    kind: ClassVar[str] = "reserve"
    optional: ClassVar[tuple[str, ...]] = ("signature", "seeded_noise", "accounting", "train_kind")
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    max_epsilon: float
    accountant: str
    epsilon: float
    epsilon_rdp: float
    data_fingerprint: str
    seeded_noise: bool = False
    accounting: Mapping[str, Any] = field(default_factory=dict)
    train_kind: str = "sft"  # absent in entries written before training kinds existed

    @property
    def epsilon_of_record(self) -> float:
        """The cumulative epsilon the site's budget was checked with (its policy's accountant)."""
        return self.epsilon_rdp if self.accountant == "rdp" else self.epsilon


@dataclass(frozen=True, kw_only=True)
class Release(Entry):
    """A round trained without differential privacy: an unbounded release of the records."""

    kind: ClassVar[str] = "release"
    optional: ClassVar[tuple[str, ...]] = ("signature", "train_kind")
    data_fingerprint: str
    reason: str
    train_kind: str = "sft"


@dataclass(frozen=True, kw_only=True)
class Commit(Entry):
    """What a reserved or released round sent."""

    kind: ClassVar[str] = "commit"
    reserve_seq: int
    update_sha256: str
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Abort(Entry):
    """A reserved round that sent nothing; its epsilon stays counted."""

    kind: ClassVar[str] = "abort"
    reserve_seq: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Refuse(Entry):
    """A refused request; ``details`` holds what the budget gate recorded beside the reason."""

    kind: ClassVar[str] = "refuse"
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)


KINDS: dict[str, type[Entry]] = {cls.kind: cls for cls in (Reserve, Release, Commit, Abort, Refuse)}
_HEADER = frozenset(f.name for f in fields(Entry)) - {"raw"}


def from_dict(raw: Mapping[str, Any]) -> tuple[Entry | None, list[str]]:
    """The typed entry of a parsed JSON object, or ``None`` and every format problem found."""
    cls = KINDS.get(raw.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        return None, [f"unknown kind {raw.get('kind')!r} (expected one of {', '.join(KINDS)})"]
    names = [f.name for f in fields(cls) if f.name not in ("raw", "details")]
    problems = []
    values: dict[str, Any] = {}
    for name in names:
        if name not in raw:
            if name not in cls.optional:
                problems.append(f"{cls.kind} entry lacks '{name}'")
            continue
        check, want = _RULES[name]
        if not check(raw[name]):
            problems.append(f"'{name}' must be {want}, got {raw[name]!r}")
        else:
            values[name] = raw[name]
    if problems:
        return None, problems
    if cls is Refuse:
        values["details"] = {k: v for k, v in raw.items() if k not in _HEADER and k not in ("kind", "reason")}
    elif unknown := sorted(set(raw) - set(names) - {"kind"}):
        return None, [f"{cls.kind} entry has unknown fields {unknown}"]
    return cls(**values, raw=dict(raw)), []

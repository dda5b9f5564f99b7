"""Validation for the privacy ledger: entry format, chain verification and argument checks.

:func:`canonical_bytes` defines the bytes that an entry's ``hash`` and ``signature`` cover;
:func:`check_lines` re-verifies a ledger's lines (seq numbers, hash links, entry hashes, commit
references and signatures); the remaining helpers validate the arguments of
:meth:`privacy.ledger.PrivacyLedger.reserve` and :meth:`~privacy.ledger.PrivacyLedger.commit`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError, FedtuneError

__all__ = ["GENESIS_HASH", "LedgerError", "canonical_bytes", "check_lines", "parse_entry"]

GENESIS_HASH = "0" * 64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DONT_EDIT = "Fix: restore the ledger from backup and tell the site's privacy office; never edit it by hand"


class LedgerError(FedtuneError):
    """The ledger is unreadable, fails verification, or was used inconsistently."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        super().__init__(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


def canonical_bytes(entry: Mapping[str, Any]) -> bytes:
    """Bytes covered by ``hash`` and ``signature``: sorted compact ASCII JSON without them."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def parse_entry(path: Path, lineno: int, text: str) -> dict[str, Any]:
    """Parse line ``lineno`` of the ledger ``path``; raises :class:`LedgerError` if it is corrupt."""
    try:
        entry = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise LedgerError(path, lineno, f"corrupt entry, not valid JSON ({exc}). {_DONT_EDIT}") from exc
    if not isinstance(entry, dict):
        raise LedgerError(path, lineno, f"corrupt entry, not a JSON object. {_DONT_EDIT}")
    return entry


def check_lines(
    path: Path, lines: list[tuple[int, str]], verifier: Callable[[bytes, str], bool] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse and verify ``lines`` of the ledger ``path``; return the readable entries and all problems."""
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    prev_hash = GENESIS_HASH
    committed: dict[object, bool] = {}  # reservation seq -> committed already
    for index, (lineno, text) in enumerate(lines):
        where = f"{path}:{lineno}"
        try:
            entry = parse_entry(path, lineno, text)
        except LedgerError as exc:
            problems.append(str(exc))
            prev_hash = "<unreadable>"
            continue
        entries.append(entry)
        if entry.get("seq") != index:
            problems.append(f"{where}: seq is {entry.get('seq')!r}, expected {index} (lines lost or moved)")
        if entry.get("prev_hash") != prev_hash:
            problems.append(f"{where}: prev_hash does not match the previous entry's hash")
        if entry.get("hash") != hashlib.sha256(canonical_bytes(entry)).hexdigest():
            problems.append(f"{where}: hash mismatch, the entry was modified")
        prev_hash = str(entry.get("hash"))
        signature = entry.get("signature")
        if verifier is not None and not (
            isinstance(signature, str) and verifier(canonical_bytes(entry), signature)
        ):
            problems.append(f"{where}: missing or invalid signature")
        ref = entry.get("reserve_seq")
        if entry.get("kind") == "reserve":
            committed[entry.get("seq")] = False
        elif entry.get("kind") == "commit" and committed.get(ref) is not False:
            problems.append(f"{where}: commit of reservation {ref!r}, which is unknown or already committed")
        elif entry.get("kind") == "commit":
            committed[ref] = True
    return entries, problems


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a ledger")


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_reserve_args(
    round: int, run_id: str, max_grad_norm: float, delta: float, max_epsilon: float, fingerprint: str
) -> None:
    checks = [
        (_int_at_least(round, 0), f"round must be an integer >= 0, got {round!r}"),
        (isinstance(run_id, str) and bool(run_id), "run_id must be a non-empty string"),
        (_finite(max_grad_norm) and max_grad_norm > 0, f"max_grad_norm must be > 0, got {max_grad_norm!r}"),
        (_finite(delta) and 0 < delta < 1, f"delta must be in (0, 1), got {delta!r}"),
        (_finite(max_epsilon) and max_epsilon > 0, f"max_epsilon must be > 0, got {max_epsilon!r}"),
        (isinstance(fingerprint, str) and bool(fingerprint), "data_fingerprint must be a non-empty string"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("ledger reservation", problems)

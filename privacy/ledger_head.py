"""The ledger's head record: an anchor kept OUTSIDE the ledger's folder, rewritten after every entry.

A hash chain shows an edit or a deleted line in the middle, but not a ledger cut at its end, emptied,
deleted, or replaced by an older copy: each of those is again a valid chain that forgets budget already
spent. The head record names the last entry written (``seq`` and ``hash``) and where the ledger lives;
it is signed with the ledger's key when the site signs. Before every write the site checks that its
ledger still holds the entry its head names (:func:`check_head`); the auditor runs the same check on the
head record a site hands over with its ledger.

Format (one JSON object)::

    {"format": 1, "site": "...", "ledger": "/abs/state/ledger.jsonl", "seq": 12, "hash": "...",
     "time": "...", "signature": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.fsutil import atomic_write_text
from privacy.ledger_checks import LedgerError, parse_json
from privacy.ledger_entries import canonical_bytes, is_sha256

__all__ = ["HEAD_FORMAT", "Head", "check_head", "read_head", "signature_ok", "write_head"]

HEAD_FORMAT = 1
RESTORE = (
    "Fix: restore the ledger (and its folder) from backup; never start a new ledger for a site that "
    "has trained, because that would reset its privacy budget"
)


@dataclass(frozen=True)
class Head:
    """The last entry a ledger held when it was last written."""

    site: str
    ledger: str
    seq: int
    hash: str
    time: str
    signature: str | None = None

    def body(self) -> dict[str, Any]:
        """The signed fields."""
        return {
            "format": HEAD_FORMAT,
            "site": self.site,
            "ledger": self.ledger,
            "seq": self.seq,
            "hash": self.hash,
            "time": self.time,
        }


def read_head(path: Path) -> Head | None:
    """The head record at ``path`` (``None`` if there is none); ``LedgerError`` if it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(path, None, f"the ledger head record cannot be read ({exc}). {RESTORE}") from None
    raw, problem = parse_json(text)
    fields_ok = raw is not None and (
        raw.get("format") == HEAD_FORMAT
        and isinstance(raw.get("site"), str)
        and isinstance(raw.get("ledger"), str)
        and isinstance(raw.get("seq"), int)
        and not isinstance(raw.get("seq"), bool)
        and is_sha256(raw.get("hash"))
        and isinstance(raw.get("time"), str)
        and isinstance(raw.get("signature", ""), str)
    )
    if raw is None or not fields_ok:
        why = problem or "not a fedtune ledger head record"
        raise LedgerError(path, None, f"the ledger head record is corrupt ({why}). {RESTORE}")
    return Head(raw["site"], raw["ledger"], raw["seq"], raw["hash"], raw["time"], raw.get("signature"))


def write_head(
    path: Path, *, site: str, ledger: Path, seq: int, hash: str, signer: Callable[[bytes], str] | None
) -> Head:
    """Atomically (re)write the head record naming entry ``seq`` with ``hash``."""
    head = Head(site, str(ledger), seq, hash, datetime.now(UTC).isoformat())
    body = head.body()
    if signer is not None:
        body["signature"] = signer(canonical_bytes(body))
    try:
        atomic_write_text(path, json.dumps(body, sort_keys=True) + "\n")
    except OSError as exc:
        raise LedgerError(
            path,
            None,
            f"cannot write the ledger head record ({exc.strerror}). Fix: give the agent write access to "
            "it, or set [site] ledger-head in the site policy to a writable file outside state-dir",
        ) from None
    return Head(head.site, head.ledger, seq, hash, head.time, body.get("signature"))


def signature_ok(head: Head, verify: Callable[[bytes, str], bool]) -> bool:
    """Whether the head record carries a valid signature."""
    return head.signature is not None and verify(canonical_bytes(head.body()), head.signature)


def check_head(hashes: list[str], head: Head, head_path: Path) -> list[str]:
    """Why a ledger whose entries have ``hashes`` (in seq order) does not reach ``head`` (empty: it does)."""
    if head.seq < len(hashes) and hashes[head.seq] == head.hash:
        return []
    where = f"the head record {head_path} (written {head.time})"
    if head.seq >= len(hashes):
        have = f"holds {len(hashes)} entries" if hashes else "is empty or missing"
        return [
            f"the ledger {have} but {where} names entry seq {head.seq}: entries were cut from its end, "
            f"or it was emptied, deleted or replaced by an older copy. {RESTORE}"
        ]
    return [
        f"entry seq {head.seq} differs from the one {where} names: the ledger was rewritten or replaced. "
        + RESTORE
    ]

"""Receipts cross-check of the ledger audit (see ``docs/ledger.md``).

With every reply a site sends the ledger entry that answered the request -- the ``commit`` of a trained
round, the ``refuse`` of a refused one -- exactly as written, signed. The coordinator checks it, and keeps
it in ``receipts.jsonl`` as one line ``{"site": NAME, "entry": {...}}``. A ledger cut, rolled back or
rewritten after the coordinator saw its entries no longer matches them.

For every receipt of a site whose ledger is audited: the receipt's own hash and (with the site's key)
signature must hold, and the ledger entry of the same ``seq`` must be identical to it. A commit of a
receipted run without a receipt, or a receipt for a site whose ledger was not given, is a warning.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from privacy.ledger_checks import Finding, parse_json
from privacy.ledger_entries import canonical_bytes, entry_hash

__all__ = ["RECEIPTS_NAME", "ReceiptTarget", "check_receipts", "receipt_line"]

RECEIPTS_NAME = "receipts.jsonl"


class _Status(Protocol):
    seq: int | None
    line: int
    kind: str | None
    run_id: str | None


class ReceiptTarget(Protocol):
    """What the receipts check needs of one ledger's audit."""

    site: str
    raw: dict[int, dict[str, Any]]
    receipts_checked: int

    @property
    def entries(self) -> Sequence[_Status]: ...

    @property
    def verifier(self) -> Callable[[bytes, str], bool] | None: ...

    def error(self, line: int | None, seq: int | None, check: str, message: str) -> None: ...

    def warn(self, line: int | None, seq: int | None, check: str, message: str) -> None: ...


def receipt_line(site: str, entry: Mapping[str, Any]) -> str:
    """One line of ``receipts.jsonl``."""
    return json.dumps({"site": site, "entry": dict(entry)}, sort_keys=True)


def _load(path: Path, findings: list[Finding]) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line, site, entry)`` of every well-formed receipt; problems go to ``findings``."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        findings.append(Finding(str(path), None, None, "receipt", f"cannot read the receipts file ({exc})"))
        return []
    receipts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        raw, problem = parse_json(line)
        entry = raw.get("entry") if raw else None
        if raw is None or not isinstance(raw.get("site"), str) or not isinstance(entry, dict):
            why = problem or 'not {"site": NAME, "entry": {...}}'
            findings.append(Finding(str(path), lineno, None, "receipt", f"malformed receipt ({why})"))
            continue
        if not isinstance(entry.get("seq"), int):
            findings.append(Finding(str(path), lineno, None, "receipt", "receipt entry has no integer seq"))
            continue
        receipts.append((lineno, raw["site"], entry))
    return receipts


def check_receipts(audits: Sequence[ReceiptTarget], receipts_file: Path) -> list[Finding]:
    """Check every receipt against its site's ledger; return the findings about the file itself."""
    findings: list[Finding] = []
    by_site = {a.site: a for a in audits}
    receipted: dict[str, set[tuple[object, int]]] = {a.site: set() for a in audits}
    for rline, site, r in _load(receipts_file, findings):
        audit = by_site.get(site)
        if audit is None:
            message = f"receipt for site {site!r}, whose ledger was not given"
            findings.append(Finding(str(receipts_file), rline, None, "receipt", message, "warning"))
            continue
        audit.receipts_checked += 1
        seq = int(r["seq"])
        receipted[site].add((r.get("run_id"), seq))
        source = f"receipt {receipts_file.name}:{rline} (run {r.get('run_id')}, round {r.get('round')})"
        if r.get("hash") != entry_hash(r):
            audit.error(
                None, seq, "receipt", f"{source} does not match its own hash: the receipt was altered"
            )
            continue
        verify = audit.verifier
        sig = r.get("signature")
        if verify is not None and not (isinstance(sig, str) and verify(canonical_bytes(r), sig)):
            audit.error(None, seq, "receipt", f"{source} is not signed with the site's key")
        mine = audit.raw.get(seq)
        line = next((s.line for s in audit.entries if s.seq == seq), None)
        if mine is None:
            message = f"{source} names entry seq {seq}, which the ledger lacks: it was cut or rolled back"
            audit.error(None, seq, "receipt", message)
        elif mine != r:
            differ = sorted(k for k in set(mine) | set(r) if mine.get(k) != r.get(k))
            audit.error(
                line, seq, "receipt", f"fields {differ} differ from {source}: the entry was rewritten"
            )
    for audit in audits:
        runs = {run for run, _ in receipted[audit.site]}
        for s in audit.entries:
            if (
                s.kind == "commit"
                and s.run_id in runs
                and s.seq is not None
                and (s.run_id, s.seq) not in receipted[audit.site]
            ):
                message = "commit has no receipt: the coordinator did not accept (or did not record) it"
                audit.warn(s.line, s.seq, "receipt", message)
    return findings

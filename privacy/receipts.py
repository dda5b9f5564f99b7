"""Receipts cross-check of the ledger audit (see ``docs/ledger.md``).

The coordinator keeps ``receipts.jsonl``: one receipt per accepted site update, naming the
ledger entry (``seq``, ``hash``, ``run_id``, ``round``) and the ``update_sha256`` it received.
A ledger that was truncated or rewritten after the coordinator accepted its updates no longer
matches them. :class:`Finding` is the problem record every audit check reports.

For every receipt of a site whose ledger is audited, the entry with the receipt's ``seq`` must
exist and agree on ``hash``, ``signature`` (when the receipt has one), ``kind`` (a commit),
``run_id``, ``round`` and ``update_sha256``; any difference is an error. A commit of a receipted
run without a receipt, or a receipt for a site whose ledger was not given, is a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privacy.audit import LedgerAudit

__all__ = ["RECEIPTS_NAME", "RECEIPT_FIELDS", "Finding"]

RECEIPTS_NAME = "receipts.jsonl"
RECEIPT_FIELDS = ("site", "round", "run_id", "seq", "hash", "update_sha256")


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


def _load_receipts(path: Path, findings: list[Finding]) -> list[tuple[int, dict[str, Any]]]:
    """``(line, receipt)`` pairs of a receipts file; problems go to ``findings``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        findings.append(Finding(str(path), None, None, "receipt", f"cannot read the receipts file ({exc})"))
        return []
    receipts = []
    for lineno, text in enumerate(lines, start=1):
        try:
            receipt = json.loads(text)
        except ValueError as exc:
            receipt = f"invalid JSON ({exc})"
        ok = isinstance(receipt, dict)
        missing = [k for k in RECEIPT_FIELDS if k not in receipt] if ok else [f"a JSON object, got {receipt}"]
        if missing:
            findings.append(Finding(str(path), lineno, None, "receipt", f"receipt lacks {missing}"))
        else:
            receipts.append((lineno, receipt))
    return receipts


def _check_receipts(audits: list[LedgerAudit], receipts_file: Path, findings: list[Finding]) -> None:
    """Every receipt of a site must match that site's ledger entry (seq, hash, round, update)."""
    by_site = {a.site: a for a in audits}
    receipted: dict[str, set[tuple[str, object]]] = {a.site: set() for a in audits}
    for rline, r in _load_receipts(receipts_file, findings):
        audit = by_site.get(str(r["site"]))
        if audit is None:
            message = f"receipt for site {r['site']!r}, whose ledger was not given"
            findings.append(Finding(str(receipts_file), rline, None, "receipt", message, "warning"))
            continue
        audit.receipts_checked += 1
        receipted[audit.site].add((str(r["run_id"]), r["seq"]))
        source = f"receipt {receipts_file.name}:{rline} (run {r['run_id']}, round {r['round']})"
        matches = [s for s in audit.entries if s.seq == r["seq"]]
        if not matches:
            message = f"{source} names entry seq {r['seq']}, which the ledger lacks: truncated or rewritten"
            audit.error(None, r["seq"], "receipt", message)
            continue
        s = matches[0]
        if s.hash != r["hash"]:
            audit.error(s.line, s.seq, "receipt", f"hash differs from {source}: the entry was rewritten")
        if "signature" in r and r["signature"] != s.signature:
            audit.error(s.line, s.seq, "receipt", f"signature differs from {source}: the entry was re-signed")
        mine = (s.kind, s.run_id, s.round, s.update_sha256)
        if mine != ("commit", r["run_id"], r["round"], r["update_sha256"]):
            message = f"(kind, run_id, round, update_sha256) = {mine} disagree with {source}"
            audit.error(s.line, s.seq, "receipt", message)
    for audit in audits:
        runs = {run for run, _ in receipted[audit.site]}
        for s in audit.entries:
            if s.kind == "commit" and s.run_id in runs and (s.run_id, s.seq) not in receipted[audit.site]:
                message = "commit has no receipt: the coordinator did not accept (or did not record) it"
                audit.warn(s.line, s.seq, "receipt", message)

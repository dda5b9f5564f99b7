"""Offline verification of site privacy ledgers, for auditors (see ``docs/ledger.md``).

:func:`verify_ledgers` trusts nothing but the ledger files, the sites' public keys
and, optionally, the coordinator's receipts. It checks, entry by entry: the hash
chain (``seq``, ``prev_hash``, ``hash``), every Ed25519 signature, round order per
run, that commits reference earlier reservations, and every reservation's
cumulative epsilon, recomputed from the parameters of ALL reservations so far with
fresh Opacus accountants (not the code that wrote the ledger). Receipts expose a
ledger truncated or rewritten after the coordinator accepted its updates.

Files are only read (no lock files are created), so read-only copies can be audited.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.keys import load_verifier, public_key_fingerprint
from privacy.ledger import GENESIS_HASH, canonical_bytes

__all__ = [
    "EPSILON_RTOL",
    "RECEIPTS_NAME",
    "AuditResult",
    "EntryStatus",
    "Finding",
    "LedgerAudit",
    "recompute_epsilon",
    "verify_ledgers",
]

EPSILON_RTOL = 1e-2
RECEIPTS_NAME = "receipts.jsonl"
RECEIPT_FIELDS = ("site", "round", "run_id", "seq", "hash", "update_sha256")
PRV_EPS_ERROR = 0.01  # as documented for ledger writers
RDP_ONLY_ABOVE = 50.0  # writers report RDP without running PRV above this
_RESERVE_NUMBERS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta", "max_epsilon")
_RESERVE_NUMBERS += ("epsilon", "epsilon_rdp")
_ALPHA_NOTE = r"Optimal order is the (largest|smallest) alpha"


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
class EntryStatus:
    """What verification found about one ledger line."""

    line: int
    seq: int | None
    kind: str | None
    run_id: str | None
    round: int | None
    ok: bool = True
    epsilon: float | None = None  # recorded (reserve entries)
    epsilon_recomputed: float | None = None
    epsilon_rdp: float | None = None
    epsilon_rdp_recomputed: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class LedgerAudit:
    """Verification of one ledger file."""

    path: str
    site: str
    entries: list[EntryStatus] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    key_fingerprint: str | None = None  # set when signatures were checked
    receipts_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not any(f.severity == "error" for f in self.findings)

    def error(self, line: int | None, seq: int | None, check: str, message: str) -> None:
        """Record a failing finding (and mark the entry on ``line`` as failing)."""
        self.findings.append(Finding(self.path, line, seq, check, message))
        for entry in self.entries:
            if line is not None and entry.line == line:
                entry.ok = False

    def warn(self, line: int | None, seq: int | None, check: str, message: str) -> None:
        """Record a finding that does not fail verification."""
        self.findings.append(Finding(self.path, line, seq, check, message, "warning"))


@dataclass
class AuditResult:
    """The outcome of :func:`verify_ledgers`."""

    ledgers: list[LedgerAudit]
    receipts_path: str | None = None
    receipt_findings: list[Finding] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        """Every finding of every ledger, then those about the receipts file itself."""
        return [f for audit in self.ledgers for f in audit.findings] + self.receipt_findings

    @property
    def ok(self) -> bool:
        """True only if every check of every ledger (and the receipts) held."""
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``ok``, ``ledgers`` (with ``entries`` and ``findings``), receipts."""
        return {
            "ok": self.ok,
            "ledgers": [{**asdict(a), "ok": a.ok} for a in self.ledgers],
            "receipts_path": self.receipts_path,
            "receipt_findings": [asdict(f) for f in self.receipt_findings],
        }


def _merge(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Sum the steps of identical (noise, sample rate) pairs; composition is order-free."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


@functools.lru_cache(maxsize=512)
def recompute_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> tuple[float, float]:
    """Cumulative ``(epsilon, epsilon_rdp)`` of DP-SGD mechanisms, from fresh Opacus accountants.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` of every reservation so far.
    delta
        Target delta.

    Returns
    -------
    (float, float)
        The PRV upper bound (``eps_error=0.01``; the RDP bound when RDP exceeds 50 or PRV
        fails, exactly as ledger writers do) and the RDP bound.
    """
    merged = _merge(history)
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ALPHA_NOTE, category=UserWarning)
        rdp_acc = RDPAccountant()
        rdp_acc.history = list(merged)
        rdp = float(rdp_acc.get_epsilon(delta))
        if rdp > RDP_ONLY_ABOVE:
            return rdp, rdp
        prv_acc = PRVAccountant()
        prv_acc.history = list(merged)
        try:
            prv = float(prv_acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        except (ValueError, RuntimeError, FloatingPointError, OverflowError, MemoryError):
            prv = math.nan
    return (rdp if math.isnan(prv) else prv), rdp


def _number(value: object, *, integer: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) if integer else math.isfinite(value)


def _parse(audit: LedgerAudit, lineno: int, text: str) -> dict[str, Any] | None:
    def reject(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    try:
        entry = json.loads(text, parse_constant=reject)
    except ValueError as exc:
        audit.error(lineno, None, "format", f"not valid JSON ({exc})")
        return None
    if not isinstance(entry, dict):
        audit.error(lineno, None, "format", "not a JSON object")
        return None
    return entry


def _check_chain(audit: LedgerAudit, verifier: Callable[[bytes, str], bool] | None) -> None:
    """Chain, signatures, entry formats, round order and commit references."""
    prev_hash = GENESIS_HASH
    last_round: dict[str, int] = {}  # run_id -> highest round seen
    last_reserve: dict[str, int] = {}  # run_id -> highest reserved round
    reserves: dict[int, tuple[str | None, int | None, bool]] = {}  # seq -> run, round, committed
    last_time = ""
    lines = Path(audit.path).read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    for index, text in enumerate(lines):
        lineno = index + 1
        entry = _parse(audit, lineno, text)
        seq_value = entry.get("seq") if entry is not None else None
        seq = seq_value if _number(seq_value, integer=True) else None
        kind = entry.get("kind") if entry is not None else None
        status = EntryStatus(lineno, seq, kind if isinstance(kind, str) else None, None, None)
        audit.entries.append(status)
        if entry is None:
            status.ok = False
            prev_hash = "<unreadable line>"
            continue
        run_id, rnd = entry.get("run_id"), entry.get("round")
        status.run_id = run_id if isinstance(run_id, str) else None
        status.round = rnd if _number(rnd, integer=True) else None

        def fail(check: str, message: str, _line: int = lineno, _seq: int | None = seq) -> None:
            audit.error(_line, _seq, check, message)

        if seq != index:
            fail("chain", f"seq is {seq_value!r}, expected {index}: entries were deleted, inserted or moved")
        if entry.get("prev_hash") != prev_hash:
            fail("chain", "prev_hash does not match the previous entry's hash: the chain is broken here")
        body = canonical_bytes(entry)
        if entry.get("hash") != hashlib.sha256(body).hexdigest():
            fail("chain", "hash does not match the entry's content: the entry was modified")
        prev_hash = str(entry.get("hash"))
        if verifier is not None:
            signature = entry.get("signature")
            if not isinstance(signature, str):
                fail("signature", "entry is not signed")
            elif not verifier(body, signature):
                fail("signature", f"signature does not verify with key {audit.key_fingerprint}")
        time = entry.get("time")
        if isinstance(time, str) and time < last_time:
            audit.warn(lineno, seq, "order", f"time {time} is earlier than the previous entry's {last_time}")
        last_time = time if isinstance(time, str) else last_time
        if kind not in ("reserve", "commit", "refuse"):
            fail("format", f"unknown kind {kind!r} (expected reserve, commit or refuse)")
            continue
        if status.run_id is None or status.round is None:
            fail("format", "run_id (string) and round (integer) are required")
            continue
        if kind == "reserve":
            bad = [k for k in _RESERVE_NUMBERS if not _number(entry.get(k), integer=k == "steps")]
            if bad:
                fail("format", f"reservation fields {bad} are missing or not numbers")
            status.parameters = {k: entry.get(k) for k in (*_RESERVE_NUMBERS[:6], "accountant")}
            if rnd <= last_reserve.get(run_id, -1):
                fail("order", f"round {rnd} of run {run_id} reserved after round {last_reserve[run_id]}")
            last_reserve[run_id] = max(rnd, last_reserve.get(run_id, -1))
            if seq is not None:
                reserves[seq] = (run_id, rnd, False)
        elif rnd < last_round.get(run_id, -1):
            fail("order", f"round {rnd} of run {run_id} comes after round {last_round[run_id]}")
        last_round[run_id] = max(rnd, last_round.get(run_id, -1))
        if kind == "commit":
            ref = entry.get("reserve_seq")
            target = reserves.get(ref) if _number(ref, integer=True) else None
            if target is None:
                fail("commit", f"commits reservation {ref!r}, which is not an earlier reserve entry")
            elif target[2]:
                fail("commit", f"reservation {ref} was already committed")
            else:
                if target[:2] != (run_id, rnd):
                    fail("commit", f"run/round ({run_id}, {rnd}) differ from reservation {ref}'s {target[:2]}")
                reserves[ref] = (target[0], target[1], True)


def _check_epsilon(audit: LedgerAudit, entries: list[dict[str, Any] | None], rtol: float) -> None:
    """Recompute every reservation's cumulative epsilon from all reservations up to it."""
    history: list[tuple[float, float, int]] = []
    ledger_delta: float | None = None
    for status, entry in zip(audit.entries, entries, strict=True):
        if entry is None or status.kind != "reserve" or len(status.parameters) < 7:
            continue
        p = status.parameters
        if not (_number(p["noise_multiplier"]) and _number(p["sample_rate"]) and _number(p["steps"])):
            continue
        if not (p["noise_multiplier"] > 0 and 0 < p["sample_rate"] <= 1 and p["steps"] >= 1):
            audit.error(status.line, status.seq, "epsilon", f"invalid mechanism parameters {p}")
            continue
        history.append((float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["steps"])))
        delta = p["delta"]
        if not (_number(delta) and 0 < delta < 1):
            audit.error(status.line, status.seq, "epsilon", f"delta {delta!r} is not in (0, 1)")
            continue
        if ledger_delta is None:
            ledger_delta = float(delta)
        elif delta != ledger_delta:
            audit.error(
                status.line, status.seq, "epsilon", f"delta {delta:g} differs from the ledger's {ledger_delta:g}"
            )
        eps, eps_rdp = recompute_epsilon(tuple(history), ledger_delta)
        status.epsilon, status.epsilon_rdp = entry.get("epsilon"), entry.get("epsilon_rdp")
        status.epsilon_recomputed, status.epsilon_rdp_recomputed = eps, eps_rdp
        for name, recorded, fresh in (("epsilon", status.epsilon, eps), ("epsilon_rdp", status.epsilon_rdp, eps_rdp)):
            if not _number(recorded):
                continue
            if recorded < fresh * (1 - rtol):
                audit.error(
                    status.line,
                    status.seq,
                    "epsilon",
                    f"recorded cumulative {name} {recorded:.4f} is LOWER than the {fresh:.4f} its "
                    f"parameters imply (relative tolerance {rtol:g}): privacy spend under-reported",
                )
            elif recorded > fresh * (1 + rtol):
                audit.warn(
                    status.line,
                    status.seq,
                    "epsilon",
                    f"recorded {name} {recorded:.4f} exceeds the recomputed {fresh:.4f} (conservative)",
                )
        budget = p["max_epsilon"]
        recorded_used = status.epsilon_rdp if p.get("accountant") == "rdp" else status.epsilon
        fresh_used = eps_rdp if p.get("accountant") == "rdp" else eps
        if _number(budget) and _number(recorded_used) and recorded_used > budget:
            audit.error(status.line, status.seq, "budget", f"epsilon {recorded_used:.4f} > max_epsilon {budget:g}")
        elif _number(budget) and fresh_used > budget * (1 + rtol):
            audit.error(
                status.line, status.seq, "budget", f"recomputed epsilon {fresh_used:.4f} > max_epsilon {budget:g}"
            )

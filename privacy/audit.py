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
from privacy.receipts import RECEIPTS_NAME, Finding, _check_receipts

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
PRV_EPS_ERROR = 0.01  # as documented for ledger writers
RDP_ONLY_ABOVE = 50.0  # writers report RDP without running PRV above this
_MECHANISM = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta")
_RESERVE_NUMBERS = (*_MECHANISM, "max_epsilon", "epsilon", "epsilon_rdp")
Verifier = Callable[[bytes, str], bool]
_ALPHA_NOTE = r"Optimal order is the (largest|smallest) alpha"


@dataclass
class EntryStatus:
    """What verification found about one ledger line."""

    line: int
    seq: int | None
    kind: str | None
    run_id: str | None = None
    round: int | None = None
    ok: bool = True
    hash: str | None = None
    signature: str | None = None
    update_sha256: str | None = None  # commit entries
    parameters: dict[str, Any] = field(default_factory=dict)  # recorded reservation fields
    epsilon_recomputed: float | None = None  # reserve entries: fresh PRV (see recompute_epsilon)
    epsilon_rdp_recomputed: float | None = None


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
        for entry in (e for e in self.entries if line is not None and e.line == line):
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
    steps: dict[tuple[float, float], int] = {}  # composition is order-free: merge equal mechanisms
    for sigma, q, n in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    merged = [(sigma, q, n) for (sigma, q), n in steps.items()]
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ALPHA_NOTE, category=UserWarning)
        rdp_acc, prv_acc = RDPAccountant(), PRVAccountant()
        rdp_acc.history, prv_acc.history = list(merged), list(merged)
        rdp = float(rdp_acc.get_epsilon(delta))
        if rdp > RDP_ONLY_ABOVE:
            return rdp, rdp
        try:
            prv = float(prv_acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        except (ValueError, RuntimeError, FloatingPointError, OverflowError, MemoryError):
            prv = math.nan
    return (rdp if math.isnan(prv) else prv), rdp


def _number(value: object, *, integer: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) if integer else math.isfinite(value)


def _reject(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _check_chain(audit: LedgerAudit, verifier: Verifier | None) -> None:
    """Chain, signatures, entry formats, round order and commit references of every line."""
    prev_hash, last_time = GENESIS_HASH, ""
    last_round: dict[str, int] = {}  # run_id -> highest round of any entry
    last_reserve: dict[str, int] = {}  # run_id -> highest reserved round
    reserves: dict[int, tuple[str, int, bool]] = {}  # seq -> run_id, round, committed
    superseded: set[int] = set()  # reservations retried after a crash (must never be committed)
    lines = Path(audit.path).read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    for index, text in enumerate(lines):
        try:
            entry = json.loads(text, parse_constant=_reject)
            problem = "" if isinstance(entry, dict) else "not a JSON object"
        except ValueError as exc:
            entry, problem = None, f"not valid JSON ({exc})"
        e = entry if isinstance(entry, dict) else {}
        seq = e.get("seq") if _number(e.get("seq"), integer=True) else None
        status = EntryStatus(index + 1, seq, e.get("kind") if isinstance(e.get("kind"), str) else None)
        audit.entries.append(status)
        status.hash = e.get("hash") if isinstance(e.get("hash"), str) else None
        status.signature = e.get("signature") if isinstance(e.get("signature"), str) else None
        status.update_sha256 = e.get("update_sha256") if isinstance(e.get("update_sha256"), str) else None
        fail = functools.partial(audit.error, status.line, seq)
        if problem:
            fail("format", problem)
            prev_hash = "<unreadable line>"
            continue
        if seq != index:
            fail("chain", f"seq is {e.get('seq')!r}, expected {index}: entries deleted, inserted or moved")
        if e.get("prev_hash") != prev_hash:
            fail("chain", "prev_hash does not match the previous entry's hash: the chain is broken here")
        body = canonical_bytes(e)
        if e.get("hash") != hashlib.sha256(body).hexdigest():
            fail("chain", "hash does not match the entry's content: the entry was modified")
        prev_hash = str(e.get("hash"))
        if verifier is not None and not isinstance(e.get("signature"), str):
            fail("signature", "entry is not signed")
        elif verifier is not None and not verifier(body, e["signature"]):
            fail("signature", f"signature does not verify with key {audit.key_fingerprint}")
        if isinstance(e.get("time"), str):
            if e["time"] < last_time:
                audit.warn(status.line, seq, "order", f"time {e['time']} precedes the previous {last_time}")
            last_time = e["time"]
        if status.kind not in ("reserve", "commit", "refuse"):
            fail("format", f"unknown kind {e.get('kind')!r} (expected reserve, commit or refuse)")
            continue
        if not isinstance(e.get("run_id"), str) or not _number(e.get("round"), integer=True):
            fail("format", "run_id (a string) and round (an integer) are required")
            continue
        run, rnd = status.run_id, status.round = e["run_id"], e["round"]
        if status.kind == "reserve":
            bad = [k for k in _RESERVE_NUMBERS if not _number(e.get(k), integer=k == "steps")]
            if bad:
                fail("format", f"reservation fields {bad} are missing or not numbers")
            else:
                status.parameters = {k: e[k] for k in _RESERVE_NUMBERS} | {"accountant": e.get("accountant")}
            same = [s for s, r in reserves.items() if r[:2] == (run, rnd)]
            if rnd < last_reserve.get(run, -1):
                fail("order", f"round {rnd} of run {run} reserved after its round {last_reserve[run]}")
            elif any(reserves[s][2] for s in same):
                fail("order", f"round {rnd} of run {run} reserved again after it was trained (committed)")
            superseded.update(same)  # a retry after a crash: the earlier reservation stays counted
            last_reserve[run] = max(rnd, last_reserve.get(run, -1))
            if seq is not None:
                reserves[seq] = (run, rnd, False)
        elif rnd < last_round.get(run, -1):
            fail("order", f"round {rnd} of run {run} comes after its round {last_round[run]}")
        last_round[run] = max(rnd, last_round.get(run, -1))
        if status.kind == "commit":
            ref = e.get("reserve_seq")
            target = reserves.get(ref) if isinstance(ref, int) else None
            if not isinstance(ref, int) or target is None or target[2]:
                fail("commit", f"reservation {ref!r} is not an earlier reservation, or already committed")
            elif ref in superseded:
                fail("commit", f"reservation {ref} was superseded by a retry of its round: trained twice")
            else:
                if target[:2] != (run, rnd):
                    fail("commit", f"run/round ({run}, {rnd}) differ from reservation {ref}'s {target[:2]}")
                reserves[ref] = (target[0], target[1], True)


def _check_epsilon(audit: LedgerAudit, rtol: float) -> None:
    """Recompute every reservation's cumulative epsilon from all reservations up to it."""
    history: list[tuple[float, float, int]] = []
    ledger_delta: float | None = None
    for status in audit.entries:
        p = status.parameters
        if not p:
            continue
        fail = functools.partial(audit.error, status.line, status.seq)
        if not (p["noise_multiplier"] > 0 and 0 < p["sample_rate"] <= 1 and p["steps"] >= 1):
            fail("epsilon", f"invalid mechanism parameters {p}")
            continue
        if not 0 < p["delta"] < 1:
            fail("epsilon", f"delta {p['delta']!r} is not in (0, 1)")
            continue
        history.append((float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["steps"])))
        if ledger_delta is None:
            ledger_delta = float(p["delta"])
        elif p["delta"] != ledger_delta:
            fail("epsilon", f"delta {p['delta']:g} differs from the ledger's {ledger_delta:g}")
        eps, eps_rdp = recompute_epsilon(tuple(history), ledger_delta)
        status.epsilon_recomputed, status.epsilon_rdp_recomputed = eps, eps_rdp
        for name, fresh in (("epsilon", eps), ("epsilon_rdp", eps_rdp)):
            recorded = p[name]
            if recorded < fresh * (1 - rtol):
                fail(
                    "epsilon",
                    f"recorded cumulative {name} {recorded:.4f} is LOWER than the {fresh:.4f} its parameters "
                    f"imply (relative tolerance {rtol:g}): privacy spend under-reported",
                )
            elif recorded > fresh * (1 + rtol):
                message = f"recorded {name} {recorded:.4f} exceeds the recomputed {fresh:.4f} (conservative)"
                audit.warn(status.line, status.seq, "epsilon", message)
        rdp = p["accountant"] == "rdp"
        recorded, fresh = (p["epsilon_rdp"], eps_rdp) if rdp else (p["epsilon"], eps)
        if recorded > p["max_epsilon"] or fresh > p["max_epsilon"] * (1 + rtol):
            fail("budget", f"epsilon {max(recorded, fresh):.4f} exceeds max_epsilon {p['max_epsilon']:g}")


def verify_ledgers(
    paths: Iterable[Path],
    *,
    pubkeys: Mapping[str, Path] | Path | None = None,
    receipts: Path | None = None,
    rtol: float = EPSILON_RTOL,
) -> AuditResult:
    """Verify site ledgers offline; see ``docs/ledger.md`` for every check.

    Parameters
    ----------
    paths
        Ledger files; a ledger's site name is its file name without ``.jsonl``.
    pubkeys
        One public key file for all ledgers, or site name -> public key file. When given,
        every entry of a covered ledger must carry a valid signature; a site missing from
        the mapping is a failure.
    receipts
        The coordinator's ``receipts.jsonl`` or the run folder holding it.
    rtol
        Relative tolerance of the epsilon recomputation.

    Returns
    -------
    AuditResult
        Per-ledger, per-entry findings; ``ok`` is True only if every check held.

    Raises
    ------
    FedtuneError
        A public key file is missing or is not an Ed25519 public key.
    """
    audits: list[LedgerAudit] = []
    verifiers: dict[Path, Verifier] = {}
    for path in map(Path, paths):
        audit = LedgerAudit(str(path), path.name.removesuffix(".jsonl"))
        audits.append(audit)
        key = pubkeys.get(audit.site) if isinstance(pubkeys, Mapping) else pubkeys
        if pubkeys is not None and key is None:
            message = f"no public key given for site {audit.site!r} (--pubkey {audit.site}=FILE)"
            audit.error(None, None, "signature", message)
        if key is not None:
            key = Path(key)
            verifiers.setdefault(key, load_verifier(key))
            audit.key_fingerprint = public_key_fingerprint(key)
        if not path.is_file():
            audit.error(None, None, "format", "ledger file not found")
            continue
        _check_chain(audit, verifiers[key] if key is not None else None)
        _check_epsilon(audit, rtol)
    result = AuditResult(audits)
    if receipts is not None:
        receipts_file = Path(receipts) / RECEIPTS_NAME if Path(receipts).is_dir() else Path(receipts)
        result.receipts_path = str(receipts_file)
        _check_receipts(audits, receipts_file, result.receipt_findings)
    return result

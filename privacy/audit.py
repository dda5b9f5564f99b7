"""Offline verification of site privacy ledgers, for auditors (see ``docs/ledger.md``).

:func:`verify_ledgers` trusts nothing but the ledger files, the sites' public keys, their head records
and, optionally, the coordinator's receipts. Structure (chain, signatures, formats, round order, commit
references) is checked by the very checker the site runs before every write
(:func:`privacy.ledger_checks.walk`), so site and auditor can never disagree about a ledger. On top:

* every reservation's cumulative epsilon is recomputed from the parameters of ALL reservations so far
  with fresh Opacus accountants, using the accounting settings the reservation records (not constants
  of the code that wrote it: PRV's ``eps_error``, the RDP cut-off and the PRV domain -- Opacus's own,
  or the quantised one of :mod:`privacy.accounting_prv`, recomputed from scratch without its caches),
  and checked against the recorded value and ``max_epsilon``;
* entries whose noise was seeded, and rounds released without DP, are reported as NOT PRIVATE;
* the head record (``<site>.head.json`` beside the ledger) must name an entry the ledger holds: a ledger
  cut at its end -- e.g. a reservation of a crashed round removed -- fails here;
* receipts (``receipts.jsonl``: full copies of the entries the coordinator accepted) must each match
  the ledger entry of the same ``seq`` (:mod:`privacy.receipts`).

Files are only read (no lock files are created), so read-only copies can be audited.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accounting_prv import PRV_DOMAIN, FixedDomainPRVAccountant
from privacy.keys import load_verifier, public_key_fingerprint
from privacy.ledger_checks import Finding, LedgerError, Verifier, walk
from privacy.ledger_entries import Commit, Release, Reserve
from privacy.ledger_head import check_head, read_head, signature_ok
from privacy.receipts import RECEIPTS_NAME, check_receipts

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
_DEFAULT_SETTINGS = {
    "prv_eps_error": 0.01,
    "rdp_above": 50.0,
    "prv_domain": None,  # Opacus's own domain
}  # ledgers written before settings were recorded
_ALPHA_NOTE = r"Optimal order is the (largest|smallest) alpha"
_MECHANISM = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta")


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
    private: bool = True  # False: seeded noise or released without DP


@dataclass
class LedgerAudit:
    """Verification of one ledger file."""

    path: str
    site: str
    entries: list[EntryStatus] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    key_fingerprint: str | None = None  # set when signatures were checked
    receipts_checked: int = 0
    head: str | None = None  # the head record checked, if any
    raw: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)  # seq -> entry as written
    verifier: Verifier | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not any(f.severity == "error" for f in self.findings)

    @property
    def epsilon(self) -> float | None:
        """The last recorded cumulative epsilon (``inf`` after a release without DP)."""
        if any(e.kind == "release" for e in self.entries):
            return math.inf
        spent = [e.parameters["epsilon"] for e in self.entries if e.parameters]
        return spent[-1] if spent else None

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
        ledgers = []
        for a in self.ledgers:
            body = asdict(a)
            body.pop("raw", None)
            body.pop("verifier", None)
            eps = a.epsilon
            ledgers.append(
                body | {"ok": a.ok, "epsilon": eps if eps is None or math.isfinite(eps) else "unbounded"}
            )
        return {
            "ok": self.ok,
            "ledgers": ledgers,
            "receipts_path": self.receipts_path,
            "receipt_findings": [asdict(f) for f in self.receipt_findings],
        }


@functools.lru_cache(maxsize=512)
def recompute_epsilon(
    history: tuple[tuple[float, float, int], ...],
    delta: float,
    prv_eps_error: float = 0.01,
    rdp_above: float = 50.0,
    prv_domain: str | None = None,
) -> tuple[float, float]:
    """Cumulative ``(epsilon, epsilon_rdp)`` of DP-SGD mechanisms, from fresh Opacus accountants.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` of every reservation so far.
    delta
        Target delta.
    prv_eps_error, rdp_above, prv_domain
        The accounting settings the reservation recorded: PRV's ``eps_error``, the RDP epsilon
        above which the writer reported RDP without running PRV, and the PRV domain
        (:data:`privacy.accounting_prv.PRV_DOMAIN`: :class:`FixedDomainPRVAccountant`; ``None``: a
        stock ``PRVAccountant``).

    Returns
    -------
    (float, float)
        The PRV upper bound (the RDP bound above ``rdp_above`` or when PRV fails) and the RDP bound.
    """
    steps: dict[tuple[float, float], int] = {}  # composition is order-free: merge equal mechanisms
    for sigma, q, n in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    merged = [(sigma, q, n) for (sigma, q), n in steps.items()]
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ALPHA_NOTE, category=UserWarning)
        rdp_acc = RDPAccountant()
        prv_acc = FixedDomainPRVAccountant() if prv_domain == PRV_DOMAIN else PRVAccountant()
        rdp_acc.history, prv_acc.history = list(merged), list(merged)
        rdp = float(rdp_acc.get_epsilon(delta))
        if rdp > rdp_above:
            return rdp, rdp
        try:
            prv = float(prv_acc.get_epsilon(delta, eps_error=prv_eps_error))
        except (ValueError, RuntimeError, FloatingPointError, OverflowError, MemoryError):
            prv = math.nan
    return (rdp if math.isnan(prv) else prv), rdp


def _statuses(audit: LedgerAudit, verifier: Verifier | None) -> list[Reserve | Release]:
    """Run the shared checker; fill ``audit.entries`` and findings; return the spending entries."""
    lines = Path(audit.path).read_bytes().decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    found = walk(Path(audit.path), list(enumerate(lines, start=1)), verifier)
    spending: list[Reserve | Release] = []
    for r in found.lines:
        e, raw = r.entry, r.raw or {}
        seq = raw.get("seq") if isinstance(raw.get("seq"), int) else None
        kind = raw.get("kind") if isinstance(raw.get("kind"), str) else None
        status = EntryStatus(
            r.line, seq, kind, hash=raw.get("hash") if isinstance(raw.get("hash"), str) else None
        )
        status.signature = raw.get("signature") if isinstance(raw.get("signature"), str) else None
        audit.entries.append(status)
        if seq is not None and r.raw is not None:
            audit.raw.setdefault(seq, r.raw)
        if e is None:
            continue
        status.run_id, status.round = e.run_id, e.round
        if isinstance(e, Commit):
            status.update_sha256 = e.update_sha256
        if isinstance(e, Reserve):
            status.parameters = {k: raw[k] for k in (*_MECHANISM, "max_epsilon", "epsilon", "epsilon_rdp")}
            status.parameters |= {"accountant": e.accountant, "train_kind": e.train_kind}
            status.private = not e.seeded_noise
        if isinstance(e, Release):
            status.private = False
        if isinstance(e, Reserve | Release):
            spending.append(e)
    audit.findings.extend(found.findings)
    for s in audit.entries:  # the checker's failing lines
        s.ok = s.ok and not any(f.line == s.line and f.severity == "error" for f in found.findings)
    return spending


def _check_epsilon(audit: LedgerAudit, spending: list[Reserve | Release], rtol: float) -> None:
    """Recompute every reservation's cumulative epsilon; flag what is not private."""
    history: list[tuple[float, float, int]] = []
    released: Release | None = None
    line_of = {s.seq: s.line for s in audit.entries}
    installed = f"opacus {version('opacus')}"
    for e in spending:
        line = line_of.get(e.seq)
        if isinstance(e, Release):
            released = released or e
            audit.error(
                line, e.seq, "not-private",
                f"round {e.round} of run {e.run_id} was trained WITHOUT differential privacy: its records "
                "are "
                "released without any epsilon bound, and every later epsilon of this ledger is unbounded",
            )  # fmt: skip
            continue
        if released is not None:
            audit.error(
                line, e.seq, "budget", f"DP reservation after the non-private release at seq {released.seq}"
            )
        if e.seeded_noise:
            audit.error(
                line, e.seq, "not-private",
                "the DP noise of this round was seeded (reproducible): whoever knows the seed can remove it, "
                "so its epsilon is not a privacy guarantee (test runs only)",
            )  # fmt: skip
        settings = {**_DEFAULT_SETTINGS, **{k: v for k, v in e.accounting.items() if k in _DEFAULT_SETTINGS}}
        library = e.accounting.get("library")
        if library and library != installed:
            audit.warn(line, e.seq, "epsilon", f"recorded with {library}, recomputed with {installed}")
        domain = settings["prv_domain"]
        if domain not in (None, PRV_DOMAIN):
            audit.warn(line, e.seq, "epsilon", f"unknown prv_domain {domain!r}: recomputed on Opacus's own")
            domain = None
        history.append((float(e.noise_multiplier), float(e.sample_rate), int(e.steps)))
        eps, eps_rdp = recompute_epsilon(
            tuple(history), float(e.delta), float(settings["prv_eps_error"]), float(settings["rdp_above"]),
            domain,
        )  # fmt: skip
        status = next(s for s in audit.entries if s.seq == e.seq and s.line == line)
        status.epsilon_recomputed, status.epsilon_rdp_recomputed = eps, eps_rdp
        for name, recorded, fresh in (("epsilon", e.epsilon, eps), ("epsilon_rdp", e.epsilon_rdp, eps_rdp)):
            if recorded < fresh * (1 - rtol):
                audit.error(
                    line, e.seq, "epsilon",
                    f"recorded cumulative {name} {recorded:.4f} is LOWER than the {fresh:.4f} its parameters "
                    f"imply (relative tolerance {rtol:g}): privacy spend under-reported",
                )  # fmt: skip
            elif recorded > fresh * (1 + rtol):
                message = f"recorded {name} {recorded:.4f} exceeds the recomputed {fresh:.4f} (conservative)"
                audit.warn(line, e.seq, "epsilon", message)
        recorded, fresh = (e.epsilon_rdp, eps_rdp) if e.accountant == "rdp" else (e.epsilon, eps)
        if recorded > e.max_epsilon or fresh > e.max_epsilon * (1 + rtol):
            audit.error(
                line,
                e.seq,
                "budget",
                f"epsilon {max(recorded, fresh):.4f} exceeds max_epsilon {e.max_epsilon:g}",
            )


def _check_head(audit: LedgerAudit, head_path: Path) -> None:
    """The ledger must still hold the entry its head record names."""
    try:
        head = read_head(head_path)
    except LedgerError as exc:
        audit.error(None, None, "head", str(exc))
        return
    if head is None:
        return
    audit.head = str(head_path)
    hashes = []
    for seq in range(len(audit.raw)):
        if seq not in audit.raw:
            break
        hashes.append(str(audit.raw[seq].get("hash")))
    for problem in check_head(hashes, head, head_path):
        audit.error(None, head.seq, "head", problem)
    if audit.verifier is not None and not signature_ok(head, audit.verifier):
        audit.error(None, head.seq, "head", f"the head record {head_path} is not signed with the site's key")


def verify_ledgers(
    paths: Iterable[Path],
    *,
    pubkeys: Mapping[str, Path] | Path | None = None,
    receipts: Path | None = None,
    heads: Mapping[str, Path] | None = None,
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
    heads
        Site name -> head record; by default ``<site>.head.json`` beside each ledger, when present.
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
            audit.verifier = verifiers[key]
        if not path.is_file():
            audit.error(None, None, "format", "ledger file not found" if not path.is_dir() else "is a folder")
            continue
        _check_epsilon(audit, _statuses(audit, audit.verifier), rtol)
        if not audit.entries:
            audit.error(None, None, "format", "the ledger is empty: a site that trained always has entries")
        head = (heads or {}).get(audit.site, path.with_name(f"{audit.site}.head.json"))
        if Path(head).is_file() or (heads and audit.site in heads):
            _check_head(audit, Path(head))
    result = AuditResult(audits)
    if receipts is not None:
        receipts_file = Path(receipts) / RECEIPTS_NAME if Path(receipts).is_dir() else Path(receipts)
        result.receipts_path = str(receipts_file)
        result.receipt_findings = check_receipts(audits, receipts_file)
    return result

"""Append-only, hash-chained privacy ledger: one JSONL file per site, anchored by a head record.

Each DP round is written *before* training as a ``reserve`` entry (write-ahead), so a crash after the
reservation still counts the round as spent; ``commit`` records what was sent, ``abort`` a reserved round
that sent nothing, ``release`` a round trained without DP, ``refuse`` a refused request (entry types:
:mod:`privacy.ledger_entries`). Nothing is ever rewritten or deleted.

Before every read or write the whole file is re-checked by the same checker the auditor runs
(:func:`privacy.ledger_checks.walk`), against the head record kept outside the ledger's folder
(:mod:`privacy.ledger_head`) and, when the coordinator sends one, against the last entry the coordinator
saw. A ledger that fails any check is never written to: starting over would reset the site's budget.

Writers hold an exclusive ``fcntl.flock`` on ``<ledger>.lock`` while they read, decide and append
(:meth:`PrivacyLedger.transaction`); readers hold a shared one. Each entry is one full line written to a
descriptor opened with ``O_APPEND``, then ``os.fsync``-ed; the head record is replaced atomically after.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import BudgetExceededError, ConfigError, PolicyViolationError
from common.sections import TRAIN_KINDS
from privacy.accounting import ACCOUNTANTS, MechanismStep, accounting_settings, epsilon
from privacy.ledger_checks import LedgerError, walk
from privacy.ledger_entries import (
    GENESIS_HASH,
    Abort,
    Commit,
    Entry,
    Refuse,
    Release,
    Reserve,
    canonical_bytes,
    entry_hash,
    from_dict,
    is_sha256,
)
from privacy.ledger_file import append_line, locked, read_lines
from privacy.ledger_head import check_head, read_head, write_head
from privacy.ledger_state import LedgerState

__all__ = ["GENESIS_HASH", "LedgerError", "LedgerState", "PrivacyLedger", "Transaction", "canonical_bytes"]

Signer = Callable[[bytes], str]
Verifier = Callable[[bytes, str], bool]


class Transaction:
    """Appends under the ledger's exclusive lock; ``state`` follows every append."""

    def __init__(self, ledger: PrivacyLedger, entries: list[Entry]) -> None:
        self._ledger = ledger
        self.state = LedgerState(entries)

    def append(self, fields: Mapping[str, Any]) -> Entry:
        """Write one entry (one ``O_APPEND`` line, fsync), then the head record; return it typed."""
        entries = list(self.state.entries)
        raw: dict[str, Any] = {**fields, "seq": len(entries), "time": datetime.now(UTC).isoformat()}
        raw["prev_hash"] = entries[-1].hash if entries else GENESIS_HASH
        raw["hash"] = entry_hash(raw)
        if self._ledger.signer is not None:
            raw["signature"] = self._ledger.signer(canonical_bytes(raw))
        line = json.dumps(raw, sort_keys=True, separators=(",", ":"), allow_nan=False)
        entry, problems = from_dict(raw)
        lines = [
            (n, json.dumps(dict(e.raw), sort_keys=True, separators=(",", ":")))
            for n, e in enumerate(entries, 1)
        ]
        found = walk(self._ledger.path, [*lines, (len(lines) + 1, line)])
        problems += [f.message for f in found.errors if f.line == len(lines) + 1]
        if entry is None or problems:  # never write what the checker (site's or auditor's) would reject
            raise LedgerError(
                self._ledger.path, None, f"refusing to write an entry the checker rejects: {problems}"
            )
        append_line(self._ledger.path, line)
        self.state = LedgerState([*entries, entry])
        self._ledger._write_head(entry)
        return entry

    def reserve(
        self,
        *,
        round: int,
        run_id: str,
        step: MechanismStep,
        max_grad_norm: float,
        delta: float,
        max_epsilon: float,
        data_fingerprint: str,
        accountant: str = "prv",
        seeded_noise: bool = False,
        train_kind: str = "sft",
    ) -> Reserve:
        """Reserve budget for one round; refuse (and record) past ``max_epsilon`` or a trained round.

        Raises
        ------
        BudgetExceededError
            The round would exceed ``max_epsilon`` (a ``refuse`` entry is appended).
        PolicyViolationError
            This run already trained (committed) this round (a ``refuse`` entry is appended).
        ConfigError
            An invalid argument, or ``delta`` differs from the ledger's (then ``refuse`` is appended).
        """
        _check_reserve_args(round, run_id, max_grad_norm, delta, max_epsilon, data_fingerprint, accountant)
        if train_kind not in TRAIN_KINDS:
            raise ConfigError(
                "ledger reservation", [f"train_kind must be one of {TRAIN_KINDS}, got {train_kind!r}"]
            )
        state = self.state
        ledger_delta = state.delta if state.delta is not None else delta
        after = [*state.history(), step]
        who: dict[str, Any] = {"round": round, "run_id": run_id}
        request: dict[str, Any] = {"delta": delta, "max_epsilon": max_epsilon, "accountant": accountant}
        request |= {"noise_multiplier": step.noise_multiplier, "sample_rate": step.sample_rate}
        request |= {"steps": step.steps, "max_grad_norm": max_grad_norm}
        if reason := _order_problem(state, run_id, round):
            self.refuse(round=round, run_id=run_id, reason=reason, **request)
            raise PolicyViolationError(f"{self._ledger.path}: refused: {reason}")
        if delta != ledger_delta:
            reason = (
                f"delta={delta:g} differs from delta={ledger_delta:g} of earlier reservations; "
                "epsilons at different deltas cannot be added up"
            )
            self.refuse(round=round, run_id=run_id, reason=reason, **request)
            raise ConfigError(
                str(self._ledger.path), [f"{reason}. Fix: set the site policy's delta to {ledger_delta:g}"]
            )
        spent = state.epsilon(delta=delta, accountant=accountant)
        eps_prv = math.inf if state.release else epsilon(after, delta=delta, accountant="prv")
        eps_rdp = math.inf if state.release else epsilon(after, delta=delta, accountant="rdp")
        requested = eps_prv if accountant == "prv" else eps_rdp
        if requested > max_epsilon:
            numbers = {
                "requested_epsilon": _finite_or_none(requested),
                "spent_epsilon": _finite_or_none(spent),
            }
            why = (
                f"records were released WITHOUT differential privacy in round {state.release.round} of run "
                f"{state.release.run_id} (entry seq {state.release.seq}): epsilon is unbounded"
                if state.release
                else f"epsilon would reach {requested:.4f} (spent {spent:.4f})"
            )
            reason = f"budget exceeded: {why} > max-epsilon {max_epsilon:g} at delta {delta:g} ({accountant})"
            self.refuse(round=round, run_id=run_id, reason=reason, **request, **numbers)
            raise BudgetExceededError(budget=max_epsilon, spent=spent, requested=requested, delta=delta)
        fields = {"kind": "reserve", **who, **request, "epsilon": eps_prv, "epsilon_rdp": eps_rdp}
        fields |= {"data_fingerprint": data_fingerprint, "seeded_noise": bool(seeded_noise)}
        fields |= {"accounting": accounting_settings(), "train_kind": train_kind}
        entry = self.append(fields)
        assert isinstance(entry, Reserve)
        return entry

    def release_round(
        self, *, round: int, run_id: str, data_fingerprint: str, reason: str, train_kind: str = "sft"
    ) -> Release:
        """Record, before training, a round that trains WITHOUT differential privacy."""
        if train_kind not in TRAIN_KINDS:
            raise ConfigError(
                "ledger release", [f"train_kind must be one of {TRAIN_KINDS}, got {train_kind!r}"]
            )
        if why := _order_problem(self.state, run_id, round):
            self.refuse(round=round, run_id=run_id, reason=why)
            raise PolicyViolationError(f"{self._ledger.path}: refused: {why}")
        fields = {"kind": "release", "round": round, "run_id": run_id, "data_fingerprint": data_fingerprint}
        entry = self.append(fields | {"reason": reason, "train_kind": train_kind})
        assert isinstance(entry, Release)
        return entry

    def close(self, kind: str, *, reserve_seq: int, **fields: Any) -> Entry:
        """Append the ``commit`` or ``abort`` of an open reservation."""
        target = self.state.open(reserve_seq)
        if target is None:
            known = any(e.seq == reserve_seq and isinstance(e, Reserve | Release) for e in self.state.entries)
            why = "already committed, aborted or superseded by a retry" if known else "no such reservation"
            raise LedgerError(self._ledger.path, None, f"cannot {kind} reservation {reserve_seq}: {why}")
        return self.append(
            {"kind": kind, "reserve_seq": reserve_seq, "round": target.round}
            | {"run_id": target.run_id, **fields}
        )

    def refuse(self, *, round: int, run_id: str, reason: str, **details: Any) -> Refuse:
        """Record a refused request (spends nothing)."""
        entry = self.append({"kind": "refuse", "round": round, "run_id": run_id, "reason": reason, **details})
        assert isinstance(entry, Refuse)
        return entry


class PrivacyLedger:
    """One site's privacy ledger.

    Parameters
    ----------
    path
        The JSONL file (created on first append; its folder must exist).
    signer
        Optional ``canonical bytes -> signature``, applied to every new entry and the head record.
    verifier
        Optional ``(canonical bytes, signature) -> valid``; when given, every entry must verify.
    head_path
        The head record (outside the ledger's folder); ``None`` keeps no head (tests, read-only copies).
    site
        The site's name, written in the head record.
    """

    def __init__(
        self,
        path: Path,
        *,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
        head_path: Path | None = None,
        site: str = "",
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.signer = signer
        self._verifier = verifier
        self.head_path = head_path
        self.site = site

    # ------------------------------------------------------------------ reading
    def state(self, *, expect: tuple[int, str] | None = None) -> LedgerState:
        """The verified ledger (shared lock); ``LedgerError`` naming the problem if any check fails."""
        with locked(self.path, self.lock_path, fcntl.LOCK_SH):
            return LedgerState(self._verified(expect))

    def entries(self) -> list[Entry]:
        """All entries in file order (verified)."""
        return list(self.state().entries)

    def history(self) -> list[MechanismStep]:
        """Mechanisms of ALL reservations, committed or not (a crash mid-round still counts)."""
        return self.state().history()

    def spent(self, *, delta: float, accountant: str = "prv") -> float:
        """Cumulative epsilon of every reservation at ``delta`` (``inf`` after a non-private release)."""
        return self.state().epsilon(delta=delta, accountant=accountant)

    def verify_chain(self) -> list[str]:
        """Every problem of the file as ``path:line: problem`` (empty if intact); never raises for content."""
        with locked(self.path, self.lock_path, fcntl.LOCK_SH):
            found = walk(self.path, read_lines(self.path), self._verifier)
        return [f"{f.ledger}:{f.line}: {f.message}" for f in found.errors]

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def transaction(self, *, expect: tuple[int, str] | None = None) -> Iterator[Transaction]:
        """Exclusive access to a verified ledger; ``expect`` = ``(seq, hash)`` the coordinator last saw."""
        with locked(self.path, self.lock_path, fcntl.LOCK_EX):
            yield Transaction(self, self._verified(expect))

    def reserve(self, **kwargs: Any) -> Reserve:
        """:meth:`Transaction.reserve` in a transaction of its own."""
        with self.transaction() as tx:
            return tx.reserve(**kwargs)

    def commit(
        self, *, reserve_seq: int, update_sha256: str, num_examples: int, metrics: Mapping[str, float]
    ) -> Commit:
        """Record what a reserved round sent; ``LedgerError`` if it is not an open reservation."""
        problems = []
        if not is_sha256(update_sha256):
            problems.append("update_sha256 must be 64 lowercase hex characters")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
            problems.append(f"num_examples must be an integer >= 0, got {num_examples!r}")
        bad = [name for name, value in metrics.items() if not _finite(value)]
        if bad:
            problems.append(f"metrics {bad} must be finite numbers")
        if problems:
            raise LedgerError(self.path, None, "cannot commit: " + "; ".join(problems))
        fields = {"update_sha256": update_sha256, "num_examples": num_examples}
        fields["metrics"] = {str(k): float(v) for k, v in metrics.items()}
        with self.transaction() as tx:
            entry = tx.close("commit", reserve_seq=reserve_seq, **fields)
        assert isinstance(entry, Commit)
        return entry

    def abort(self, *, reserve_seq: int, reason: str) -> Abort:
        """Close a reservation that sent nothing (its epsilon stays counted)."""
        with self.transaction() as tx:
            entry = tx.close("abort", reserve_seq=reserve_seq, reason=reason)
        assert isinstance(entry, Abort)
        return entry

    def record_refusal(self, *, round: int, run_id: str, reason: str) -> Refuse:
        """Append a ``refuse`` entry for a request refused before any reservation."""
        with self.transaction() as tx:
            return tx.refuse(round=round, run_id=run_id, reason=reason)

    # ------------------------------------------------------------------ internals
    def _verified(self, expect: tuple[int, str] | None) -> list[Entry]:
        found = walk(self.path, read_lines(self.path), self._verifier)
        if found.errors:
            shown = "; ".join(f"line {f.line}: {f.message}" for f in found.errors[:5])
            raise LedgerError(self.path, None, f"fails verification, refusing to use it: {shown}")
        entries = found.entries
        hashes = [e.hash for e in entries]
        if self.head_path is not None:
            self._check_head(hashes)
        if expect is not None and expect[0] >= 0:
            seq, digest = expect
            if not (seq < len(hashes) and hashes[seq] == digest):
                have = f"holds {len(hashes)} entries" if hashes else "is empty or missing"
                raise LedgerError(
                    self.path,
                    None,
                    f"the coordinator last saw entry seq {seq} (hash {digest[:12]}...) of this site's "
                    "ledger, "
                    f"but the ledger {have}{' and that entry differs' if seq < len(hashes) else ''}: it was "
                    "cut, rolled back or replaced. Fix: restore the ledger from backup; a new ledger would "
                    "reset the site's privacy budget",
                )
        return entries

    def _check_head(self, hashes: list[str]) -> None:
        assert self.head_path is not None
        head = read_head(self.head_path)
        if head is None:
            if hashes:
                raise LedgerError(
                    self.path,
                    None,
                    f"the ledger holds {len(hashes)} entries but its head record {self.head_path} is "
                    "missing, so a cut end cannot be ruled out. Fix: restore the head record from backup "
                    "(or, after `fedtune audit verify` of this ledger against the coordinator's receipts, "
                    "anchor it again with `fedtune site anchor POLICY`)",
                )
            return
        problems = check_head(hashes, head, self.head_path)
        if self.signer is not None and head.signature != self.signer(canonical_bytes(head.body())):
            problems.append(f"the head record {self.head_path} is not signed with this site's ledger key")
        if head.site and self.site and head.site != self.site:
            problems.append(
                f"the head record {self.head_path} belongs to site {head.site!r}, not {self.site!r}"
            )
        if problems and head.ledger != str(self.path):
            problems.append(
                f"the head record says this site's ledger was at {head.ledger}: if the state-dir moved, "
                "point [site] state-dir back at it (or move the whole folder there)"
            )
        if problems:
            raise LedgerError(self.path, None, " ".join(problems))

    def _write_head(self, entry: Entry) -> None:
        if self.head_path is not None:
            write_head(
                self.head_path,
                site=self.site,
                ledger=self.path,
                seq=entry.seq,
                hash=entry.hash,
                signer=self.signer,
            )


def _order_problem(state: LedgerState, run_id: str, rnd: int) -> str:
    """Why round ``rnd`` of ``run_id`` may not be reserved now ('' when it may): the checker's order rule."""
    if state.committed(run_id, rnd):
        return f"run {run_id!r} already trained round {rnd}; a round is never trained twice"
    top = state.highest_round(run_id)
    if top is not None and rnd < top:
        return f"round {rnd} of run {run_id} was requested after its round {top}: rounds only go forward"
    return ""


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _check_reserve_args(
    round: int,
    run_id: str,
    max_grad_norm: float,
    delta: float,
    max_epsilon: float,
    fingerprint: str,
    accountant: str,
) -> None:
    checks = [
        (
            isinstance(round, int) and not isinstance(round, bool) and round >= 0,
            f"round must be an integer >= 0, got {round!r}",
        ),
        (isinstance(run_id, str) and bool(run_id), "run_id must be a non-empty string"),
        (_finite(max_grad_norm) and max_grad_norm > 0, f"max_grad_norm must be > 0, got {max_grad_norm!r}"),
        (_finite(delta) and 0 < delta < 1, f"delta must be in (0, 1), got {delta!r}"),
        (_finite(max_epsilon) and max_epsilon > 0, f"max_epsilon must be > 0, got {max_epsilon!r}"),
        (isinstance(fingerprint, str) and bool(fingerprint), "data_fingerprint must be a non-empty string"),
        (accountant in ACCOUNTANTS, f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("ledger reservation", problems)

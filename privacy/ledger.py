"""Append-only, hash-chained privacy ledger: one JSONL file per site.

Each round is written *before* training as a ``reserve`` entry (write-ahead), so a
crash after the reservation still counts the round as spent. After training a
``commit`` entry records what was sent; a refused request becomes a ``refuse`` entry.

Every line is one JSON object (sorted keys, compact separators) with ``seq``
(0, 1, 2, ...), ``kind``, ``time`` (UTC ISO 8601), ``prev_hash`` (the previous
entry's ``hash``; ``"0" * 64`` first) and ``hash``, the SHA-256 hex of
:func:`canonical_bytes` (the entry without ``hash`` and ``signature``). Editing a
value, deleting or reordering lines breaks the chain; truncating the *tail* needs
an outside anchor (e.g. a receipt the coordinator keeps) to be detected.

Signatures are an extension point: ``signer`` maps canonical bytes to a string
stored as ``signature``; ``verifier`` checks it. Key management lives elsewhere.

Writers hold an exclusive ``fcntl.flock`` on the sidecar ``<ledger>.lock`` while
they read, decide and append; readers hold a shared one. Each entry is written as
one full line to a descriptor opened with ``O_APPEND``, then ``os.fsync``-ed.
Nothing is ever rewritten or deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import BudgetExceededError, ConfigError, PolicyViolationError
from privacy.accounting import MechanismStep, epsilon
from privacy.ledger_checks import (
    _DONT_EDIT,
    _SHA256_HEX,
    GENESIS_HASH,
    LedgerError,
    _check_reserve_args,
    _finite,
    _int_at_least,
    canonical_bytes,
    check_lines,
    parse_entry,
)

__all__ = ["GENESIS_HASH", "LedgerError", "PrivacyLedger", "canonical_bytes"]


class PrivacyLedger:
    """One site's privacy ledger.

    Parameters
    ----------
    path
        The JSONL file (created on first append; its folder must exist).
    signer
        Optional ``canonical bytes -> signature``, applied to every new entry.
    verifier
        Optional ``(canonical bytes, signature) -> valid``; when given, every entry
        must carry a valid signature.
    """

    def __init__(
        self,
        path: Path,
        *,
        signer: Callable[[bytes], str] | None = None,
        verifier: Callable[[bytes, str], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._signer = signer
        self._verifier = verifier

    def entries(self) -> list[dict[str, Any]]:
        """All entries in file order; raises :class:`LedgerError` naming ``path:line`` if one is corrupt."""
        with self._locked(fcntl.LOCK_SH):
            return [parse_entry(self.path, n, text) for n, text in self._lines()]

    def history(self) -> list[MechanismStep]:
        """Mechanisms of ALL reservations, committed or not (a crash mid-round still counts)."""
        return self._history(self.entries())

    def spent(self, *, delta: float, accountant: str = "prv") -> float:
        """Cumulative epsilon of every reservation at ``delta``."""
        return epsilon(self.history(), delta=delta, accountant=accountant)

    def verify_chain(self) -> list[str]:
        """Check seq numbers, hash links, entry hashes, commit references and signatures.

        Returns
        -------
        list of str
            One ``path:line: problem`` message per problem; empty if the ledger is intact.
        """
        with self._locked(fcntl.LOCK_SH):
            return self._check(self._lines())[1]

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
    ) -> dict[str, Any]:
        """Reserve budget for one round before training (write-ahead).

        Parameters
        ----------
        round, run_id
            Identify the request; a run may reserve each round once.
        step
            The DP-SGD mechanism the round will run.
        max_grad_norm
            Per-sample clipping norm (recorded for auditors).
        delta
            Must equal the delta of every earlier reservation in this ledger.
        max_epsilon
            The site's budget, compared with the ``accountant``'s cumulative epsilon
            (both PRV ``epsilon`` and ``epsilon_rdp`` are recorded).
        data_fingerprint
            Identifies the exact training data.
        accountant
            ``"prv"`` or ``"rdp"``.

        Returns
        -------
        dict
            The ``reserve`` entry as written; pass its ``seq`` to :meth:`commit`.

        Raises
        ------
        BudgetExceededError
            The round would exceed ``max_epsilon`` (a ``refuse`` entry is appended).
        PolicyViolationError
            This run already trained (committed) this round (a ``refuse`` entry is appended).
            A reservation never committed (a crash) may be retried; both count.
        ConfigError
            An invalid argument, or ``delta`` differs from the ledger's (then ``refuse`` is appended).
        LedgerError
            The ledger is corrupt or fails verification; nothing is appended.
        """
        _check_reserve_args(round, run_id, max_grad_norm, delta, max_epsilon, data_fingerprint)
        epsilon([], delta=delta, accountant=accountant)  # validates the accountant name
        with self._locked(fcntl.LOCK_EX):
            entries, broken = self._check(self._lines())
            if broken:
                raise LedgerError(self.path, None, f"fails verification, refusing to train: {broken[:5]}")
            history = self._history(entries)
            after = [*history, step]
            reserved = [e for e in entries if e.get("kind") == "reserve"]
            ledger_delta = float(reserved[0]["delta"]) if reserved else delta
            request = {"round": round, "run_id": run_id, "delta": delta, "max_epsilon": max_epsilon}
            request |= {"noise_multiplier": step.noise_multiplier, "sample_rate": step.sample_rate}
            request |= {"steps": step.steps, "max_grad_norm": max_grad_norm, "accountant": accountant}

            def refuse(reason: str) -> None:
                requested = epsilon(after, delta=ledger_delta, accountant=accountant)
                spent = epsilon(history, delta=ledger_delta, accountant=accountant)
                fields = {"reason": reason, "requested_epsilon": requested, "spent_epsilon": spent}
                self._append(entries, {"kind": "refuse", **request, **fields})

            if _committed_round(entries, run_id, round):
                reason = f"run {run_id!r} already trained round {round}; a round is never trained twice"
                refuse(reason)
                raise PolicyViolationError(f"{self.path}: refused: {reason}")
            if delta != ledger_delta:
                reason = (
                    f"delta={delta:g} differs from delta={ledger_delta:g} of earlier reservations; "
                    "epsilons at different deltas cannot be added up"
                )
                refuse(reason)
                raise ConfigError(
                    str(self.path), [f"{reason}. Fix: set the site policy's delta to {ledger_delta:g}"]
                )
            eps_prv = epsilon(after, delta=delta, accountant="prv")
            eps_rdp = epsilon(after, delta=delta, accountant="rdp")
            requested = eps_prv if accountant == "prv" else eps_rdp
            if requested > max_epsilon:
                spent = epsilon(history, delta=delta, accountant=accountant)
                refuse(
                    f"budget exceeded: epsilon would reach {requested:.4f} (spent {spent:.4f}) "
                    f"> max-epsilon {max_epsilon:g} at delta {delta:g} ({accountant})"
                )
                raise BudgetExceededError(budget=max_epsilon, spent=spent, requested=requested, delta=delta)
            fields = {"epsilon": eps_prv, "epsilon_rdp": eps_rdp, "data_fingerprint": data_fingerprint}
            return self._append(entries, {"kind": "reserve", **request, **fields})

    def record_refusal(self, *, round: int, run_id: str, reason: str) -> dict[str, Any]:
        """Append a ``refuse`` entry for a request refused before any reservation.

        (Budget and duplicate-round refusals are recorded by :meth:`reserve` itself.)
        """
        with self._locked(fcntl.LOCK_EX):
            entries, broken = self._check(self._lines())
            if broken:
                raise LedgerError(self.path, None, f"fails verification, cannot record: {broken[:5]}")
            return self._append(
                entries, {"kind": "refuse", "round": round, "run_id": run_id, "reason": reason}
            )

    def commit(
        self, *, reserve_seq: int, update_sha256: str, num_examples: int, metrics: Mapping[str, float]
    ) -> dict[str, Any]:
        """Record the outcome of a reserved round; returns the ``commit`` entry as written.

        Parameters
        ----------
        reserve_seq
            ``seq`` of the entry returned by :meth:`reserve`.
        update_sha256
            SHA-256 hex digest of the update sent to the coordinator.
        num_examples
            Number of training examples.
        metrics
            Finite numbers, e.g. ``{"train_loss": 1.23}``.

        Raises
        ------
        LedgerError
            No such reservation, it is already committed, an argument is invalid,
            or the ledger fails verification.
        """
        problems = []
        if not isinstance(update_sha256, str) or not _SHA256_HEX.fullmatch(update_sha256):
            problems.append("update_sha256 must be 64 lowercase hex characters")
        if not _int_at_least(num_examples, 0):
            problems.append(f"num_examples must be an integer >= 0, got {num_examples!r}")
        bad = [name for name, value in metrics.items() if not _finite(value)]
        if bad:
            problems.append(f"metrics {bad} must be finite numbers")
        if problems:
            raise LedgerError(self.path, None, "cannot commit: " + "; ".join(problems))
        with self._locked(fcntl.LOCK_EX):
            entries, broken = self._check(self._lines())
            if broken:
                raise LedgerError(self.path, None, f"fails verification, cannot commit: {broken[:5]}")
            match = [e for e in entries if e.get("kind") == "reserve" and e.get("seq") == reserve_seq]
            if not match:
                raise LedgerError(self.path, None, f"cannot commit: no reservation with seq {reserve_seq}")
            if any(e.get("kind") == "commit" and e.get("reserve_seq") == reserve_seq for e in entries):
                raise LedgerError(
                    self.path, None, f"cannot commit: reservation {reserve_seq} already committed"
                )
            key = (match[0]["run_id"], match[0]["round"])
            if any(
                e.get("kind") == "reserve"
                and e["seq"] > reserve_seq
                and (e.get("run_id"), e.get("round")) == key
                for e in entries
            ):
                raise LedgerError(
                    self.path,
                    None,
                    f"cannot commit: reservation {reserve_seq} was superseded by a retry of "
                    f"round {key[1]} (its epsilon stays counted)",
                )
            fields = {"reserve_seq": reserve_seq, "round": match[0]["round"], "run_id": match[0]["run_id"]}
            fields |= {"update_sha256": update_sha256, "num_examples": num_examples}
            fields["metrics"] = {str(k): float(v) for k, v in metrics.items()}
            return self._append(entries, {"kind": "commit", **fields})

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        if not self.path.parent.is_dir():
            raise LedgerError(
                self.path,
                None,
                "the ledger's folder does not exist. Fix: create it or correct the ledger path "
                "(starting a new, empty ledger would reset the site's privacy budget)",
            )
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _lines(self) -> list[tuple[int, str]]:
        """``(line number, text)`` pairs; entry ``i`` is expected on line ``i + 1``."""
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            return []
        if lines[-1] == "":
            lines.pop()
        return list(enumerate(lines, start=1))

    def _check(self, lines: list[tuple[int, str]]) -> tuple[list[dict[str, Any]], list[str]]:
        """Parse and verify ``lines``; returns the readable entries and every problem found."""
        return check_lines(self.path, lines, self._verifier)

    def _history(self, entries: list[dict[str, Any]]) -> list[MechanismStep]:
        history = []
        for lineno, entry in enumerate(entries, start=1):
            if entry.get("kind") == "reserve":
                try:
                    history.append(
                        MechanismStep(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
                    )
                except (KeyError, ConfigError) as exc:
                    raise LedgerError(
                        self.path, lineno, f"invalid reservation ({exc!r}). {_DONT_EDIT}"
                    ) from exc
        return history

    def _append(self, entries: list[dict[str, Any]], fields: dict[str, Any]) -> dict[str, Any]:
        """Append one entry (one O_APPEND write of a full line, then fsync) and return it."""
        entry = {**fields, "seq": len(entries), "time": datetime.now(UTC).isoformat()}
        entry["prev_hash"] = entries[-1]["hash"] if entries else GENESIS_HASH
        body = canonical_bytes(entry)
        entry["hash"] = hashlib.sha256(body).hexdigest()
        if self._signer is not None:
            entry["signature"] = self._signer(body)
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(line.encode("ascii"))
            while view:  # one call normally writes it all; loop in case of a short write
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # make the new file's directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        entries.append(entry)
        return entry


def _committed_round(entries: list[dict[str, Any]], run_id: str, round: int) -> bool:
    """Whether ``run_id``'s ``round`` was already trained (a reservation of it was committed)."""
    committed = {e.get("reserve_seq") for e in entries if e.get("kind") == "commit"}
    return any(
        e.get("kind") == "reserve"
        and (e.get("run_id"), e.get("round")) == (run_id, round)
        and e["seq"] in committed
        for e in entries
    )

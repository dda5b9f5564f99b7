"""A ledger cannot lose entries unnoticed: its head record, and one checker for site and auditor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import PolicyViolationError
from privacy.accounting import MechanismStep
from privacy.audit import verify_ledgers
from privacy.keys import generate_keypair, load_signing_key
from privacy.ledger import LedgerError, PrivacyLedger
from privacy.ledger_checks import walk
from privacy.receipts import receipt_line

STEP = MechanismStep(1.0, 0.1, 10)
KW: dict[str, Any] = {"run_id": "run1", "step": STEP, "max_grad_norm": 1.0, "delta": 1e-5}
KW |= {"max_epsilon": 10.0, "data_fingerprint": "f" * 64}


def _site(root: Path, sign: Callable[[bytes], str] | None = None) -> PrivacyLedger:
    (root / "state").mkdir(parents=True, exist_ok=True)
    return PrivacyLedger(
        root / "state" / "ledger.jsonl", signer=sign, head_path=root / "head.json", site="s1"
    )


def _trained(ledger: PrivacyLedger, rounds: int) -> None:
    for rnd in range(1, rounds + 1):
        entry = ledger.reserve(round=rnd, **KW)
        ledger.commit(reserve_seq=entry.seq, update_sha256=f"{rnd:064x}", num_examples=5, metrics={})


def test_the_head_names_the_last_entry_after_every_write(tmp_path: Path) -> None:
    ledger = _site(tmp_path)
    _trained(ledger, 2)
    head = json.loads((tmp_path / "head.json").read_text())
    last = ledger.entries()[-1]
    assert (head["seq"], head["hash"], head["site"]) == (last.seq, last.hash, "s1")


@pytest.mark.parametrize("loss", ["deleted", "emptied", "cut", "older copy", "head missing"])
def test_a_shortened_ledger_is_never_used(tmp_path: Path, loss: str) -> None:
    ledger = _site(tmp_path)
    _trained(ledger, 1)
    older = ledger.path.read_text()
    _trained_more = ledger.reserve(round=2, **KW)  # a crash after this reservation
    assert _trained_more.seq == 2
    text = ledger.path.read_text()
    if loss == "deleted":
        ledger.path.unlink()
    elif loss == "emptied":
        ledger.path.write_text("")
    elif loss == "cut":
        ledger.path.write_text("".join(text.splitlines(keepends=True)[:-1]))  # the reservation removed
    elif loss == "older copy":
        ledger.path.write_text(older)
    else:
        (tmp_path / "head.json").unlink()
    with pytest.raises(LedgerError, match="head record"):
        ledger.reserve(round=2, **KW)
    with pytest.raises(LedgerError, match="head record"):
        ledger.state()


def test_a_moved_state_dir_names_the_old_ledger(tmp_path: Path) -> None:
    _trained(_site(tmp_path), 1)
    moved = PrivacyLedger(tmp_path / "elsewhere.jsonl", head_path=tmp_path / "head.json", site="s1")
    with pytest.raises(LedgerError, match=f"was at {tmp_path / 'state' / 'ledger.jsonl'}"):
        moved.state()


def test_a_head_record_of_another_key_or_site_is_refused(tmp_path: Path) -> None:
    keys = [load_signing_key(generate_keypair(tmp_path / k)[0]) for k in ("a", "b")]
    _trained(_site(tmp_path, keys[0].sign), 1)
    with pytest.raises(LedgerError, match="not signed with this site's ledger key"):
        _site(tmp_path, keys[1].sign).state()
    other = PrivacyLedger(
        tmp_path / "state" / "ledger.jsonl", signer=keys[0].sign, head_path=tmp_path / "head.json", site="s2"
    )
    with pytest.raises(LedgerError, match="belongs to site 's1'"):
        other.state()


def test_the_coordinators_last_view_must_be_in_the_ledger(tmp_path: Path) -> None:
    ledger = _site(tmp_path)
    _trained(ledger, 1)
    last = ledger.entries()[-1]
    assert ledger.state(expect=(last.seq, last.hash)).head == (last.seq, last.hash)
    with pytest.raises(LedgerError, match="coordinator last saw entry seq 5"):
        ledger.state(expect=(5, last.hash))
    with pytest.raises(LedgerError, match="that entry differs"):
        ledger.state(expect=(0, "0" * 64))


def test_the_auditor_sees_a_cut_reservation_through_the_head_record(tmp_path: Path) -> None:
    ledger = _site(tmp_path)
    _trained(ledger, 1)
    ledger.reserve(round=2, **KW)  # the site crashed here; the coordinator got no receipt
    copy = tmp_path / "audit" / "s1.jsonl"
    copy.parent.mkdir()
    lines = ledger.path.read_text().splitlines(keepends=True)
    copy.write_text("".join(lines[:-1]))  # handed over without the uncommitted reservation
    (tmp_path / "audit" / "s1.head.json").write_bytes((tmp_path / "head.json").read_bytes())
    receipts = tmp_path / "receipts.jsonl"
    receipts.write_text(receipt_line("s1", ledger.entries()[1].raw) + "\n")
    result = verify_ledgers([copy], receipts=receipts)
    assert [(f.check, f.seq) for f in result.findings if f.severity == "error"] == [("head", 2)]
    assert "cut from its end" in str(result.findings[0])
    (tmp_path / "audit" / "s1.head.json").unlink()
    assert verify_ledgers([copy], receipts=receipts).ok  # without the head record, a clean prefix passes


LINE_EDITS = st.sampled_from(
    ["drop", "swap", "duplicate", "edit-epsilon", "edit-round", "garbage", "truncate"]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LINE_EDITS, st.integers(0, 6)), min_size=1, max_size=3))
def test_site_and_auditor_agree_on_every_ledger(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[str, int]]
) -> None:
    """The structural verdict of the site (before a write) and of the auditor come from one checker."""
    root = tmp_path_factory.mktemp("agree")
    ledger = PrivacyLedger(root / "s1.jsonl")
    _trained(ledger, 3)
    lines = ledger.path.read_text().splitlines()
    for edit, i in edits:
        i %= max(1, len(lines))
        if not lines:
            break
        if edit == "drop":
            del lines[i]
        elif edit == "swap" and len(lines) > 1:
            lines[i], lines[i - 1] = lines[i - 1], lines[i]
        elif edit == "duplicate":
            lines.insert(i, lines[i])
        elif edit in ("edit-epsilon", "edit-round"):
            try:
                entry = json.loads(lines[i])
            except ValueError:
                continue
            key = "round" if edit == "edit-round" else "epsilon"
            if isinstance(entry, dict) and isinstance(entry.get(key), int | float):
                entry[key] = entry[key] + 1
                lines[i] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        elif edit == "garbage":
            lines[i] = "{oops"
        else:
            lines[i] = lines[i][: len(lines[i]) // 2]
    ledger.path.write_text("".join(x + "\n" for x in lines))
    site_view = {p.split(": ", 1)[0] for p in ledger.verify_chain()}  # "path:line" of each problem
    structural = {"format", "chain", "signature", "order", "commit", "delta"}
    audit = verify_ledgers([ledger.path])
    audit_view = {
        f"{f.ledger}:{f.line}"
        for f in audit.findings
        if f.severity == "error" and f.check in structural and f.line
    }
    assert site_view == audit_view
    walked = walk(ledger.path, list(enumerate(lines, start=1)))
    assert bool(walked.errors) == bool(site_view)
    if site_view:
        with pytest.raises(LedgerError):
            ledger.reserve(round=9, **KW)  # the site never writes to a ledger the auditor would fail


def test_the_writer_never_writes_what_the_checker_rejects(tmp_path: Path) -> None:
    """Regression: reserving round 1 after round 2 was written, and broke the ledger for good."""
    ledger = _site(tmp_path)
    ledger.reserve(round=2, **KW)
    with pytest.raises(PolicyViolationError, match="rounds only go forward"):
        ledger.reserve(round=1, **KW)
    assert [e.kind for e in ledger.entries()] == ["reserve", "refuse"]
    assert ledger.verify_chain() == [] and verify_ledgers([ledger.path]).ok


def test_ledger_errors_cross_process_boundaries_intact() -> None:
    """Regression: an error raised in a worker (pool, scrubber) could not be unpickled, hanging its parent."""
    import pickle

    from common.errors import BudgetExceededError, ConfigError, DataError

    for error in (
        LedgerError(Path("/l.jsonl"), 3, "corrupt"),
        ConfigError("policy.toml", ["a", "b"]),
        DataError("d.jsonl", 2, "bad", "fix it"),
        BudgetExceededError(budget=1.0, spent=0.5, requested=2.0, delta=1e-5),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)

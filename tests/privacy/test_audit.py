"""Offline ledger verification on small ledgers written by the real PrivacyLedger (no simulation)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.errors import FedtuneError
from fedtune.audit_cli import parse_pubkeys
from privacy.accounting import MechanismStep
from privacy.audit import verify_ledgers
from privacy.keys import generate_keypair, load_signer
from privacy.ledger import GENESIS_HASH, PrivacyLedger, canonical_bytes
from privacy.receipts import receipt_line

STEP = MechanismStep(1.0, 0.1, 10)


def write_ledger(path: Path, signer: Callable[[bytes], str] | None, rounds: int = 3) -> list[dict[str, Any]]:
    """A real ledger: reserve + commit for each round, as a site writes it."""
    ledger = PrivacyLedger(path, signer=signer)
    for rnd in range(1, rounds + 1):
        entry = ledger.reserve(
            round=rnd, run_id="run1", step=STEP, max_grad_norm=1.0, delta=1e-5, max_epsilon=10.0,
            data_fingerprint="f" * 64,
        )  # fmt: skip
        ledger.commit(reserve_seq=entry.seq, update_sha256=f"{rnd:064x}", num_examples=50, metrics={})
    return [dict(e.raw) for e in ledger.entries()]


def rewrite(path: Path, entries: list[dict[str, Any]], signer: Callable[[bytes], str] | None) -> None:
    """Re-chain (seq, prev_hash, hash) and re-sign edited entries, as a careful forger would."""
    prev = GENESIS_HASH
    lines = []
    for seq, entry in enumerate(entries):
        entry = {k: v for k, v in entry.items() if k not in ("hash", "signature")} | {"seq": seq}
        entry["prev_hash"] = prev
        entry["hash"] = prev = hashlib.sha256(canonical_bytes(entry)).hexdigest()
        if signer is not None:
            entry["signature"] = signer(canonical_bytes(entry))
        lines.append(json.dumps(entry, sort_keys=True, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n")


def write_receipts(run_dir: Path, site: str, entries: list[dict[str, Any]]) -> None:
    """The coordinator's receipts: a full copy of every commit it accepted."""
    rows = [receipt_line(site, e) for e in entries if e["kind"] == "commit"]
    (run_dir / "receipts.jsonl").write_text("".join(r + "\n" for r in rows))


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path, Callable[[bytes], str], list[dict[str, Any]]]:
    private, public = generate_keypair(tmp_path / "keys")
    signer = load_signer(private)
    path = tmp_path / "site-a.jsonl"
    return path, public, signer, write_ledger(path, signer)


def checks(result: Any) -> set[tuple[int | None, str]]:
    return {(f.seq, f.check) for f in result.findings if f.severity == "error"}


def test_intact_ledger_verifies(signed: Any, tmp_path: Path) -> None:
    path, public, _, entries = signed
    write_receipts(tmp_path, "site-a", entries)
    result = verify_ledgers([path], pubkeys={"site-a": public}, receipts=tmp_path)
    assert result.ok, [str(f) for f in result.findings]
    audit = result.ledgers[0]
    assert audit.receipts_checked == 3 and audit.key_fingerprint
    reserves = [e for e in audit.entries if e.kind == "reserve"]
    assert [e.round for e in reserves] == [1, 2, 3]
    for e in reserves:
        assert e.epsilon_recomputed == pytest.approx(e.parameters["epsilon"], rel=1e-2)
    json.dumps(result.to_dict())


def test_signatures_required_when_a_key_is_given(tmp_path: Path, signed: Any) -> None:
    _, public, _, _ = signed
    unsigned = tmp_path / "site-b.jsonl"
    write_ledger(unsigned, None, rounds=1)
    result = verify_ledgers([unsigned], pubkeys=public)
    assert checks(result) == {(0, "signature"), (1, "signature")}
    assert verify_ledgers([unsigned]).ok  # no key: chain and epsilon only
    missing = verify_ledgers([unsigned], pubkeys={"other-site": public})
    assert not missing.ok and "no public key given for site 'site-b'" in str(missing.findings[0])


def test_lowered_epsilon_is_caught_even_when_rehashed_and_resigned(signed: Any) -> None:
    path, public, signer, entries = signed
    entries[4]["epsilon"] *= 0.9
    rewrite(path, entries, signer)
    result = verify_ledgers([path], pubkeys=public)
    assert checks(result) == {(4, "epsilon")}
    assert "LOWER" in str(result.findings[0])
    assert f"{path}:5 entry seq 4" in str(result.findings[0])


def test_overspent_budget_and_raised_epsilon(signed: Any) -> None:
    path, _, signer, entries = signed
    for e in entries:
        if e["kind"] == "reserve":
            e["max_epsilon"] = 1.0
    entries[0]["epsilon"] *= 2  # over-reporting is conservative: a warning only
    rewrite(path, entries, signer)
    result = verify_ledgers([path])
    assert checks(result) == {(0, "budget"), (2, "budget"), (4, "budget")}
    assert any(f.severity == "warning" and f.seq == 0 for f in result.findings)


def test_round_order_and_commit_references(signed: Any) -> None:
    path, _, signer, entries = signed
    entries[2]["round"], entries[3]["round"] = 1, 1  # round 1 reserved twice
    entries[5]["reserve_seq"] = 0  # commits a reservation already committed
    rewrite(path, entries, signer)
    assert checks(verify_ledgers([path])) == {(2, "order"), (5, "commit")}


def test_retry_of_a_crashed_round_verifies_but_a_second_training_does_not(tmp_path: Path) -> None:
    path = tmp_path / "site-a.jsonl"
    ledger = PrivacyLedger(path)
    kw: dict[str, Any] = {"run_id": "run1", "step": STEP, "max_grad_norm": 1.0, "delta": 1e-5}
    kw |= {"max_epsilon": 10.0, "data_fingerprint": "f" * 64}
    ledger.reserve(round=1, **kw)  # crashed mid-training: never committed
    retry = ledger.reserve(round=1, **kw)
    ledger.commit(reserve_seq=retry.seq, update_sha256="1" * 64, num_examples=5, metrics={})
    assert checks(verify_ledgers([path])) == set()
    entries = [dict(e.raw) for e in ledger.entries()]
    forged = [*entries, {**entries[1], "seq": 3}]  # round 1 reserved again after its commit
    rewrite(path, forged, None)
    assert (3, "order") in checks(verify_ledgers([path]))  # (its copied epsilon is also wrong)
    late = [*entries, {**entries[2], "reserve_seq": 0}]  # the superseded first attempt committed late
    rewrite(path, late, None)
    assert checks(verify_ledgers([path])) == {(3, "commit")}


def test_receipt_mismatch_and_missing_receipts_file(signed: Any, tmp_path: Path) -> None:
    path, _, signer, entries = signed
    write_receipts(tmp_path, "site-a", entries)
    entries[3]["update_sha256"] = "0" * 64  # the site rewrites its ledger after the fact, re-signed
    rewrite(path, entries, signer)
    result = verify_ledgers([path], receipts=tmp_path / "receipts.jsonl")
    assert checks(result) == {(3, "receipt"), (5, "receipt")}  # the rewrite changed every later hash too
    assert "update_sha256" in str(result.findings[0])
    gone = verify_ledgers([path], receipts=tmp_path / "nowhere")
    assert not gone.ok and "cannot read the receipts file" in str(gone.findings[0])


def test_garbage_lines_and_missing_files(signed: Any, tmp_path: Path) -> None:
    path, _, _, _ = signed
    with path.open("a") as f:
        f.write("{not json\n")
    result = verify_ledgers([path, tmp_path / "absent.jsonl"])
    assert (None, "format") in checks(result)
    assert any(f.line == 7 and f.check == "format" for f in result.findings)
    assert "ledger file not found" in str(result.ledgers[1].findings[0])


def test_parse_pubkeys(tmp_path: Path) -> None:
    assert parse_pubkeys([]) is None
    assert parse_pubkeys(["k.pem"]) == Path("k.pem")
    assert parse_pubkeys(["a=ka.pem", "b=kb.pem"]) == {"a": Path("ka.pem"), "b": Path("kb.pem")}
    with pytest.raises(FedtuneError, match="SITE=FILE"):
        parse_pubkeys(["ka.pem", "b=kb.pem"])

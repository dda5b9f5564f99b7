"""Tests for privacy.ledger: write-ahead reservations, refusals, and tamper evidence."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from common.errors import BudgetExceededError, ConfigError, PolicyViolationError
from privacy import accounting
from privacy.accounting import MechanismStep, epsilon
from privacy.ledger import GENESIS_HASH, LedgerError, PrivacyLedger
from privacy.ledger_entries import Reserve, entry_hash, from_dict

DELTA = 1e-5
STEP = MechanismStep(1.0, 0.01, 100)  # epsilon: 1 round ~0.728, 2 ~0.923, 3 ~1.078 (PRV)
SHA = "ab" * 32


def _reserve(ledger: PrivacyLedger, round: int, *, max_epsilon: float = 10.0, **kw: Any) -> Reserve:
    args: dict[str, Any] = {
        "round": round,
        "run_id": "run-1",
        "step": STEP,
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "max_epsilon": max_epsilon,
        "data_fingerprint": "sha256:data",
    }
    return ledger.reserve(**(args | kw))


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "site.ledger.jsonl")


def _three_entries(ledger: PrivacyLedger) -> list[str]:
    first = _reserve(ledger, 0)
    ledger.commit(
        reserve_seq=first.raw["seq"], update_sha256=SHA, num_examples=10, metrics={"train_loss": 1.5}
    )
    _reserve(ledger, 1)
    return ledger.path.read_text().splitlines()


def test_reserve_then_commit(ledger: PrivacyLedger) -> None:
    entry = _reserve(ledger, 0)
    assert entry.raw["seq"] == 0 and entry.raw["kind"] == "reserve" and entry.raw["prev_hash"] == GENESIS_HASH
    assert entry.raw["epsilon"] == pytest.approx(epsilon([STEP], delta=DELTA))
    assert entry.raw["epsilon_rdp"] == pytest.approx(epsilon([STEP], delta=DELTA, accountant="rdp"))
    assert entry.raw["time"].endswith("+00:00")
    done = ledger.commit(reserve_seq=0, update_sha256=SHA, num_examples=12, metrics={"train_loss": 2.0})
    assert (done.raw["seq"], done.raw["kind"], done.raw["reserve_seq"], done.raw["round"]) == (
        1,
        "commit",
        0,
        0,
    )
    assert done.raw["prev_hash"] == entry.raw["hash"]
    assert [e.kind for e in ledger.entries()] == ["reserve", "commit"]
    assert ledger.verify_chain() == []
    line = ledger.path.read_text().splitlines()[0]
    assert line == json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"))


def test_history_survives_restart_and_reservations_count_without_commit(ledger: PrivacyLedger) -> None:
    _reserve(ledger, 0)
    ledger.commit(reserve_seq=0, update_sha256=SHA, num_examples=10, metrics={})
    _reserve(ledger, 1)  # "crash" before commit: must still count
    reopened = PrivacyLedger(ledger.path)
    assert reopened.history() == [STEP, STEP]
    assert reopened.spent(delta=DELTA) == pytest.approx(epsilon([STEP, STEP], delta=DELTA))
    assert reopened.spent(delta=DELTA, accountant="rdp") > reopened.spent(delta=DELTA)
    assert _reserve(reopened, 2).raw["epsilon"] == pytest.approx(epsilon([STEP] * 3, delta=DELTA))


def test_budget_refusal_is_recorded_and_explained(ledger: PrivacyLedger) -> None:
    _reserve(ledger, 0, max_epsilon=1.0)
    _reserve(ledger, 1, max_epsilon=1.0)
    with pytest.raises(BudgetExceededError) as info:
        _reserve(ledger, 2, max_epsilon=1.0)
    spent, requested = epsilon([STEP] * 2, delta=DELTA), epsilon([STEP] * 3, delta=DELTA)
    assert (info.value.budget, info.value.delta) == (1.0, DELTA)
    assert info.value.spent == pytest.approx(spent) and info.value.requested == pytest.approx(requested)
    message = str(info.value)
    assert "max-epsilon=1" in message and f"{spent:.4f}" in message and f"{requested:.4f}" in message
    refusal = ledger.entries()[-1]
    assert (
        refusal.raw["kind"] == "refuse"
        and refusal.raw["round"] == 2
        and "budget exceeded" in refusal.raw["reason"]
    )
    assert refusal.raw["requested_epsilon"] == pytest.approx(requested)
    assert refusal.raw["spent_epsilon"] == pytest.approx(spent)
    assert ledger.history() == [STEP, STEP]  # a refusal spends nothing
    assert ledger.verify_chain() == []


def test_rdp_gated_budget(ledger: PrivacyLedger) -> None:
    with pytest.raises(BudgetExceededError):  # PRV ~0.73 would fit, RDP ~1.21 does not
        _reserve(ledger, 0, max_epsilon=1.0, accountant="rdp")
    assert _reserve(ledger, 0, max_epsilon=1.0).raw["accountant"] == "prv"


def test_a_trained_round_is_never_trained_again(ledger: PrivacyLedger) -> None:
    first = _reserve(ledger, 0)
    ledger.commit(reserve_seq=first.raw["seq"], update_sha256=SHA, num_examples=10, metrics={})
    with pytest.raises(PolicyViolationError, match="already trained round 0"):
        _reserve(ledger, 0)
    assert ledger.entries()[-1].raw["kind"] == "refuse"
    assert _reserve(ledger, 0, run_id="run-2").raw["kind"] == "reserve"  # another run may train round 0
    assert len(ledger.history()) == 2


def test_a_crashed_round_may_be_retried_and_both_reservations_count(ledger: PrivacyLedger) -> None:
    crashed = _reserve(ledger, 0)  # the process died before committing
    retry = _reserve(ledger, 0)
    assert ledger.history() == [STEP, STEP]  # the crashed attempt stays spent
    assert retry.raw["epsilon"] == pytest.approx(epsilon([STEP, STEP], delta=DELTA))
    with pytest.raises(LedgerError, match="superseded by a retry"):  # a late commit of the first attempt
        ledger.commit(reserve_seq=crashed.raw["seq"], update_sha256=SHA, num_examples=10, metrics={})
    ledger.commit(reserve_seq=retry.raw["seq"], update_sha256=SHA, num_examples=10, metrics={})
    assert ledger.verify_chain() == []


def test_changing_delta_is_refused(ledger: PrivacyLedger) -> None:
    _reserve(ledger, 0)
    with pytest.raises(ConfigError, match="set the site policy's delta to 1e-05"):
        _reserve(ledger, 1, delta=1e-6)
    assert ledger.entries()[-1].raw["kind"] == "refuse"
    assert len(ledger.history()) == 1


@pytest.mark.parametrize(
    ("kw", "fragment"), [({"round": -1}, "round"), ({"run_id": ""}, "run_id"), ({"delta": 2.0}, "delta")]
)
def test_invalid_reservation_writes_nothing(ledger: PrivacyLedger, kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        _reserve(ledger, **({"round": 0} | kw))
    assert not ledger.path.exists()


def test_commit_errors(ledger: PrivacyLedger) -> None:
    _reserve(ledger, 0)
    with pytest.raises(LedgerError, match="no such reservation"):
        ledger.commit(reserve_seq=5, update_sha256=SHA, num_examples=1, metrics={})
    with pytest.raises(LedgerError, match="64 lowercase hex"):
        ledger.commit(reserve_seq=0, update_sha256="xyz", num_examples=1, metrics={})
    with pytest.raises(LedgerError, match="finite"):
        ledger.commit(reserve_seq=0, update_sha256=SHA, num_examples=1, metrics={"loss": float("nan")})
    ledger.commit(reserve_seq=0, update_sha256=SHA, num_examples=1, metrics={})
    with pytest.raises(LedgerError, match="already committed"):
        ledger.commit(reserve_seq=0, update_sha256=SHA, num_examples=1, metrics={})


def test_edited_value_is_detected_and_blocks_training(ledger: PrivacyLedger) -> None:
    lines = _three_entries(ledger)
    entry = json.loads(lines[0])
    entry["noise_multiplier"] = 50.0  # pretend the round was much more private
    lines[0] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    ledger.path.write_text("\n".join(lines) + "\n")
    problems = ledger.verify_chain()
    assert any(p.startswith(f"{ledger.path}:1: hash does not match") for p in problems)
    with pytest.raises(LedgerError, match="fails verification"):
        _reserve(ledger, 2)


def test_deleted_line_is_detected(ledger: PrivacyLedger) -> None:
    lines = _three_entries(ledger)
    ledger.path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    problems = ledger.verify_chain()
    assert any("seq is 2, expected 1" in p for p in problems)
    assert any("prev_hash does not match" in p for p in problems)


def test_swapped_lines_are_detected(ledger: PrivacyLedger) -> None:
    lines = _three_entries(ledger)
    ledger.path.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    problems = ledger.verify_chain()
    assert any(p.startswith(f"{ledger.path}:2: seq is 2") for p in problems)
    assert any(p.startswith(f"{ledger.path}:3: seq is 1") for p in problems)


def test_corrupt_line_names_path_and_line(ledger: PrivacyLedger) -> None:
    lines = _three_entries(ledger)
    ledger.path.write_text("\n".join([*lines, '{"seq": 3, "kind": "res']) + "\n")
    with pytest.raises(LedgerError, match="line 4: corrupt entry"):
        ledger.entries()
    assert any(p.startswith(f"{ledger.path}:4: corrupt entry") for p in ledger.verify_chain())


def test_missing_folder_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="folder does not exist"):
        PrivacyLedger(tmp_path / "nope" / "ledger.jsonl").history()


def test_signature_extension_point(ledger: PrivacyLedger) -> None:
    key = b"test-key"

    def sign(body: bytes) -> str:
        return hmac.new(key, body, hashlib.sha256).hexdigest()

    def check(body: bytes, signature: str) -> bool:
        return hmac.compare_digest(sign(body), signature)

    signed = PrivacyLedger(ledger.path, signer=sign, verifier=check)
    assert "signature" in _reserve(signed, 0).raw
    assert signed.verify_chain() == []
    assert PrivacyLedger(ledger.path, verifier=lambda body, sig: False).verify_chain() != []
    _reserve(ledger, 1)  # unsigned entry
    assert any("entry is not signed" in p for p in signed.verify_chain())


def _reserve_in_child(path: str, run: int) -> str:
    accounting._epsilon_cached.cache_clear()  # widen the read-decide-append window
    try:
        _reserve(PrivacyLedger(Path(path)), 0, max_epsilon=1.0, run_id=f"run-{run}")
    except BudgetExceededError:
        return "refused"
    return "reserved"


def test_concurrent_reservations_never_overspend(ledger: PrivacyLedger) -> None:
    # forkserver, not fork: this process may hold Ray/gRPC threads (a forked child can inherit their
    # locks); an executor, not multiprocessing.Pool, whose terminate() can spin forever at exit
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=4, mp_context=context) as pool:
        outcomes = list(pool.map(_reserve_in_child, [str(ledger.path)] * 4, range(4)))
    assert sorted(outcomes) == ["refused", "refused", "reserved", "reserved"]  # 2 rounds fit in 1.0
    assert ledger.verify_chain() == []
    assert ledger.spent(delta=DELTA) <= 1.0


def test_the_training_kind_is_recorded_and_checked(ledger: PrivacyLedger) -> None:
    """Every kind spends the one budget; an entry without a kind is an older sft round."""
    cpt = _reserve(ledger, 0, train_kind="cpt")
    assert cpt.train_kind == "cpt" and cpt.raw["train_kind"] == "cpt"
    with pytest.raises(ConfigError, match="train_kind must be one of"):
        _reserve(ledger, 1, train_kind="rlhf")
    legacy = {k: v for k, v in cpt.raw.items() if k not in ("train_kind", "hash")}
    legacy["hash"] = entry_hash(legacy)
    entry, problems = from_dict(legacy)
    assert not problems and isinstance(entry, Reserve) and entry.train_kind == "sft"
    bad = dict(legacy, train_kind="rlhf")
    assert from_dict(bad)[1] == ["'train_kind' must be one of sft, cpt, dpo, got 'rlhf'"]
    second = _reserve(ledger, 1)
    assert second.raw["epsilon"] > cpt.raw["epsilon"]  # the sft round adds to the cpt round's epsilon

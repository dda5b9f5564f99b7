"""The site's budget cannot be reset, burned or forged by a coordinator or a careless admin.

Every case goes through the real ClientApp handler (``handle_train``) with the request record a
coordinator could send, and reads the ledger file as an auditor would. Cases 1, 2, 4, 7 and 8 of
issue #11 ("What is wrong today"); the coordinator-side cases are in tests/server/test_hostile_sites.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord

from privacy.audit import verify_ledgers
from tests.client.hostile import Site, reason, status

# ---------------------------------------------------------------- 1. a lost ledger is not a fresh budget


@pytest.mark.parametrize("loss", ["deleted", "emptied", "state-dir changed", "rolled back"])
def test_a_lost_ledger_is_never_a_fresh_budget(
    fresh_site: Site, start_adapter: ArrayRecord, loss: str
) -> None:
    assert status(fresh_site.ask(start_adapter, 1)) == "trained"
    old = fresh_site.ledger.read_text()
    assert status(fresh_site.ask(start_adapter, 2)) == "trained"
    if loss == "deleted":
        fresh_site.ledger.unlink()
    elif loss == "emptied":
        fresh_site.ledger.write_text("")
    elif loss == "rolled back":  # an older copy of the ledger put back
        fresh_site.ledger.write_text(old)
    else:
        fresh_site.write_policy(state_dir="state-new")
    before = fresh_site.ledger.read_text() if fresh_site.ledger.is_file() else None
    reply = fresh_site.ask(start_adapter, 3)
    assert status(reply) == "error"
    why = reason(reply)
    assert "restore" in why.lower() and ("head record" in why or "state-dir" in why), why
    assert (
        fresh_site.ledger.read_text() if fresh_site.ledger.is_file() else None
    ) == before  # nothing written
    assert not (fresh_site.root / "state-new" / "ledger.jsonl").exists()


def test_a_cut_reservation_of_a_crashed_round_is_detected(
    fresh_site: Site, start_adapter: ArrayRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert status(fresh_site.ask(start_adapter, 1)) == "trained"
    monkeypatch.setenv("FEDTUNE_FAULTS", "s1:raise@2")
    with pytest.raises(Exception, match="injected crash"):  # killed after its reservation
        fresh_site.ask(start_adapter, 2)
    monkeypatch.delenv("FEDTUNE_FAULTS")
    assert fresh_site.kinds() == ["reserve", "commit", "reserve"]
    lines = fresh_site.ledger.read_text().splitlines()
    fresh_site.ledger.write_text("\n".join(lines[:-1]) + "\n")  # the uncommitted reservation cut off
    reply = fresh_site.ask(start_adapter, 3)
    assert status(reply) == "error" and "cut from its end" in reason(reply)
    assert fresh_site.kinds() == ["reserve", "commit"]


def test_the_coordinator_view_catches_a_ledger_reset_with_its_head(
    fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    assert status(fresh_site.ask(start_adapter, 1)) == "trained"
    last = fresh_site.entries()[-1]
    fresh_site.ledger.unlink()
    (fresh_site.root / "policy.ledger-head.json").unlink()  # both gone: only the coordinator remembers
    reply = fresh_site.ask(start_adapter, 2, **{"ledger-seq": last["seq"], "ledger-hash": last["hash"]})
    assert status(reply) == "error" and "coordinator last saw entry seq 1" in reason(reply)
    assert fresh_site.entries() == []


# ------------------------------------------------------- 2. requests that cannot succeed reserve nothing


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        ({"learning-rate": -0.5}, "'learning-rate'"),
        ({"learning-rate": math.nan}, "'learning-rate'"),
        ({"learning-rate": 1e30}, "'learning-rate'"),
        ({"learning-rate": 5.0}, "max-learning-rate"),
        ({"noise-multiplier": -1.0}, "'noise-multiplier'"),
        ({"local-steps": 0}, "'local-steps'"),
        ({"batch-size": -3}, "'batch-size'"),
        ({"max-grad-norm": 0.0}, "'max-grad-norm'"),
        ({"lora-rank": 0}, "'lora-rank'"),
        ({"lora-targets": "no_such_module"}, "does not fit the base model"),
        ({"lora-targets": ""}, "'lora-targets'"),
        ({"max-seq-len": 0}, "'max-seq-len'"),
        ({"max-seq-len": 100_000}, "max-seq-len"),
        ({"server-round": 5, "num-rounds": 3}, "past 'num-rounds'"),
        ({"run-id": "../../etc"}, "'run-id'"),
    ],
)
def test_requests_outside_their_domain_are_refused_before_any_reservation(
    shared_site: Site, start_adapter: ArrayRecord, request_: dict[str, Any], why: str
) -> None:
    before = len(shared_site.kinds())
    for _ in range(2):  # retried: still nothing reserved
        reply = shared_site.ask(start_adapter, 1, **request_)
        assert status(reply) == "refused", reply
        assert why in reason(reply)
    assert shared_site.kinds()[before:] == ["refuse"] * 2


def test_a_non_finite_global_adapter_is_refused_before_any_reservation(
    fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    poisoned = ArrayRecord({k: v for k, v in start_adapter.items()})
    key = next(iter(poisoned))
    bad = poisoned[key].numpy().copy()
    bad.flat[0] = math.inf
    poisoned[key] = type(poisoned[key])(bad)
    reply = fresh_site.ask(poisoned, 1)
    assert status(reply) == "refused" and "NaN or infinite" in reason(reply)
    assert fresh_site.kinds() == ["refuse"]


def test_batch_one_with_one_step_never_burns_budget(fresh_site: Site, start_adapter: ArrayRecord) -> None:
    """Half of such rounds used to have an empty Poisson batch: NaN loss, commit refused, budget gone."""
    for rnd in range(1, 7):
        reply = fresh_site.ask(
            start_adapter, 1, run=f"tiny{rnd}", **{"batch-size": 1, "local-steps": 1, "noise-multiplier": 1.0}
        )
        assert status(reply) == "trained"
    kinds = fresh_site.kinds()
    assert kinds == ["reserve", "commit"] * 6


def test_retries_of_a_crashing_round_are_bounded(
    fresh_site: Site, start_adapter: ArrayRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTUNE_FAULTS", "s1:raise@1")
    for _ in range(2):  # the first try and the one retry the default policy allows
        with pytest.raises(Exception, match="injected crash"):
            fresh_site.ask(start_adapter, 1)
    reply = fresh_site.ask(start_adapter, 1)
    assert status(reply) == "refused" and "max-round-retries" in reason(reply)
    assert fresh_site.kinds() == ["reserve", "reserve", "refuse"]


# ---------------------------------------------------------------- 4. rounds only go forward


def test_a_lower_round_after_a_higher_one_is_refused_and_the_ledger_stays_valid(
    fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    assert status(fresh_site.ask(start_adapter, 3)) == "trained"
    reply = fresh_site.ask(start_adapter, 2)
    assert status(reply) == "refused" and "rounds only go forward" in reason(reply)
    assert fresh_site.kinds() == ["reserve", "commit", "refuse"]
    assert verify_ledgers([fresh_site.ledger]).ok


# ---------------------------------------------------------------- 7. the noise is the site's


def test_a_coordinators_seed_is_refused_unless_the_site_opted_in(
    fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    reply = fresh_site.ask(start_adapter, 1, seed=7)
    assert status(reply) == "refused" and "allow-seeded-noise" in reason(reply)
    assert fresh_site.kinds() == ["refuse"]


def test_seeded_noise_is_recorded_and_reported_as_not_private(
    fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    fresh_site.write_policy(allow_seeded_noise=True)
    assert status(fresh_site.ask(start_adapter, 1, seed=7)) == "trained"
    reserve = fresh_site.entries()[0]
    assert reserve["kind"] == "reserve" and reserve["seeded_noise"] is True
    audit = verify_ledgers([fresh_site.ledger])
    assert not audit.ok and [f.check for f in audit.findings if f.severity == "error"] == ["not-private"]


def test_two_runs_with_the_same_coordinator_seed_do_not_share_noise_by_default(
    tmp_path: Path, hostile_data: Path, tiny_model: Path, start_adapter: ArrayRecord
) -> None:
    digests = []
    for name in ("a", "b"):
        s = Site(tmp_path / name, hostile_data, tiny_model)
        reply = s.ask(start_adapter, 1)  # no seed: noise from the OS
        digests.append(s.entries()[-1].get("update_sha256"))
        assert status(reply) == "trained"
    assert digests[0] != digests[1]


# ---------------------------------------------------------------- 8. a non-private round is in the ledger


def test_a_non_private_round_is_recorded_and_spends_the_records(
    fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    fresh_site.write_policy(allow_non_private=True)
    assert status(fresh_site.ask(start_adapter, 1, dp=False)) == "trained"
    assert fresh_site.kinds() == ["release", "commit"]
    reply = fresh_site.ask(start_adapter, 2)  # a DP round after it
    assert status(reply) == "refused" and "released WITHOUT differential privacy" in reason(reply)
    assert (
        "epsilon" not in reply.content.metric_records["metrics"]
        and reply.content.metric_records["metrics"]["private"] == 0.0
    )
    audit = verify_ledgers([fresh_site.ledger])
    assert any(f.check == "not-private" for f in audit.findings) and not audit.ok
    assert audit.ledgers[0].epsilon == math.inf

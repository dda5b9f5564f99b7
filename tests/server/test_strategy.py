"""Reply triage at the coordinator: only well-formed, signed, identified updates are averaged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import server.strategy as strategy_module
from common.arrays import encode, to_record
from common.errors import ConfigError
from privacy.keys import generate_keypair, load_signing_key
from server.registry import SiteRegistry
from server.strategy import SiteLevelDP, build_strategy, capped_weights
from tests.server.replies import TEMPLATE, edit, error_reply, guard, refused, rows, trained


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def test_only_valid_updates_are_averaged() -> None:
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in TEMPLATE.items()}
    wrong_shape = {"a.lora_A.weight": torch.zeros(3, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    extra = {**TEMPLATE, "model.embed_tokens.weight": torch.zeros(8, 4)}
    replies = [
        trained(1, 1.0, n=10),
        trained(2, 4.0, n=30),
        trained(3, 0.0, arrays=to_record(nan_state)),
        trained(4, 0.0, arrays=to_record(wrong_shape)),
        trained(5, 0.0, arrays=to_record(extra)),
        refused(6),
        error_reply(7, "data.jsonl:3: not valid JSON"),
        trained(8, 9.0, receipt_of=to_record(TEMPLATE)),  # update swapped after the site signed
    ]
    g = guard()
    arrays, _ = g.aggregate_train(1, replies)
    assert arrays is not None
    for a in arrays.values():  # weighted mean of the two valid updates: (1*10 + 4*30) / 40
        np.testing.assert_allclose(a.numpy(), 3.25)
    status = rows(g)
    assert status["s1"][0] == status["s2"][0] == "trained"
    assert status["s3"] == ("rejected", "'a.lora_A.weight' holds NaN or infinite values")  # the first found
    assert "shape (3, 4)" in status["s4"][1]
    assert "unexpected keys ['model.embed_tokens.weight']" in status["s5"][1]
    assert status["s6"] == ("refused", "privacy budget exhausted")
    assert status["node-7"] == ("failed", "data.jsonl:3: not valid JSON")
    assert status["s8"] == ("rejected", "the update does not match the ledger receipt sent with it")


def test_updates_in_a_16_bit_wire_dtype_are_checked_then_averaged_in_float32() -> None:
    def state(value: float) -> dict[str, torch.Tensor]:
        return {k: torch.full_like(v, value) for k, v in TEMPLATE.items()}

    liar = encode(state(2.0), "float32")  # float32 bytes under the name bfloat16
    forged = ArrayRecord({k: Array("bfloat16", a.shape, a.stype, a.data) for k, a in liar.items()})
    replies = [
        trained(1, arrays=encode(state(1.0), "bfloat16"), n=10),
        trained(2, arrays=encode(state(4.0), "bfloat16"), n=30),
        trained(3, arrays=encode(state(2.0), "float32")),
        trained(4, arrays=forged),
    ]
    g = guard(wire="bfloat16")
    arrays, _ = g.aggregate_train(1, replies)
    assert arrays is not None
    for a in arrays.values():
        assert a.dtype == "float32"
        np.testing.assert_allclose(a.numpy(), 3.25)  # 1.0 and 4.0 are exact in bfloat16
    status = rows(g)
    assert status["s1"][0] == status["s2"][0] == "trained"
    assert status["s3"][0] == "rejected" and "dtype float32, expected bfloat16" in status["s3"][1]
    assert status["s4"][0] == "rejected" and "not the bfloat16 (2, 4) it declares" in status["s4"][1]


def test_no_valid_update_keeps_global_model() -> None:
    g = guard()
    assert g.aggregate_train(1, [error_reply(1, "crash")]) == (None, None)
    assert g.rows[0].status == "failed"


def test_site_level_dp_clips_each_site_and_accounts_separately() -> None:
    g = guard(site_dp=SiteLevelDP(1.0, 0.5, 1e-3), sites=2)
    wrapper = g.inner
    wrapper.current_arrays = to_record(TEMPLATE)  # type: ignore[attr-defined]  # set by configure_train
    wrapper._pending_events[1] = None  # type: ignore[attr-defined]  # no sampling in this unit test
    torch.manual_seed(0)
    # the sites' sizes differ (10 vs 30): under site-level DP both weigh the same, so Flower's
    # accounted aggregation accepts them (it refuses unequal weights)
    arrays, _ = g.aggregate_train(1, [trained(1, 10.0, n=10), trained(2, 0.01, n=30)])
    assert arrays is not None and not g.failure
    flat = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    # each update is clipped to L2 0.5 before averaging, so the huge one cannot dominate
    # (noise std = 1.0 * 0.5 / 2 per coordinate); unclipped its mean alone would be 5.0
    assert np.abs(flat).mean() < 1.5


def test_malformed_and_malicious_updates_are_rejected() -> None:
    """The fault-injection list: NaN, wrong shape, 100x norm, replayed round, absurd num-examples."""
    nan = to_record({k: torch.full_like(v, float("nan")) for k, v in TEMPLATE.items()})
    wrong = to_record({"a.lora_A.weight": torch.zeros(3, 4), "a.lora_B.weight": torch.zeros(4, 2)})
    replies = [
        trained(1, 0.1, rnd=2),  # honest: norm 0.1 * 4 = 0.4
        trained(2, 0.0, arrays=nan, rnd=2),
        trained(3, 0.0, arrays=wrong, rnd=2),
        trained(4, 10.0, rnd=2),  # 100x the honest norm
        trained(5, 0.1, rnd=1),  # last round's update sent again
        trained(6, 0.1, n=0, rnd=2),
    ]
    g = guard(max_update_norm=5.0)
    g._round = 2
    g.aggregate_train(2, replies)
    reasons = {r.site: r.reason for r in g.rows if r.status == "rejected"}
    assert [r.site for r in g.rows if r.status == "trained"] == ["s1"]
    assert "NaN" in reasons["s2"] and "shape (3, 4)" in reasons["s3"]
    assert "exceeds the bound max-update-norm=5" in reasons["s4"]
    assert "replayed" in reasons["s5"] and "num-examples 0" in reasons["s6"]


def test_trimmed_mean_resists_one_sign_flipping_site() -> None:
    honest = [trained(i, 1.0 + 0.01 * i) for i in (1, 2, 3, 4)]
    arrays, _ = guard(aggregation="trimmed-mean", sites=5).aggregate_train(1, [*honest, trained(5, -50.0)])
    assert arrays is not None
    for a in arrays.values():
        assert np.all(a.numpy() > 0.9)  # the flipped site is trimmed away
    honest = [trained(i, 1.0 + 0.01 * i) for i in (1, 2, 3, 4)]
    plain, _ = guard(sites=5).aggregate_train(1, [*honest, trained(5, -50.0)])
    assert plain is not None and all(
        np.all(a.numpy() < 0) for a in plain.values()
    )  # FedAvg alone is poisoned


def test_site_level_dp_needs_fedavg() -> None:
    with pytest.raises(ConfigError, match="needs 'aggregation' = 'fedavg'"):
        build_strategy(
            min_sites=1,
            fraction_train=1.0,
            sites_expected=3,
            site_dp=SiteLevelDP(1.0, 1.0, 1e-3),
            aggregation="median",
        )


def _extra_metric(c: RecordDict) -> None:
    c.metric_records["metrics"]["loss-of-my-choosing"] = 1.0


def _second_metric_record(c: RecordDict) -> None:
    c["more"] = MetricRecord({"x": 1.0})


def _nan_metric(c: RecordDict) -> None:
    c.metric_records["metrics"]["train-loss"] = float("nan")


def _no_metric(c: RecordDict) -> None:
    del c.metric_records["metrics"]["steps"]


def _weight_key(c: RecordDict) -> None:
    c.metric_records["metrics"]["site-weight"] = 2.0


def _other_kind(c: RecordDict) -> None:
    c.config_records["site"]["train-kind"] = "cpt"


def _unknown_kind(c: RecordDict) -> None:
    c.config_records["site"]["train-kind"] = "rlhf"


def _no_receipt_hash(c: RecordDict) -> None:
    c["receipt"] = ConfigRecord({"entry": '{"kind": "commit", "round": 1, "run_id": "r", "seq": 1}'})


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_extra_metric, "unexpected metric keys"),
        (_second_metric_record, "unexpected metric record"),
        (_nan_metric, "not finite numbers"),
        (_no_metric, "missing metric keys ['steps']"),
        (_weight_key, "unexpected metric keys ['site-weight']"),
        (_no_receipt_hash, "does not match its own hash"),
        (_other_kind, "the site trained cpt but the run asked for sft"),
        (_unknown_kind, "unknown train-kind 'rlhf'"),
    ],
)
def test_one_bad_reply_is_rejected_and_the_round_aggregates_the_rest(change: object, why: str) -> None:
    """Used to make Flower's aggregation raise (InconsistentMessageReplies) after every site had spent."""
    g = guard(site_dp=None)
    bad = edit(trained(3, 0.5), change)  # type: ignore[arg-type]
    arrays, _ = g.aggregate_train(1, [trained(1, 1.0), trained(2, 1.0), bad])
    assert arrays is not None and not g.failure
    np.testing.assert_allclose(next(iter(arrays.values())).numpy(), 1.0)
    status, reason = rows(g)["s3"]
    assert status == "rejected" and why in reason, reason


def test_unequal_site_weight_under_site_level_dp_cannot_crash_the_round() -> None:
    g = guard(site_dp=SiteLevelDP(1.0, 1.0, 1e-3), sites=2)
    g.inner.current_arrays = to_record(TEMPLATE)  # type: ignore[attr-defined]
    g.inner._pending_events[1] = None  # type: ignore[attr-defined]
    arrays, _ = g.aggregate_train(1, [trained(1, 0.1, n=1), trained(2, 0.1, n=10**8)])
    assert arrays is not None and not g.failure


def test_a_huge_num_examples_claim_is_capped_by_the_weight_share() -> None:
    g = guard(max_weight_share=0.5)
    arrays, _ = g.aggregate_train(
        1, [trained(1, 0.0, n=100), trained(2, 0.0, n=100), trained(3, 9.0, n=10**8)]
    )
    assert arrays is not None
    np.testing.assert_allclose(next(iter(arrays.values())).numpy(), 4.5, rtol=1e-6)  # at most half the weight
    assert capped_weights([1, 1, 1], 0.5) == [1, 1, 1]
    np.testing.assert_allclose(capped_weights([1, 1, 98], 0.5), [25, 25, 50])
    np.testing.assert_allclose(capped_weights([1, 3], 0.5), [2, 2])


def test_a_node_may_not_speak_for_another_site(tmp_path: Path) -> None:
    registry = SiteRegistry(None, {}, {})
    g = guard(registry=registry)
    g.aggregate_train(1, [trained(1, 0.1, site="alpha"), trained(2, 0.1, site="beta")])
    assert registry.names == {"1": "alpha", "2": "beta"}
    g._round = 2
    g.aggregate_train(
        2, [trained(1, 0.1, site="beta", rnd=2, seq=3), trained(3, 0.1, site="alpha", rnd=2, seq=3)]
    )
    status = {r.node_id: (r.status, r.reason) for r in g.rows}
    assert status[1][0] == "rejected" and "spoke as site 'alpha'" in status[1][1]
    assert status[3][0] == "rejected" and "already node 1" in status[3][1]


def test_signed_receipts_bind_a_site_to_its_key(tmp_path: Path) -> None:
    keys = [load_signing_key(generate_keypair(tmp_path / name)[0]) for name in ("k1", "k2")]
    registry = SiteRegistry(tmp_path / "federation.json", {}, {})
    g = guard(registry=registry)
    g.aggregate_train(1, [trained(1, 0.1, key=keys[0].public_pem, sign=keys[0].sign)])
    assert rows(g)["s1"][0] == "trained"
    registry.save()
    unsigned = trained(1, 0.1, rnd=1, seq=2, key=keys[0].public_pem)  # key sent, receipt not signed
    g.aggregate_train(1, [unsigned])
    assert "not signed" in rows(g)["s1"][1]
    later = guard(
        registry=SiteRegistry(tmp_path / "federation.json", {}, {})
    )  # a later run of the federation
    later.aggregate_train(1, [trained(7, 0.1, site="s1", seq=5, key=keys[1].public_pem, sign=keys[1].sign)])
    assert "changed its ledger key" in later.rows[0].reason and later.rows[0].site == "node-7"


def test_a_site_whose_ledger_went_backwards_is_flagged(tmp_path: Path) -> None:
    registry = SiteRegistry(tmp_path / "federation.json", {}, {})
    g = guard(registry=registry)
    g.aggregate_train(1, [trained(1, 0.1, seq=9, epsilon=6.0)])
    g._round = 2
    g.aggregate_train(2, [trained(1, 0.1, rnd=2, seq=3, epsilon=1.0)])  # a fresh ledger: seq 3, epsilon 1
    status, reason = rows(g)["s1"]
    assert status == "rejected" and "went backwards" in reason
    assert registry.flags["s1"]
    g._round = 3
    g.aggregate_train(3, [trained(1, 0.1, rnd=3, seq=12, epsilon=2.0)])
    assert "epsilon 2.0000 is below the 6.0000" in rows(g)["s1"][1]


@pytest.mark.parametrize("aggregation", ["fedavg", "median"])
def test_a_crash_inside_aggregation_is_reported_not_raised(
    aggregation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = guard(aggregation=aggregation)

    def boom(*_: object) -> None:
        raise RuntimeError("aggregation bug")

    if g.streams:  # plain FedAvg is folded from the round's store, not by the inner strategy
        monkeypatch.setattr(strategy_module, "fedavg", boom)
    else:
        g.inner.aggregate_train = boom  # type: ignore[method-assign,assignment]
    assert g.aggregate_train(1, [trained(1, 0.1)]) == (None, None)
    assert "aggregation bug" in g.failure


def _evaluated(node: int, **metrics: float) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({"eval-loss": 2.0, "num-examples": 40, **metrics}),
            "site": ConfigRecord({"name": f"s{node}", "status": "evaluated"}),
        }
    )
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="evaluate"))


def test_an_evaluation_reports_its_bounded_sample_and_a_bad_one_is_rejected() -> None:
    g = guard()
    g.aggregate_evaluate(
        1,
        [
            _evaluated(1, **{"eval-records": 32.0, "eval-loss-stderr": 0.05}),
            _evaluated(2, **{"eval-records": 2.5}),
            _evaluated(3, **{"eval-loss-stderr": -1.0}),
        ],
    )
    got = {r.site: r for r in g.rows}
    assert got["s1"].status == "evaluated"
    assert got["s1"].metrics["eval-records"] == 32 and got["s1"].metrics["eval-loss-stderr"] == 0.05
    for bad in ("s2", "s3"):
        assert got[bad].status == "rejected" and "eval-records must be a positive count" in got[bad].reason

"""Reply triage at the coordinator: only well-formed updates are averaged."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.arrays import spec_of, to_record, update_sha256
from server.strategy import SiteLevelDP, UpdateRules, build_strategy, triage_train

TEMPLATE = {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _reply(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    ask = Message(RecordDict(), dst_node_id=node, message_type="train")
    if error is not None:
        return Message(Error(code=4001, reason=error), reply_to=ask)
    assert content is not None
    return Message(content, reply_to=ask)


def _trained(
    node: int,
    value: float,
    n: int = 10,
    arrays: ArrayRecord | None = None,
    receipt_of: ArrayRecord | None = None,
    receipt_round: int = 1,
) -> Message:
    state = {k: torch.full_like(v, value) for k, v in TEMPLATE.items()}
    arrays = arrays if arrays is not None else to_record(state)
    digest = update_sha256(receipt_of if receipt_of is not None else arrays)
    return _reply(
        node,
        RecordDict(
            {
                "arrays": arrays,
                "receipt": ConfigRecord(
                    {
                        "seq": 1,
                        "hash": "ab" * 32,
                        "update_sha256": digest,
                        "round": receipt_round,
                        "run_id": "r",
                    }
                ),
                "metrics": MetricRecord({"num-examples": n, "epsilon": 1.0}),
                "site": ConfigRecord({"name": f"s{node}", "status": "trained", "reason": ""}),
            }
        ),
    )


def _fedavg() -> object:
    return build_strategy(min_sites=1, fraction_train=1.0, sites_expected=2, site_dp=None)[0]


def test_only_valid_updates_are_averaged() -> None:
    template = spec_of(to_record(TEMPLATE))
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in TEMPLATE.items()}
    wrong_shape = {"a.lora_A.weight": torch.zeros(3, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    extra = {**TEMPLATE, "model.embed_tokens.weight": torch.zeros(8, 4)}
    refused = _reply(
        6,
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 0, "epsilon": 7.9}),
                "site": ConfigRecord(
                    {"name": "s6", "status": "refused", "reason": "privacy budget exhausted"}
                ),
            }
        ),
    )
    replies = [
        _trained(1, 1.0, n=10),
        _trained(2, 4.0, n=30),
        _trained(3, 0.0, arrays=to_record(nan_state)),
        _trained(4, 0.0, arrays=to_record(wrong_shape)),
        _trained(5, 0.0, arrays=to_record(extra)),
        refused,
        _reply(7, error="data.jsonl:3: not valid JSON"),
        _trained(8, 9.0, receipt_of=to_record(TEMPLATE)),  # update swapped after the site signed
    ]
    accepted, infos = triage_train(1, replies, UpdateRules(template, 1, "r"))
    arrays, _ = _fedavg().aggregate_train(1, accepted)  # type: ignore[attr-defined]
    assert arrays is not None
    # weighted mean of the two valid updates: (1*10 + 4*30) / 40
    for a in arrays.values():
        np.testing.assert_allclose(a.numpy(), 3.25)
    status = {r.site: (r.status, r.reason) for r in infos}
    assert status["s1"][0] == status["s2"][0] == "trained"
    assert status["s3"] == (
        "rejected",
        "'a.lora_A.weight' holds NaN or infinite values; 'a.lora_B.weight' holds NaN or infinite values",
    )
    assert "shape (3, 4)" in status["s4"][1]
    assert "unexpected keys ['model.embed_tokens.weight']" in status["s5"][1]
    assert status["s6"] == ("refused", "privacy budget exhausted")
    assert status["node-7"] == ("failed", "data.jsonl:3: not valid JSON")
    assert status["s8"] == ("rejected", "the update does not match the ledger receipt sent with it")


def test_no_valid_update_keeps_global_model() -> None:
    rules = UpdateRules(spec_of(to_record(TEMPLATE)), 1, "r")
    accepted, infos = triage_train(1, [_reply(1, error="crash")], rules)
    assert accepted == [] and infos[0].status == "failed"
    arrays, metrics = _fedavg().aggregate_train(1, accepted)  # type: ignore[attr-defined]
    assert arrays is None and metrics is None


def test_site_level_dp_clips_each_site_and_accounts_separately() -> None:
    strategy, wrapper = build_strategy(
        min_sites=1, fraction_train=1.0, sites_expected=2, site_dp=SiteLevelDP(1.0, 0.5, 1e-3)
    )
    assert wrapper is not None
    wrapper.current_arrays = to_record(TEMPLATE)  # set by configure_train in a real round
    wrapper._pending_events[1] = None  # no sampling happened in this unit test: aggregate only
    big = _trained(1, 10.0, n=10)
    big.content.metric_records["metrics"]["site-weight"] = 1.0
    small = _trained(2, 0.01, n=30)
    small.content.metric_records["metrics"]["site-weight"] = 1.0
    torch.manual_seed(0)
    arrays, _ = strategy.aggregate_train(1, [big, small])
    assert arrays is not None
    flat = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    # each update is clipped to L2 0.5 before averaging, so the huge one cannot dominate
    # (noise std = 1.0 * 0.5 / 2 per coordinate); unclipped its mean alone would be 5.0
    assert np.abs(flat).mean() < 1.5


def test_malformed_and_malicious_updates_are_rejected() -> None:
    """The fault-injection list: NaN, wrong shape, 100x norm, replayed round, absurd num-examples."""
    zero = to_record({k: torch.zeros_like(v) for k, v in TEMPLATE.items()})
    rules = UpdateRules(spec_of(zero), 2, "r", global_arrays=zero, max_update_norm=5.0)
    nan = to_record({k: torch.full_like(v, float("nan")) for k, v in TEMPLATE.items()})
    wrong = to_record({"a.lora_A.weight": torch.zeros(3, 4), "a.lora_B.weight": torch.zeros(4, 2)})
    replies = [
        _trained(1, 0.1, receipt_round=2),  # honest: norm 0.1 * 4 = 0.4
        _trained(2, 0.0, arrays=nan, receipt_round=2),
        _trained(3, 0.0, arrays=wrong, receipt_round=2),
        _trained(4, 10.0, receipt_round=2),  # 100x the honest norm
        _trained(5, 0.1, receipt_round=1),  # last round's update sent again
        _trained(6, 0.1, n=0, receipt_round=2),
    ]
    accepted, infos = triage_train(2, replies, rules)
    assert [m.metadata.src_node_id for m in accepted] == [1]
    reasons = {r.site: r.reason for r in infos if r.status == "rejected"}
    assert "NaN" in reasons["s2"] and "shape (3, 4)" in reasons["s3"]
    assert "exceeds the bound max-update-norm=5" in reasons["s4"]
    assert "replayed" in reasons["s5"] and "num-examples 0" in reasons["s6"]
    print(f"rejected {len(reasons)} of {len(replies)} updates")


def test_trimmed_mean_resists_one_sign_flipping_site() -> None:
    honest = [_trained(i, 1.0 + 0.01 * i) for i in (1, 2, 3, 4)]
    flipped = _trained(5, -50.0)
    strategy, _ = build_strategy(
        min_sites=1, fraction_train=1.0, sites_expected=5, site_dp=None, aggregation="trimmed-mean"
    )
    arrays, _ = strategy.aggregate_train(1, [*honest, flipped])
    assert arrays is not None
    for a in arrays.values():
        assert np.all(a.numpy() > 0.9)  # the flipped site is trimmed away
    plain, _ = _fedavg().aggregate_train(1, [*honest, flipped])  # type: ignore[attr-defined]
    assert all(np.all(a.numpy() < 0) for a in plain.values())  # FedAvg alone is poisoned


def test_site_level_dp_needs_fedavg() -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="needs 'aggregation' = 'fedavg'"):
        build_strategy(
            min_sites=1,
            fraction_train=1.0,
            sites_expected=3,
            site_dp=SiteLevelDP(1.0, 1.0, 1e-3),
            aggregation="median",
        )

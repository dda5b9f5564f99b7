"""Reply triage at the coordinator: only well-formed updates are averaged."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.arrays import spec_of, to_record, update_sha256
from server.strategy import SiteLevelDP, build_strategy, triage_train

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
) -> Message:
    state = {k: torch.full_like(v, value) for k, v in TEMPLATE.items()}
    arrays = arrays if arrays is not None else to_record(state)
    digest = update_sha256(receipt_of if receipt_of is not None else arrays)
    return _reply(
        node,
        RecordDict(
            {
                "arrays": arrays,
                "receipt": ConfigRecord({"seq": 1, "hash": "ab" * 32, "update_sha256": digest}),
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
    accepted, infos = triage_train(1, replies, template)
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
    accepted, infos = triage_train(1, [_reply(1, error="crash")], spec_of(to_record(TEMPLATE)))
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
    big.content["metrics"]["site-weight"] = 1.0
    small = _trained(2, 0.01, n=30)
    small.content["metrics"]["site-weight"] = 1.0
    torch.manual_seed(0)
    arrays, _ = strategy.aggregate_train(1, [big, small])
    assert arrays is not None
    flat = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    # each update is clipped to L2 0.5 before averaging, so the huge one cannot dominate
    # (noise std = 1.0 * 0.5 / 2 per coordinate); unclipped its mean alone would be 5.0
    assert np.abs(flat).mean() < 1.5

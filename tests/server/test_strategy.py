"""Reply triage at the coordinator: only well-formed updates are averaged."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.arrays import spec_of, to_record, update_sha256
from server.strategy import SiteFedAvg

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


def test_only_valid_updates_are_averaged() -> None:
    strat = SiteFedAvg(template=spec_of(to_record(TEMPLATE)))
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
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays is not None
    # weighted mean of the two valid updates: (1*10 + 4*30) / 40
    for a in arrays.values():
        np.testing.assert_allclose(a.numpy(), 3.25)
    status = {r.site: (r.status, r.reason) for r in strat.last_train}
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
    strat = SiteFedAvg(template=spec_of(to_record(TEMPLATE)))
    arrays, metrics = strat.aggregate_train(1, [_reply(1, error="crash")])
    assert arrays is None and metrics is None

"""Streaming aggregation: updates are triaged as they arrive and folded from disk, one at a time."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from common.arrays import spec_of, to_record
from server.fold import UpdateStore, fedavg
from server.rounds import PlainRound
from tests.inprocess import QueueGrid
from tests.server.replies import TEMPLATE, ask, guard, trained


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _flower_fedavg(updates: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    msgs = [
        Message(RecordDict({"arrays": u, "metrics": MetricRecord({"w": w})}), reply_to=ask(i + 1))
        for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    ]
    out = FedAvg(weighted_by_key="w").aggregate_train(1, msgs)[0]
    assert out is not None
    return out


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.5, 1e6), min_size=1, max_size=9),
    st.integers(0, 2**31 - 1),
)
def test_the_fold_from_disk_equals_flowers_fedavg_to_the_bit(weights: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = {"x.lora_A.weight": (3, 5), "x.lora_B.weight": (5, 3), "y.lora_A.weight": (7,)}
    updates = [
        ArrayRecord({k: Array((rng.standard_normal(s) * 10 ** rng.uniform(-3, 3)).astype(np.float32))
                     for k, s in shapes.items()})
        for _ in weights
    ]  # fmt: skip
    store = UpdateStore()
    try:
        for i, u in enumerate(updates):
            store.put(str(i), ((k, a.numpy()) for k, a in u.items()))
        ours = fedavg(store, [str(i) for i in range(len(updates))], weights, spec_of(updates[0]))
    finally:
        store.close()
    theirs = _flower_fedavg(updates, weights)
    assert list(ours.keys()) == list(theirs.keys())
    for k in theirs:
        assert ours[k].numpy().tobytes() == theirs[k].numpy().tobytes()


def test_an_update_that_fails_half_way_leaves_nothing_stored(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        yield "a", np.ones(4, np.float32)
        raise ValueError("'b' holds NaN or infinite values")

    with pytest.raises(ValueError, match="NaN"):
        store.put("bad", tensors())
    assert "bad" not in store
    assert [p.name for p in tmp_path.rglob("*.f32")] == []
    store.close()
    assert list(tmp_path.iterdir()) == []


class OneAtATimeGrid(QueueGrid):
    """Replies made when pulled; it records how many earlier replies were still alive at each pull."""

    def __init__(self, replies: dict[int, Message]) -> None:
        super().__init__(replies)
        self.replies = replies
        self.alive_at_pull: list[int] = []
        self._refs: list[weakref.ref[Any]] = []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        gc.collect()
        self.alive_at_pull.append(sum(r() is not None for r in self._refs))
        return super().pull_messages(message_ids)

    def _deliver(self, msg: Message) -> Message:
        reply = self.replies.pop(msg.metadata.dst_node_id)
        self._refs.append(weakref.ref(reply.content.array_records["arrays"]))
        return reply


def test_a_round_holds_one_reply_at_a_time_and_deletes_its_store(tmp_path: Path) -> None:
    n = 6
    grid = OneAtATimeGrid({i: trained(i, float(i), n=10 * i) for i in range(1, n + 1)})
    g = guard(sites=n, max_weight_share=1.0)
    result = PlainRound(grid, g, timeout=5.0, spill=tmp_path)(
        1, to_record(TEMPLATE), ConfigRecord({"server-round": 1})
    )
    assert result.accepted == n and result.arrays is not None
    assert grid.alive_at_pull == [0] * len(grid.alive_at_pull)  # every earlier reply was freed
    expected = sum(i * 10 * i for i in range(1, n + 1)) / sum(10 * i for i in range(1, n + 1))
    for a in result.arrays.values():
        np.testing.assert_allclose(a.numpy(), expected, rtol=1e-6)
    assert list(tmp_path.iterdir()) == []  # the round's stored updates are gone


def test_robust_aggregation_still_sees_every_update() -> None:
    replies = [trained(i, v) for i, v in enumerate([1.0, 2.0, 3.0, 100.0, 4.0], start=1)]
    g = guard(aggregation="median", sites=5, update_norm_ratio=0.0)
    assert not g.streams
    arrays, _ = g.aggregate_train(1, replies)
    assert arrays is not None
    for a in arrays.values():
        np.testing.assert_allclose(a.numpy(), 3.0)


def test_each_norm_is_computed_once_against_the_round_global(monkeypatch: pytest.MonkeyPatch) -> None:
    g = guard(max_update_norm=100.0, update_norm_ratio=10.0)
    calls = {"decode": 0}
    import server.strategy as strategy_module

    real = strategy_module.decoded_tensors

    def counting(*args: Any, **kwargs: Any) -> Iterator[tuple[str, np.ndarray]]:
        calls["decode"] += 1
        yield from real(*args, **kwargs)

    monkeypatch.setattr(strategy_module, "decoded_tensors", counting)
    g.aggregate_train(1, [trained(i, 0.5 * i) for i in range(1, 5)])
    assert calls["decode"] == 4  # one decode pass per reply: checks, norm and store together
    norms = {r.site: r.metrics["update-norm"] for r in g.rows}
    for i in range(1, 5):  # every entry of the update is 0.5 * i, the global is zero
        want = 0.5 * i * np.sqrt(sum(v.numel() for v in TEMPLATE.values()))
        assert norms[f"s{i}"] == pytest.approx(want)


def test_a_killed_rounds_store_is_swept_when_the_next_round_starts(tmp_path: Path) -> None:
    left = UpdateStore(tmp_path)
    left.put("x", iter([("a", np.ones(3, np.float32))]))
    stale = next(tmp_path.iterdir())  # as if the process had been killed here: never closed
    (tmp_path / "metrics.jsonl").write_text("")
    PlainRound(OneAtATimeGrid({}), guard(), timeout=1.0, spill=tmp_path)
    assert not stale.exists() and (tmp_path / "metrics.jsonl").exists()


def test_a_message_id_is_never_reused_while_its_message_waits() -> None:
    grid = OneAtATimeGrid({i: trained(i, 0.1) for i in (1, 2, 3)})
    first = list(grid.push_messages([ask(1), ask(2)]))
    assert len(list(grid.pull_messages(first[:1]))) == 1  # node 2's message still waits
    later = list(grid.push_messages([ask(3)]))
    assert len(set(first + later)) == 3  # (ids were once counted from the queue's length: m1 twice)
    assert [r.metadata.src_node_id for r in grid.pull_messages([first[1], *later])] == [2, 3]

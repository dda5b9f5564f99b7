"""Fuzz of site replies against the coordinator's triage: any reply, the round completes, nothing raises.

Each example is two honest replies and one hostile reply built by mutating an honest one at random:
records added or removed, metric keys and values of any type (NaN, inf, huge, lists), the site record,
the receipt (garbage text, deep nesting), the arrays (shapes, dtypes, values), or an error reply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.replies import TEMPLATE, error_reply, guard, refused, trained

NAMES = st.sampled_from(
    ["metrics", "site", "scrub", "receipt", "arrays", "x", "", "second", "fitres.metrics"]
)
TEXT = st.text(max_size=40)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 10**8, 1e300, math.nan, math.inf]),
)
SCALARS = st.one_of(NUMBERS, TEXT, st.booleans(), st.binary(max_size=16))
METRIC_VALUES = st.one_of(NUMBERS, st.lists(st.floats(allow_nan=True), max_size=3))
CONFIG_VALUES = st.one_of(SCALARS, st.lists(TEXT, max_size=3))
METRIC_KEYS = st.sampled_from(
    ["num-examples", "epsilon", "train-loss", "site-weight", "private", "delta", "steps", "eval-loss", "zzz"]
)
SITE_KEYS = st.sampled_from(["name", "status", "reason", "key", "extra"])
SITE_VALUES = st.one_of(
    st.sampled_from(["s3", "s1", "../x", "a\nb", "trained", "refused", "evaluated", ""]), CONFIG_VALUES
)


def _array(draw: st.DrawFn) -> Array:
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(["float32", "float64", "int64", "float16"]))
    fill = draw(st.sampled_from([0.0, 1.0, math.nan, math.inf, 1e30]))
    with np.errstate(over="ignore", invalid="ignore"):  # nan/inf/1e30 into int64 or float16 on purpose
        return Array(np.full(shape, fill).astype(dtype))


@st.composite
def mutation(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(
        st.sampled_from(
            ["metric", "drop-metric", "site", "drop-record", "add-metric-record", "add-config-record",
             "receipt", "array", "drop-array", "error", "refusal-with-arrays"]
        )
    )  # fmt: skip
    if kind == "metric":
        return kind, (draw(METRIC_KEYS), draw(METRIC_VALUES))
    if kind == "drop-metric":
        return kind, draw(METRIC_KEYS)
    if kind == "site":
        return kind, (draw(SITE_KEYS), draw(SITE_VALUES))
    if kind == "drop-record":
        return kind, draw(NAMES)
    if kind == "add-metric-record":
        return kind, (draw(NAMES), {draw(METRIC_KEYS): draw(METRIC_VALUES)})
    if kind == "add-config-record":
        return kind, (draw(NAMES), {draw(TEXT): draw(CONFIG_VALUES)})
    if kind == "receipt":
        options = [draw(TEXT), "[" * 3000 + "]" * 3000, json.dumps({"kind": "commit", "seq": draw(NUMBERS)})]
        return kind, draw(st.sampled_from(options))
    if kind == "array":
        return kind, (draw(st.sampled_from([*TEMPLATE, "model.embed_tokens.weight"])), _array(draw))
    return kind, None


def _apply(msg: Message, change: tuple[str, Any]) -> Message:
    kind, arg = change
    if kind == "error":
        return error_reply(3, "x" * 5000)
    if not msg.has_content():
        return msg
    c = msg.content
    metrics, site = c.metric_records.get("metrics"), c.config_records.get("site")
    if kind == "metric" and metrics is not None:
        metrics[arg[0]] = arg[1]
    elif kind == "drop-metric" and metrics is not None:
        metrics.pop(arg, None)
    elif kind == "site" and site is not None:
        site[arg[0]] = arg[1]
    elif kind == "drop-record":
        if arg in c:
            del c[arg]
    elif kind == "add-metric-record":
        c[arg[0] or "m"] = MetricRecord(arg[1])
    elif kind == "add-config-record":
        c[arg[0] or "c"] = ConfigRecord(arg[1])
    elif kind == "receipt":
        c["receipt"] = ConfigRecord({"entry": arg})
    elif kind == "array":
        arrays = c.array_records.get("arrays")
        c["arrays"] = ArrayRecord({**(dict(arrays.items()) if arrays else {}), arg[0]: arg[1]})
    elif kind == "drop-array" and "arrays" in c.array_records:
        del c["arrays"]
    elif kind == "refusal-with-arrays" and site is not None:
        site["status"] = "refused"
    return msg


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(mutation(), min_size=1, max_size=4),
    st.sampled_from(["fedavg", "median", "trimmed-mean", "krum"]),
)
def test_any_reply_leaves_the_round_to_the_well_formed_ones(
    changes: list[tuple[str, Any]], aggregation: str
) -> None:
    hostile = trained(3, 0.7)
    for change in changes:
        hostile = _apply(hostile, change)
    g = guard(aggregation=aggregation, sites=4, max_update_norm=100.0)
    try:
        arrays, _ = g.aggregate_train(1, [trained(1, 1.0), trained(2, 1.0), refused(4), hostile])
    except Exception as exc:  # the property: nothing a site sends makes the coordinator raise
        pytest.fail(f"triage raised {type(exc).__name__}: {exc} for {changes}")
    assert not g.failure, g.failure
    status = {r.node_id: r.status for r in g.rows}
    assert status[1] == status[2] == "trained" and status[4] == "refused"
    assert arrays is not None and set(arrays) == set(TEMPLATE)
    if status[3] != "trained":  # left out: the aggregate is the honest sites' alone
        for a in arrays.values():
            np.testing.assert_allclose(a.numpy(), 1.0, rtol=1e-6)
    assert all(math.isfinite(v) for r in g.rows for v in r.metrics.values())  # nothing non-finite is kept


@settings(max_examples=150, deadline=None)
@given(st.lists(mutation(), min_size=1, max_size=3))
def test_any_evaluate_reply_leaves_the_mean_to_the_well_formed_ones(changes: list[tuple[str, Any]]) -> None:
    def evaluated(node: int, loss: float) -> Message:
        content = RecordDict(
            {
                "metrics": MetricRecord({"eval-loss": loss, "num-examples": 10}),
                "site": ConfigRecord({"name": f"s{node}", "status": "evaluated"}),
            }
        )
        return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="evaluate"))

    hostile = evaluated(3, 9.0)
    for change in changes:
        if change[0] in (
            "metric",
            "drop-metric",
            "site",
            "drop-record",
            "add-metric-record",
            "add-config-record",
            "error",
        ):
            hostile = _apply(hostile, change)
    g = guard()
    metrics = g.aggregate_evaluate(1, [evaluated(1, 2.0), evaluated(2, 4.0), hostile])
    assert not g.failure and metrics is not None
    if {r.node_id: r.status for r in g.rows}[3] != "evaluated":
        assert metrics["eval-loss"] == pytest.approx(3.0)

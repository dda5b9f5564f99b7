"""No site reply can crash the coordinator, speak for another site, or slip past the replay check.

Real sites answer through the ClientApp handlers in this process (``tests/inprocess.py``); a
``TamperingGrid`` then rewrites chosen replies as a hostile site would send them. Cases 3, 5 and 6
of issue #11 ("What is wrong today"); the site-side cases are in tests/client/test_hostile_coordinator.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord

from privacy.audit import verify_ledgers
from server.coordinator import run_federation
from tests.inprocess import InProcessGrid, federation

Tamper = Callable[[int, int, Message], None]  # (partition, round, reply) -> edits the reply in place


class TamperingGrid(InProcessGrid):
    """The in-process grid, with some replies rewritten on their way to the coordinator."""

    def __init__(self, n: int, run_config: Mapping[str, Any], tamper: Tamper) -> None:
        super().__init__(n, run_config)
        self.tamper = tamper

    def _deliver(self, msg: Message) -> Message:
        reply = super()._deliver(msg)
        if reply.has_content():
            rnd = msg.content.config_records["config"]["server-round"]
            assert isinstance(rnd, int)
            self.tamper(self.nodes[reply.metadata.src_node_id], rnd, reply)
        return reply


def _train(reply: Message) -> bool:
    site = reply.content.config_records.get("site") if reply.has_content() else None
    return site is not None and site.get("status") in ("trained", "refused")


def _hostile(partition: int, rnd: int, reply: Message) -> None:
    if not _train(reply):
        return
    content = reply.content
    if (partition, rnd) == (0, 1):
        content.metric_records["metrics"]["my-own-metric"] = 3.0  # an extra metric key
    if (partition, rnd) == (0, 2):
        content["second"] = MetricRecord({"x": 1.0})  # a second MetricRecord
    if (partition, rnd) == (2, 1):
        entry = json.loads(str(content.config_records["receipt"]["entry"]))
        del entry["hash"]  # a receipt without its hash
        content["receipt"] = ConfigRecord({"entry": json.dumps(entry)})
    if (partition, rnd) == (2, 2):
        content.config_records["site"]["name"] = "northside-cardiology"  # partition 1's name


@pytest.fixture(scope="module")
def hostile_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, site_data: Path
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hostile") / "run"
    rc = {"num-server-rounds": 2, "local-steps": 2, "max-seq-len": 64, "min-train-sites": 1}
    cfg, names = federation(out, tiny_model, site_data, 3, **rc)
    summary = run_federation(TamperingGrid(3, cfg, _hostile), cfg)
    return {"out": out, "summary": summary, "names": names}


def _failures(run: dict[str, Any], partition: int) -> dict[int, str]:
    site = run["summary"]["sites"][run["names"][partition]]
    return {f["round"]: f["reason"] for f in site["failures"]}


def test_the_run_completes_with_the_well_formed_replies(hostile_run: dict[str, Any]) -> None:
    summary = hostile_run["summary"]
    assert summary["status"] == "completed" and summary["rounds"] == 2
    honest = summary["sites"][hostile_run["names"][1]]
    assert honest["rounds_trained"] == 2 and not honest["failures"]
    lines = [json.loads(x) for x in (hostile_run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert all(line["updated"] for line in lines)


@pytest.mark.parametrize(
    ("partition", "rnd", "why"),
    [
        (0, 1, "unexpected metric keys ['my-own-metric']"),
        (0, 2, "unexpected metric record(s) ['second']"),
        (2, 1, "does not match its own hash"),
    ],
)
def test_each_malformed_reply_is_rejected_with_its_reason(
    hostile_run: dict[str, Any], partition: int, rnd: int, why: str
) -> None:
    assert why in _failures(hostile_run, partition)[rnd]


def test_a_site_cannot_speak_under_another_sites_name(hostile_run: dict[str, Any]) -> None:
    names, summary = hostile_run["names"], hostile_run["summary"]
    innocent = names[1]
    assert innocent in summary["sites"] and summary["sites"][innocent]["rounds_trained"] == 2
    lines = [json.loads(x) for x in (hostile_run["out"] / "metrics.jsonl").read_text().splitlines()]
    row = lines[1]["sites"]
    assert row[innocent]["status"] == "trained"  # its own reply, not the impostor's
    receipts = [json.loads(x) for x in (hostile_run["out"] / "receipts.jsonl").read_text().splitlines()]
    ledger = hostile_run["out"] / "sites" / innocent / "state" / "ledger.jsonl"
    mine = [r for r in receipts if r["site"] == innocent]
    assert len(mine) == 2
    audit = verify_ledgers([ledger.with_name("ledger.jsonl")], receipts=hostile_run["out"] / "receipts.jsonl")
    assert not [f for f in audit.findings if f.severity == "error" and "receipt" in f.check]


def test_under_site_level_dp_a_site_weight_claim_cannot_crash_aggregation(
    tmp_path: Path, tiny_model: Path, site_data: Path
) -> None:
    def weight(partition: int, rnd: int, reply: Message) -> None:
        if partition == 0 and _train(reply):
            reply.content.metric_records["metrics"]["site-weight"] = 2.0
        elif partition == 1 and not _train(reply) and reply.has_content():
            reply.content.metric_records["metrics"]["eval-loss-made-up"] = 0.0  # evaluate reply

    rc = {
        "num-server-rounds": 2,
        "local-steps": 2,
        "max-seq-len": 64,
        "site-dp-noise": 0.5,
        "min-train-sites": 1,
    }
    cfg, names = federation(tmp_path / "run", tiny_model, site_data, 2, **rc)
    summary = run_federation(TamperingGrid(2, cfg, weight), cfg)
    assert summary["status"] == "completed", summary["stop_reason"]
    assert summary["sites"][names[1]]["rounds_trained"] == 2
    assert "unexpected metric keys ['site-weight']" in summary["sites"][names[0]]["failures"][0]["reason"]
    # Flower's accounted site-level DP aggregates only when every sampled site's update is usable,
    # so these rounds keep the adapter: the hostile site costs progress, never a crash
    assert summary["site_level_dp"]["releases"] == 0

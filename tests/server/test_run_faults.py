"""The coordinator under faults, below Flower's engines: dropouts, stops, resume, bad updates.

Runs the real ``run_federation`` and the real site handlers through ``InProcessGrid``
(tests/inprocess.py) with the tiny model and 2 local steps, so each test takes seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from common.errors import ConfigError
from privacy.audit import verify_ledgers
from privacy.ledger import PrivacyLedger
from privacy.ledger_entries import Entry
from server.coordinator import run_federation
from tests.inprocess import InProcessGrid, federation


def _setup(tmp: Path, model: Path, data: Path, sites: int, **rc: Any) -> tuple[dict[str, Any], list[str]]:
    return federation(
        tmp / "run", model, data, sites, **{"local-steps": 2, "max-seq-len": 64, "seed": 11, **rc}
    )


def _rounds(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _ledger(out: Path, site: str) -> list[Entry]:
    return PrivacyLedger(out / "sites" / site / "state" / "ledger.jsonl").entries()


def _kinds(entries: list[Entry]) -> list[tuple[str, int]]:
    return [(e.kind, e.round) for e in entries]


def test_round_completes_without_a_crashed_site_and_logs_why(
    tmp_path: Path, tiny_model: Path, site_data: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    cfg, names = _setup(tmp_path, tiny_model, site_data, 3, **{"num-server-rounds": 2})
    monkeypatch.setenv("FEDTUNE_FAULTS", f"{names[0]}:raise@2")
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        summary = run_federation(InProcessGrid(3, cfg), cfg)
    assert summary["status"] == "completed" and summary["adapter_round"] == 2
    row = _rounds(Path(cfg["out-dir"]))[1]
    assert row["updated"] is True
    assert row["sites"][names[0]]["status"] == "failed"
    assert "injected crash" in row["sites"][names[0]]["reason"]
    assert [row["sites"][n]["status"] for n in names[1:]] == ["trained", "trained"]
    assert any(names[0] in r.message and "injected crash" in r.message for r in caplog.records)
    # the crash came after the reservation: round 2 is spent at that site, never committed
    assert _kinds(_ledger(Path(cfg["out-dir"]), names[0])) == [("reserve", 1), ("commit", 1), ("reserve", 2)]


def test_a_silent_site_is_logged_as_timed_out(tmp_path: Path, tiny_model: Path, site_data: Path) -> None:
    cfg, _ = _setup(tmp_path, tiny_model, site_data, 3, **{"num-server-rounds": 1, "round-timeout": 5.0})
    summary = run_federation(InProcessGrid(3, cfg, down=[1002]), cfg)
    assert summary["status"] == "completed"
    failure = summary["sites"]["node-1002"]["failures"][0]
    assert "no reply within round-timeout=5s" in failure["reason"]


def test_too_few_sites_stop_the_run_keep_the_checkpoint_and_resume(
    tmp_path: Path, tiny_model: Path, site_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, names = _setup(tmp_path, tiny_model, site_data, 2, **{"num-server-rounds": 3, "min-train-sites": 2})
    out = Path(cfg["out-dir"])
    monkeypatch.setenv("FEDTUNE_FAULTS", f"{names[0]}:raise@2")
    stopped = run_federation(InProcessGrid(2, cfg), cfg)
    assert (stopped["status"], stopped["rounds"], stopped["adapter_round"]) == ("stopped", 2, 1)
    assert "fewer than min-train-sites=2" in stopped["stop_reason"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    lines = _rounds(out)
    assert lines[1]["bytes_up"] > 0  # the surviving site's update did travel in the stopped round
    assert stopped["bytes_up"] == sum(r["bytes_up"] for r in lines)
    with pytest.raises(ConfigError, match="set resume=true"):  # a new run may not overwrite it
        run_federation(InProcessGrid(2, cfg), cfg)

    monkeypatch.delenv("FEDTUNE_FAULTS")
    done = run_federation(InProcessGrid(2, cfg), cfg | {"resume": True})
    assert (done["status"], done["rounds"], done["adapter_round"], done["run_id"]) == (
        "completed", 3, 3, stopped["run_id"],
    )  # fmt: skip
    assert [r["round"] for r in _rounds(out)] == [1, 2, 3]
    # round 2's number is used up; nobody trains any round twice
    r1, c1, r2, c2, r3, c3 = (
        ("reserve", 1),
        ("commit", 1),
        ("reserve", 2),
        ("commit", 2),
        ("reserve", 3),
        ("commit", 3),
    )
    assert _kinds(_ledger(out, names[0])) == [r1, c1, r2, r3, c3]
    assert _kinds(_ledger(out, names[1])) == [r1, c1, r2, c2, r3, c3]
    ledgers = [out / "sites" / n / "state" / "ledger.jsonl" for n in names]
    audit = verify_ledgers(ledgers)  # seeded (test) noise: every reservation is reported NOT private
    assert {f.check for f in audit.findings if f.severity == "error"} == {"not-private"}


def test_resume_with_a_changed_run_config_is_refused(
    tmp_path: Path, tiny_model: Path, site_data: Path
) -> None:
    cfg, _ = _setup(tmp_path, tiny_model, site_data, 2, **{"num-server-rounds": 1})
    run_federation(InProcessGrid(2, cfg), cfg)
    with pytest.raises(ConfigError, match=r"'learning-rate' is 0\.5 but the interrupted run used 0\.02"):
        run_federation(InProcessGrid(2, cfg), cfg | {"resume": True, "learning-rate": 0.5})


def test_resumed_run_ends_with_the_uninterrupted_adapter(
    tmp_path: Path, tiny_model: Path, site_data: Path
) -> None:
    full, _ = _setup(tmp_path / "a", tiny_model, site_data, 2, **{"num-server-rounds": 3})
    run_federation(InProcessGrid(2, full), full)
    part, _ = _setup(tmp_path / "b", tiny_model, site_data, 2, **{"num-server-rounds": 3})

    class Killed(Exception):
        pass

    def kill(line: dict[str, Any]) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_federation(InProcessGrid(2, part), part, on_round=kill)
    run_federation(InProcessGrid(2, part), part | {"resume": True})
    a = load_file(str(Path(full["out-dir"]) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(part["out-dir"]) / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

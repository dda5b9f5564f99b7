"""Every training kind end to end: a federated cpt and dpo run on the embedded data, audited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedtune.audit_cli import audit_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["cpt", "dpo"])
def kind_run(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    site_data: Path,
) -> dict[str, Any]:
    """``fedtune simulate --run-config train-kind=KIND --sites 2 --rounds 2`` through the library call."""
    from fedtune.simulate import simulate

    kind = str(request.param)
    out = tmp_path_factory.mktemp("runs") / kind
    summary = simulate(
        out, sites=2, rounds=2, model=tiny_model, data=site_data, max_epsilon=8.0,
        run_config={"train-kind": kind, "batch-size": 8},
    )  # fmt: skip
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"kind": kind, "out": out, "summary": summary, "metrics": metrics}


def test_every_site_trains_the_kind_within_budget_and_learns(kind_run: dict[str, Any]) -> None:
    summary, kind = kind_run["summary"], kind_run["kind"]
    assert summary["status"] == "completed"
    for name, site in summary["sites"].items():
        assert site["rounds_trained"] == 2 and not site["failures"], name
        assert 0 < site["epsilon"] <= site["max_epsilon"] == 8.0, name
        assert site["eval_loss_after"] < site["eval_loss_before"], name  # dpo: the held-out DPO loss
        ledger = kind_run["out"] / "ledgers" / f"{name}.jsonl"
        reserves = [json.loads(x) for x in ledger.read_text().splitlines() if '"reserve"' in x]
        assert [r["train_kind"] for r in reserves] == [kind, kind]


def test_dpo_raises_the_held_out_reward_margin_at_every_site(kind_run: dict[str, Any]) -> None:
    if kind_run["kind"] != "dpo":
        pytest.skip("reward margins are dpo's")
    rounds = [m for m in kind_run["metrics"] if "sites" in m]
    first, last = rounds[0]["sites"], rounds[-1]["sites"]
    for name in kind_run["summary"]["sites"]:
        assert first[name]["reward-margin-before"] == pytest.approx(0.0, abs=1e-6)  # the base model
        assert last[name]["reward-margin"] > 0 and last[name]["reward-accuracy"] > 0.5, last[name]


def test_the_audit_passes_and_the_report_shows_the_kind(kind_run: dict[str, Any], tmp_path: Path) -> None:
    out = kind_run["out"]
    ledgers = sorted(str(p) for p in (out / "ledgers").glob("*.jsonl"))
    result = CliRunner().invoke(audit_app, ["verify", *ledgers, "--receipts", str(out)])
    assert result.exit_code == 0 and "all checks hold" in result.output, result.output
    report = tmp_path / "report.html"
    result = CliRunner().invoke(audit_app, ["report", str(out), "--out", str(report)])
    assert result.exit_code == 0, result.output
    html = report.read_text(encoding="utf-8")
    assert "<th>kind</th>" in html and html.count(f"<td>{kind_run['kind']}</td>") == 4  # 2 sites x 2 rounds

"""Continued pretraining end to end: a federated cpt run on the embedded documents, audited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedtune.audit_cli import audit_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, site_data: Path) -> dict[str, Any]:
    """``fedtune simulate --run-config train-kind=cpt --sites 2 --rounds 2`` through the library call."""
    from fedtune.simulate import simulate

    out = tmp_path_factory.mktemp("runs") / "cpt"
    summary = simulate(
        out, sites=2, rounds=2, model=tiny_model, data=site_data, max_epsilon=8.0,
        run_config={"train-kind": "cpt", "batch-size": 8},
    )  # fmt: skip
    return {"out": out, "summary": summary}


def test_every_site_pretrains_on_its_documents_within_budget(cpt_run: dict[str, Any]) -> None:
    summary = cpt_run["summary"]
    assert summary["status"] == "completed"
    for name, site in summary["sites"].items():
        assert site["rounds_trained"] == 2 and not site["failures"], name
        assert 0 < site["epsilon"] <= site["max_epsilon"] == 8.0, name
        assert site["eval_loss_after"] < site["eval_loss_before"], name
        ledger = cpt_run["out"] / "ledgers" / f"{name}.jsonl"
        reserves = [json.loads(x) for x in ledger.read_text().splitlines() if '"reserve"' in x]
        assert [r["train_kind"] for r in reserves] == ["cpt", "cpt"]


def test_the_audit_passes_and_the_report_shows_the_kind(cpt_run: dict[str, Any], tmp_path: Path) -> None:
    out = cpt_run["out"]
    ledgers = sorted(str(p) for p in (out / "ledgers").glob("*.jsonl"))
    result = CliRunner().invoke(audit_app, ["verify", *ledgers, "--receipts", str(out)])
    assert result.exit_code == 0 and "all checks hold" in result.output, result.output
    report = tmp_path / "report.html"
    result = CliRunner().invoke(audit_app, ["report", str(out), "--out", str(report)])
    assert result.exit_code == 0, result.output
    html = report.read_text(encoding="utf-8")
    assert "<th>kind</th>" in html and html.count("<td>cpt</td>") == 4  # 2 sites x 2 rounds

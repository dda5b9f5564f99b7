"""`fedtune site prepare`: a progress bar, one summary line per kind, a clear error for bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.policy import render_policy
from embedded.synthdata import generate_site_records
from fedtune.cli import app

pytestmark = pytest.mark.unprepared


def _policy(tmp_path: Path, lines: list[str]) -> Path:
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    policy = tmp_path / "policy.toml"
    policy.write_text(render_policy(name="s1", data_path=data, model_path=tmp_path), encoding="utf-8")
    return policy


def test_prepare_reports_new_and_reused_records(tmp_path: Path) -> None:
    records, _ = generate_site_records(0, 12, seed=2)
    policy = _policy(tmp_path, [json.dumps(r) for r in records])
    runner = CliRunner()
    first = runner.invoke(app, ["site", "prepare", "--policy", str(policy), "--workers", "1"])
    assert first.exit_code == 0, first.output
    assert "sft: 12 records, 12 new, 0 reused" in first.output and "notes/s" in first.output
    assert (tmp_path / "state" / "scrub-report.json").is_file()
    again = runner.invoke(app, ["site", "prepare", "--policy", str(policy)])
    assert again.exit_code == 0 and "sft: 12 records, 0 new, 12 reused" in again.output, again.output


def test_a_bad_record_stops_prepare_with_file_line_and_fix(tmp_path: Path) -> None:
    policy = _policy(tmp_path, [json.dumps({"instruction": "a", "response": "b"}), "{oops"])
    result = CliRunner().invoke(app, ["site", "prepare", "--policy", str(policy)])
    assert result.exit_code == 2
    assert "notes.jsonl:2: not valid JSON" in result.output and "Fix:" in result.output
    assert "Traceback" not in result.output

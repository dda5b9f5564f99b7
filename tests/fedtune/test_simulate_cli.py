"""``fedtune simulate`` argument errors and resume refusals that happen before Flower starts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from common.arrays import to_record
from fedtune.cli import app
from server.checkpoint import CoordinatorState, save_checkpoint


def test_needs_exactly_one_of_out_and_resume(tmp_path: Path) -> None:
    for args in ([], ["--out", str(tmp_path / "a"), "--resume", str(tmp_path)]):
        result = CliRunner().invoke(app, ["simulate", *args])
        assert result.exit_code != 0
        assert "either --out RUN_DIR (a new run) or --resume RUN_DIR" in str(result.exception)


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--resume", str(tmp_path)])
    assert "is" in str(result.exception) and "a simulate run folder" in str(result.exception)


def test_resume_refuses_when_no_checkpoint_verifies(tmp_path: Path) -> None:
    (tmp_path / "simulation.json").write_text(json.dumps({"sites": 1, "policies": [], "overrides": {}}))
    save_checkpoint(tmp_path, CoordinatorState("r1", 1, to_record({"b": torch.zeros(2)}), {}))
    state = tmp_path / "checkpoints" / "round-0001" / "state.json"
    state.write_text(state.read_text().replace('"server_round": 1', '"server_round": 2'))
    result = CliRunner().invoke(app, ["simulate", "--resume", str(tmp_path)])
    message = str(result.exception)
    assert "state.json: content does not match its SHA-256" in message and "cannot be resumed" in message

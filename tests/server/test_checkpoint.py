"""Checkpoints: atomic, verified, the newest two kept, a corrupt one skipped with a clear error."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.arrays import to_record
from server.checkpoint import (
    CheckpointError,
    CoordinatorState,
    capture_rng,
    checkpoints,
    config_drift,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def _state(rnd: int) -> CoordinatorState:
    arrays = to_record(
        {"b.lora_B.weight": torch.full((4, 2), float(rnd)), "a.lora_A.weight": torch.ones(2, 4)}
    )
    return CoordinatorState(
        run_id="r1",
        server_round=rnd,
        arrays=arrays,
        run_config={"learning-rate": 0.01},
        sites={"h1": {"rounds_trained": rnd}},
        totals={"bytes_up": 10 * rnd, "bytes_down": 0},
        adapter_round=rnd,
        rng=capture_rng(),
    )


def test_round_trip_keeps_tensors_order_and_state(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1))
    got = load_checkpoint(checkpoints(tmp_path)[0])
    assert list(got.arrays.keys()) == ["b.lora_B.weight", "a.lora_A.weight"]
    assert (got.arrays["b.lora_B.weight"].numpy() == 1.0).all()
    assert str(got.arrays["b.lora_B.weight"].dtype) == "float32"
    assert (got.run_id, got.server_round, got.sites, got.totals["bytes_up"]) == (
        "r1",
        1,
        {"h1": {"rounds_trained": 1}},
        10,
    )


def test_only_the_newest_two_are_kept(tmp_path: Path) -> None:
    for rnd in (1, 2, 3):
        save_checkpoint(tmp_path, _state(rnd))
    assert [p.name for p in checkpoints(tmp_path)] == ["round-0002", "round-0003"]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary folder left behind
    assert latest_checkpoint(tmp_path).server_round == 3


def test_rng_state_round_trips() -> None:
    saved = json.loads(json.dumps(capture_rng()))  # as stored in state.json
    a = (random.random(), np.random.rand())
    restore_rng(saved)
    assert (random.random(), np.random.rand()) == a


@pytest.mark.parametrize(
    ("target", "damage", "message"),
    [
        ("adapter.safetensors", lambda b: b[:-8] + b"\x00" * 8, "differs from"),
        (
            "state.json",
            lambda b: b.replace(b'"server_round": 2', b'"server_round": 5'),
            "does not match its SHA-256",
        ),
        ("state.json", lambda b: b[: len(b) // 2], "unreadable"),
    ],
)
def test_corrupt_newest_falls_back_to_the_previous(
    tmp_path: Path, caplog: Any, target: str, damage: Any, message: str
) -> None:
    save_checkpoint(tmp_path, _state(1))
    save_checkpoint(tmp_path, _state(2))
    path = tmp_path / "checkpoints" / "round-0002" / target
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path.parent)
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        state = latest_checkpoint(tmp_path)
    assert state.server_round == 1
    assert "round-0002 is unusable" in caplog.text and "older checkpoint round-0001" in caplog.text


def test_no_usable_checkpoint_refuses_to_resume(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        latest_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _state(1))
    (tmp_path / "checkpoints" / "round-0001" / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="The run cannot be resumed"):
        latest_checkpoint(tmp_path)


def test_config_drift_names_each_changed_key() -> None:
    saved = {"learning-rate": 0.01, "resume": False, "round-timeout": 900.0, "seed": 1}
    now = {"learning-rate": 0.02, "resume": True, "round-timeout": 60.0, "seed": 1}
    assert config_drift(saved, now) == ["'learning-rate' is 0.02 but the interrupted run used 0.01"]

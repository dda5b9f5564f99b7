"""The run/node config module: defaults match pyproject, every problem reported at once."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import NodeConfig, RunConfig, TrainRequest, default_run_config
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == default_run_config()


def test_all_problems_reported_at_once_with_key_and_fix() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"num-server-round": 3, "batch-size": 0, "learning-rate": "fast"})
    msg = str(err.value)
    assert len(err.value.problems) == 3
    assert "did you mean 'num-server-rounds'" in msg
    assert "'batch-size' must be an integer >= 1" in msg
    assert "'learning-rate' must be a number" in msg


def test_train_request_round_trips_through_a_config_record() -> None:
    cfg = RunConfig.from_flower({"lora-targets": "q_proj, v_proj", "local-steps": 7})
    req = TrainRequest.build(cfg, server_round=2, run_id="abc", fingerprint="f" * 64)
    back = TrainRequest.from_record(req.to_record())
    assert back == req
    assert back.lora.targets == ("q_proj", "v_proj")


def test_train_request_missing_keys_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        TrainRequest.from_record({"server-round": 1})
    assert "'run-id' is required" in str(err.value)


def test_node_config_resolves_policy_for_deployment_and_simulation() -> None:
    run = RunConfig.from_flower({"sim-policies": "/a.toml,/b.toml"})
    assert NodeConfig.from_flower({"policy": "/x.toml"}, run.sim_policies).policy == "/x.toml"
    assert NodeConfig.from_flower({"partition-id": 1}, run.sim_policies).policy == "/b.toml"
    assert NodeConfig.from_flower({"partition-id": 1}, '["/a,1.toml", "/b,2.toml"]').policy == "/b,2.toml"
    with pytest.raises(ConfigError, match="--node-config"):
        NodeConfig.from_flower({"partition-id": 5}, run.sim_policies)

"""Configuration declared once: parser, pyproject defaults, policy template and docs all derive from it."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from client.policy import SECTIONS, load_policy, render_policy
from common.config import NodeConfig, RunConfig, TrainRequest, default_run_config
from common.declare import (
    Rule,
    above,
    at_least,
    defaults,
    flatten,
    fraction,
    markdown_table,
    one_of,
    option,
    parse,
    specs,
    within,
)
from common.errors import ConfigError
from fedtune.config_docs import render

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == default_run_config()


def test_the_configuration_page_is_what_the_declarations_say() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert doc == render(), (
        "docs/configuration.md is stale: python -m fedtune.config_docs > docs/configuration.md"
    )
    for spec in specs(RunConfig):
        assert f"| `{spec.key}` |" in doc
    for cls in SECTIONS.values():
        for spec in specs(cls):
            assert f"| `{spec.key}` |" in doc


def test_every_key_parses_its_default_and_names_itself_when_wrong() -> None:
    for spec in specs(RunConfig):
        assert (
            flatten(parse(RunConfig, {spec.key: defaults(RunConfig)[spec.key]}, "t"))[spec.key]
            == defaults(RunConfig)[spec.key]
        )
        with pytest.raises(ConfigError, match=f"'{spec.key}'"):
            parse(RunConfig, {spec.key: object()}, "t")


def test_the_policy_template_writes_every_key_and_loads_back(tmp_path: Path) -> None:
    text = render_policy(name="a", data_path=tmp_path / "d.jsonl", model_path=tmp_path / "m")
    for cls in SECTIONS.values():
        for spec in specs(cls):
            assert f"{spec.key} = " in text, spec.key  # optional keys without a default appear commented
    (tmp_path / "p.toml").write_text(text)
    pol = load_policy(tmp_path / "p.toml")
    for name, cls in SECTIONS.items():
        assert getattr(pol, name) == dataclasses.replace(cls(), **_required(name, tmp_path))


def _required(section: str, tmp_path: Path) -> dict[str, str]:
    return {
        "site": {"name": "a"},
        "data": {"path": str(tmp_path / "d.jsonl")},
        "model": {"path": str(tmp_path / "m")},
    }.get(section, {})


def test_a_new_key_is_one_declaration() -> None:
    """Declaring one field is all it takes: parser, defaults, flat record and docs table know it."""

    @dataclasses.dataclass(frozen=True)
    class WithWarmup(RunConfig):
        warmup_steps: int = option("warmup-steps", 0, "steps before the first DP round", at_least(0))

    assert parse(WithWarmup, {"warmup-steps": 3}, "t").warmup_steps == 3
    assert defaults(WithWarmup)["warmup-steps"] == 0 and "warmup-steps" in flatten(WithWarmup())
    assert "| `warmup-steps` | `0` | an integer >= 0 |" in markdown_table(WithWarmup)
    with pytest.raises(ConfigError, match="'warmup-steps' must be an integer >= 0, got -1"):
        parse(WithWarmup, {"warmup-steps": -1}, "t")


@pytest.mark.parametrize(
    ("rule", "default", "inside", "outside", "text"),
    [
        (at_least(1), 0, [1, 10**9], [0, -1], "an integer >= 1"),
        (above(0), 0.0, [1e-9, 3.0], [0.0, -1.0], "a number > 0"),
        (within(0, 1e-3, open_low=True), 0.0, [1e-9, 1e-3], [0.0, 2e-3], "a number in (0, 1e-3]"),
        (fraction(), 0.5, [0.5, 1.0], [0.0, 1.1], "a fraction in (0, 1]"),
        (one_of(("prv", "rdp")), "prv", ["prv", "rdp"], ["PRV", ""], "one of prv, rdp"),
    ],
)
def test_a_rule_says_what_it_checks(
    rule: Rule, default: object, inside: list[object], outside: list[object], text: str
) -> None:
    """The words in the docs and the check come from one helper, so they cannot drift apart."""

    One = dataclasses.make_dataclass(
        "One", [("x", type(default), option("x", default, "x", rule))], frozen=True
    )
    shown = f'"{default}"' if isinstance(default, str) else default
    assert f"| `x` | `{shown}` | {text} |" in markdown_table(One)
    assert rule.check is not None and all(rule.check(v) for v in inside)
    for v in outside:
        with pytest.raises(ConfigError, match=re.escape(f"'x' must be {text}")):
            parse(One, {"x": v}, "t")


def test_all_problems_reported_at_once_with_key_and_fix() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"num-server-round": 3, "batch-size": 0, "learning-rate": "fast"})
    msg = str(err.value)
    assert len(err.value.problems) == 3
    assert "did you mean 'num-server-rounds'" in msg
    assert "'batch-size' must be an integer in [1, 1000000]" in msg
    assert "'learning-rate' must be a number" in msg


def test_cross_key_rules_are_checked_with_the_rest() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"secagg": True, "aggregation": "krum", "site-dp-noise": 0.5, "ffa-lora": True})
    assert len(err.value.problems) == 4  # ffa + site-dp, site-dp + robust, secagg + robust, secagg + site-dp


def test_secagg_needs_float32_on_the_wire() -> None:
    with pytest.raises(ConfigError, match="'secagg' = true needs 'wire-dtype' = 'float32'"):
        RunConfig.from_flower({"secagg": True, "wire-dtype": "bfloat16", "min-train-sites": 3})
    assert RunConfig.from_flower({"wire-dtype": "float16"}).train.wire_dtype == "float16"


def test_train_request_round_trips_through_a_config_record() -> None:
    cfg = RunConfig.from_flower({"lora-targets": "q_proj, v_proj", "local-steps": 7})
    req = TrainRequest.build(cfg, server_round=2, run_id="abc", fingerprint="f" * 64)
    back = TrainRequest.from_record(req.to_record())
    assert back == req
    assert back.lora.modules == ("q_proj", "v_proj") and back.train.local_steps == 7
    assert set(req.to_record()) > {s.key for s in specs(type(cfg.lora))}  # the same declaration, both sides


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

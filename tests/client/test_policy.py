"""Site policy files: relative paths resolve, every problem is named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import load_policy, render_policy
from common.errors import ConfigError


def test_rendered_policy_loads_and_resolves_paths(tmp_path: Path) -> None:
    p = tmp_path / "site" / "policy.toml"
    p.parent.mkdir()
    p.write_text(
        render_policy(
            name="a", data_path=tmp_path / "d.jsonl", model_path=tmp_path / "m", max_epsilon=3.0, delta=1e-6
        )
    )
    pol = load_policy(p)
    assert pol.name == "a" and pol.privacy.max_epsilon == 3.0 and pol.privacy.delta == 1e-6
    assert pol.state_dir == p.parent / "state"
    assert pol.ledger_path == p.parent / "state" / "ledger.jsonl"


def test_every_problem_is_listed_with_section_and_key(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(
        '[site]\nstate-dir = "s"\n\n[data]\npath = "d.jsonl"\neval-fraction = 0.9\n\n'
        "[privacy]\nmax-epsilon = -1\ndelta = 0.5\nmax-epsilom = 2\n\n[extra]\nx = 1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_policy(p)
    msg = str(err.value)
    assert str(p) in msg
    for needle in (
        "unknown section [extra]",
        "[site] 'name' is required",
        "[model] 'path' is required",
        "[data] 'eval-fraction'",
        "[privacy] 'max-epsilon'",
        "[privacy] 'delta'",
        "did you mean 'max-epsilon'",
    ):
        assert needle in msg
    assert len(err.value.problems) == 7


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_policy(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_policy(bad)

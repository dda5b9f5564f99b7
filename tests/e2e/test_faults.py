"""Fault injection: a killed coordinator, crashing and malicious sites (Simulation Engine, and in-process).

Sites misbehave through ``FEDTUNE_FAULTS`` (client/faults.py), which the simulated sites
inherit from this process's environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from embedded.synthdata import write_synthetic_sites
from fedtune.cli import app
from fedtune.simulate import resume, simulate
from privacy.audit import verify_ledgers
from server.coordinator import run_federation
from tests.inprocess import InProcessGrid, federation

pytestmark = pytest.mark.slow
QUICK = {"local-steps": 2, "max-seq-len": 64}


class CoordinatorKilled(Exception):
    """Raised from the round callback: the coordinator dies right after round 1's checkpoint."""


def _adapter(run: Path) -> dict[str, Any]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_killed_coordinator_resumes_to_the_uninterrupted_adapter(
    tmp_path: Path, tiny_model: Path, site_data: Path
) -> None:
    opts: dict[str, Any] = {"sites": 2, "rounds": 3, "model": tiny_model, "data": site_data}
    rc = QUICK | {"seed": 5}
    simulate(tmp_path / "full", run_config=rc, **opts)

    def kill_after_round_1(line: dict[str, Any]) -> None:
        if line["round"] == 1:
            raise CoordinatorKilled

    with pytest.raises(CoordinatorKilled):
        simulate(tmp_path / "cut", run_config=rc, on_round=kill_after_round_1, **opts)
    assert not (tmp_path / "cut" / "summary.json").exists()
    summary = resume(tmp_path / "cut")
    assert (summary["status"], summary["rounds"], summary["adapter_round"]) == ("completed", 3, 3)
    full, cut = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert full.keys() == cut.keys() and all((full[k] == cut[k]).all() for k in full)
    ledgers = sorted((tmp_path / "cut" / "ledgers").glob("*.jsonl"))
    audit = verify_ledgers(ledgers)  # seeded (test) noise: every reservation is reported NOT private
    assert len(ledgers) == 2 and {f.check for f in audit.findings if f.severity == "error"} == {"not-private"}
    for path in ledgers:
        entries = [json.loads(x) for x in path.read_text().splitlines()]
        committed = [e["round"] for e in entries if e["kind"] == "commit"]
        assert committed == [1, 2, 3], path.name  # every round trained exactly once
        assert len({e["run_id"] for e in entries}) == 1  # the resumed run kept its run id


def test_crashing_and_malformed_sites_are_rejected_and_counted(
    tmp_path: Path, tiny_model: Path, site_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad, crash, good = sorted(p.stem for p in site_data.glob("*.jsonl"))
    faults = f"{bad}:nan@1,{bad}:wrong-shape@2,{bad}:scale-100@3,{crash}:raise@2"
    monkeypatch.setenv("FEDTUNE_FAULTS", faults)
    out = tmp_path / "chaos"
    args = ["simulate", "--out", str(out), "--sites", "3", "--rounds", "3", "--model", str(tiny_model)]
    args += ["--data", str(site_data), "--run-config", "min-train-sites=1"]
    args += [f"--run-config={k}={v}" for k, v in QUICK.items()]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rejected updates: 3; failed or silent sites: 1" in result.output
    summary = json.loads((out / "summary.json").read_text())
    reasons = {f["round"]: f["reason"] for f in summary["sites"][bad]["failures"]}
    assert "NaN or infinite" in reasons[1] and "has shape" in reasons[2] and "update norm" in reasons[3]
    assert "injected crash" in summary["sites"][crash]["failures"][0]["reason"]
    assert summary["sites"][good]["rounds_trained"] == 3 and summary["status"] == "completed"
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["updated"] for r in rounds)


def test_trimmed_mean_resists_a_sign_flipping_site(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 sites, one flipping its update's sign every round; trimmed mean drops one at each end.

    With 3 sites trimming one at each end leaves the median, which lost ~7% here; trimming needs
    n >= 2f + 3 sites to still average. Runs in-process (tests/inprocess.py) with a shared seed, so
    the clean and the attacked run draw the same DP noise and differ only by the attack.
    """
    data = tmp_path / "data"
    write_synthetic_sites(data, sites=5, records_per_site=120, seed=1)
    losses: dict[str, dict[str, float]] = {}
    for mode in ("clean", "attacked"):
        cfg, names = federation(
            tmp_path / mode, tiny_model, data, 5,
            **{"aggregation": "trimmed-mean", "trim-beta": 0.2, "num-server-rounds": 3, "seed": 3},
        )  # fmt: skip
        if mode == "attacked":
            monkeypatch.setenv("FEDTUNE_FAULTS", f"{names[0]}:sign-flip")
        summary = run_federation(InProcessGrid(5, cfg), cfg)
        assert summary["sites"][names[0]]["rounds_trained"] == 3  # well-formed: no check rejects a flip
        losses[mode] = {n: s["eval_loss_after"] for n, s in summary["sites"].items()}
    for name in names[1:]:
        attacked, clean = losses["attacked"][name], losses["clean"][name]
        assert attacked <= 1.05 * clean, (name, attacked, clean)

"""End-to-end: 3 real sites x 2 rounds of ``fedtune simulate`` with ``secagg = true``.

The real coordinator runs on Flower's Simulation Engine; its SecAgg+ train phase is tapped (the
grid it is given is wrapped in ``MeteredGrid``) to show that no individual adapter reaches it.
Sites train with their usual ``SiteAgent`` (policy, ledger, DP-SGD) behind ``secaggplus_mod``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

import server.rounds
from fedtune.simulate import simulate
from server.secagg import MeteredGrid, secagg_train_round

pytestmark = pytest.mark.slow
ROUNDS = 2


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, site_data: Path) -> dict[Any, Any]:
    results: dict[Any, Any] = {"out": tmp_path_factory.mktemp("runs") / "secagg", "train_replies": []}

    def tapped(grid: Any, cfg: Any, rnd: int, arrays: Any, *args: Any, **kwargs: Any) -> Any:
        tap = MeteredGrid(grid, keep=True)
        results.setdefault("initial", {k: v.numpy() for k, v in arrays.items()})
        new, rows = secagg_train_round(tap, cfg, rnd, arrays, *args, **kwargs)
        results[rnd] = {"rows": rows, "updated": new is not None}
        results["train_replies"] += [r for _, replies in tap.exchanges for r in replies]
        return new, rows

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server.rounds, "secagg_train_round", tapped)
        results["summary"] = simulate(
            results["out"],
            sites=3,
            rounds=ROUNDS,
            model=tiny_model,
            data=site_data,
            run_config={"secagg": True, "local-steps": 10},  # half the default steps: CI time
        )
    return results


def test_every_site_trains_under_secagg_and_the_model_learns(secagg_run: dict[Any, Any]) -> None:
    summary = secagg_run["summary"]
    assert summary["status"] == "completed" and summary["adapter_round"] == ROUNDS
    for rnd in range(1, ROUNDS + 1):
        r = secagg_run[rnd]
        assert r["updated"]
        assert len(r["rows"]) == 3 and all(row.status == "trained" for row in r["rows"]), r["rows"]
        for row in r["rows"]:
            assert 0 < row.metrics["epsilon"] <= 8.0 and row.metrics["num-examples"] > 0
            assert row.scrub["PERSON"] > 0
            assert row.bytes_up > 0
    for site, s in summary["sites"].items():
        assert s["rounds_trained"] == ROUNDS and s["eval_loss_after"] < s["eval_loss_before"], site
    exported = load_file(str(secagg_run["out"] / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == secagg_run["initial"].keys()
    moved = [k for k, v in secagg_run["initial"].items() if (exported[k] != v).any()]
    assert len(moved) == len(exported)  # A and B: plain LoRA exchanges both


def test_the_coordinator_receives_no_individual_adapter(secagg_run: dict[Any, Any]) -> None:
    replies = secagg_run["train_replies"]
    assert len(replies) == 4 * 3 * ROUNDS  # four protocol stages, three sites, each round
    for msg in replies:
        assert not msg.has_error()
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())  # cleared by secaggplus_mod


def test_receipts_match_the_site_ledgers(secagg_run: dict[Any, Any]) -> None:
    for row in secagg_run[1]["rows"]:
        path = secagg_run["out"] / "ledgers" / f"{row.site}.jsonl"
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        commits = [(e["seq"], e["hash"]) for e in entries if e["kind"] == "commit"]
        got = [
            (r.receipt["seq"], r.receipt["hash"])
            for rnd in range(1, ROUNDS + 1)
            for r in secagg_run[rnd]["rows"]
            if r.site == row.site
        ]
        assert got == commits and len(commits) == ROUNDS

"""End-to-end: 3 real sites x 2 rounds aggregated with SecAgg+ on Flower's Simulation Engine.

The ServerApp here is a minimal round loop (the coordinator's, with ``secagg_train_round`` as
its train phase): sites train with their usual ``SiteAgent`` (policy, ledger, DP-SGD) behind
Flower's ``secaggplus_mod``; the coordinator never receives an individual adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, TrainRequest
from common.modeling import model_fingerprint
from server.coordinator import initial_adapter
from server.secagg import MeteredGrid, secagg_train_round
from server.strategy import build_strategy, triage_evaluate

pytestmark = pytest.mark.slow
ROUNDS = 2


def secagg_server(overrides: dict[str, Any], results: dict[Any, Any]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = RunConfig.from_flower(overrides)
            fingerprint = model_fingerprint(Path(cfg.model_dir))
            arrays, _ = initial_adapter(cfg)
            results["initial"] = {k: v.numpy() for k, v in arrays.items()}
            strategy, _ = build_strategy(min_sites=3, fraction_train=1.0, sites_expected=3, site_dp=None)
            tap = MeteredGrid(grid, keep=True)
            for rnd in range(1, ROUNDS + 1):
                req = TrainRequest.build(cfg, server_round=rnd, run_id="secagg-e2e", fingerprint=fingerprint)
                config = ConfigRecord(req.to_record())
                nodes = [m.metadata.dst_node_id for m in strategy.configure_train(rnd, arrays, config, grid)]
                new, rows = secagg_train_round(tap, cfg, rnd, arrays, config, nodes)
                if new is not None:
                    arrays = ArrayRecord({**arrays, **new})
                evals = strategy.configure_evaluate(rnd, arrays, config, grid)
                _, eval_rows = triage_evaluate(rnd, grid.send_and_receive(evals, timeout=cfg.round_timeout))
                results[rnd] = {"rows": rows, "updated": new is not None, "eval": eval_rows}
            results["final"] = {k: v.numpy() for k, v in arrays.items()}
            results["train_replies"] = [r for _, replies in tap.exchanges for r in replies]
        except Exception as exc:  # surfaced by the test
            results["error"] = exc
            raise

    return app


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, site_data: Path) -> dict[Any, Any]:
    from flwr.simulation import run_simulation

    from client.client_app import build_app as build_client
    from fedtune.simulate import collect_ledgers, prepare_run

    out = tmp_path_factory.mktemp("runs") / "secagg"
    policies = prepare_run(out, sites=3, model=tiny_model, data=site_data, max_epsilon=8.0, delta=1e-5)
    overrides = {
        "secagg": True,
        "num-server-rounds": ROUNDS,
        "local-steps": 10,  # half the default: enough to learn, and CI time
        "model-dir": str(tiny_model),
        "out-dir": str(out),
        "sim-policies": ",".join(str(p) for p in policies),
    }
    results: dict[Any, Any] = {"out": out}
    run_simulation(
        server_app=secagg_server(overrides, results),
        client_app=build_client(overrides),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    assert "error" not in results, results.get("error")
    collect_ledgers(out, policies)
    return results


def test_every_site_trains_under_secagg_and_the_model_learns(secagg_run: dict[Any, Any]) -> None:
    before: dict[str, float] = {}
    for rnd in range(1, ROUNDS + 1):
        r = secagg_run[rnd]
        assert r["updated"]
        assert len(r["rows"]) == 3 and all(row.status == "trained" for row in r["rows"]), r["rows"]
        for row in r["rows"]:
            assert 0 < row.metrics["epsilon"] <= 8.0 and row.metrics["num-examples"] > 0
            assert row.scrub["PERSON"] > 0
            assert row.bytes_up > 0
            before.setdefault(row.site, row.metrics["eval-loss-before"])
    after = {row.site: row.metrics["eval-loss"] for row in secagg_run[ROUNDS]["eval"]}
    assert sorted(after) == sorted(before)
    for site, loss in after.items():
        assert loss < before[site], site
    changed = [k for k, v in secagg_run["final"].items() if (v != secagg_run["initial"][k]).any()]
    assert len(changed) == len(secagg_run["final"])  # A and B: plain LoRA exchanges both


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

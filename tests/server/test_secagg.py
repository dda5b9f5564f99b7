"""SecAgg+ rounds over Flower's simulated grid with fake sites that return fixed, known updates.

The fake sites answer through the production ``client.client_app.train_reply`` (plain Message
API and ``secaggplus_mod`` alike), so the same site replies are aggregated both ways in one run:
by Flower's FedAvg in the clear and by ``server.secagg.secagg_train_round`` under SecAgg+.

Tolerance: each site sends ``x_i = w_i/M * delta_i`` (``M`` = max_weight), clipped to +-c and
stochastically rounded to a grid of step ``2c/Q`` (``c`` = secagg-clip-range, ``Q`` =
secagg-quantization); each rounding errs by less than one step. The coordinator divides the
unmasked sum by ``sum_i w_i/M``, so every element of the average is off by less than
``k * (2c/Q) / sum_i(w_i/M)`` for ``k`` sites (plus float32 rounding, ~1e-7 here).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import is_secagg, train_reply
from client.outcome import RoundOutcome
from common.arrays import update_sha256
from common.config import RunConfig, TrainRequest
from common.errors import ConfigError, FedtuneError
from server.secagg import MAX_WEIGHT, check_secagg, secagg_train_round
from tests.server.replies import RUN as RUN_ID
from tests.server.replies import receipt

SHAPES = {f"m.l{i}.lora_{ab}.weight": (4, 8) if ab == "A" else (8, 4) for i in range(2) for ab in "AB"}
WEIGHTS = (60, 120, 180, 240)  # num-examples of fake sites 0..3
DROP = (3, 2)  # fake site 3 fails in round 2, after SecAgg+ setup and key sharing
REFUSE = {3: (0, 1), 4: (0, 1, 2, 3)}  # round -> sites that refuse (budget spent): weight 0
RUN = {
    "secagg": True,
    "secagg-shares": 4,
    "secagg-threshold": 3,
    "ffa-lora": True,  # only B is exchanged: the key subset path
    "min-train-sites": 4,
    "round-timeout": 120.0,
}


def global_arrays() -> ArrayRecord:
    rng = np.random.default_rng(100)
    return ArrayRecord({k: Array(rng.normal(0, 0.1, s).astype(np.float32)) for k, s in SHAPES.items()})


def fake_delta(pid: int, rnd: int, key: str) -> np.ndarray:
    seed = 1000 * rnd + 10 * pid + sorted(SHAPES).index(key)
    return np.random.default_rng(seed).normal(0, 0.05, SHAPES[key]).astype(np.float32)


def fake_train(pid: int, arrays: ArrayRecord, request: Mapping[str, Any]) -> RoundOutcome:
    req = TrainRequest.from_record(request)
    rnd = req.server_round
    if (pid, rnd) == DROP:
        raise FedtuneError(f"fake site {pid} drops out in round {rnd}")
    common = {"delta": 1e-5, "max-epsilon": 8.0, "private": 1.0}
    if pid in REFUSE.get(rnd, ()):
        entry = receipt("refuse", rnd, seq=2 * rnd, reason="budget")
        return RoundOutcome(
            site=f"fake-{pid}",
            trained=False,
            reason="budget",
            metrics={"epsilon": 8.0, **common},
            receipt=entry,
        )
    keys = req.lora.update_keys(arrays)
    new = ArrayRecord({k: Array(arrays[k].numpy() + fake_delta(pid, rnd, k)) for k in keys})
    metrics = {"epsilon": 0.5 * rnd, "eval-loss-before": 5.0, "train-batches": 1.0, "noise-multiplier": 1.0}
    metrics |= {"sample-rate": 0.1, "steps": 1.0, **common}
    return RoundOutcome(
        site=f"fake-{pid}",
        trained=True,
        arrays=new,
        num_examples=WEIGHTS[pid],
        metrics=metrics,
        scrub_counts={"PERSON": pid},
        receipt=receipt("commit", rnd, seq=2 * rnd, update_sha256=update_sha256(new)),
    )


def fake_client() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return train_reply(msg, context, lambda arrays, req: fake_train(pid, arrays, req))

    return app


def fake_server(results: dict[Any, Any]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = RunConfig.from_flower(RUN)
            arrays = global_arrays()
            strategy = FedAvg(min_train_nodes=4, min_available_nodes=4)  # the clear-text reference
            for rnd in (1, 2, 3, 4):
                req = TrainRequest.build(cfg, server_round=rnd, run_id=RUN_ID, fingerprint="0" * 64)
                msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(req.to_record()), grid))
                replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
                trained = [m for m in replies if m.has_content() and "arrays" in m.content.array_records]
                plain, _ = strategy.aggregate_train(rnd, trained)
                t0 = time.perf_counter()
                nodes = [m.metadata.dst_node_id for m in msgs]
                new, rows = secagg_train_round(grid, cfg, rnd, arrays, ConfigRecord(req.to_record()), nodes)
                results[rnd] = {
                    "plain": {k: v.numpy() for k, v in plain.items()} if plain else None,
                    "secagg": {k: v.numpy() for k, v in new.items()} if new else None,
                    "rows": rows,
                    "seconds": time.perf_counter() - t0,
                }
        except Exception as exc:  # surfaced by the test
            results["error"] = exc
            raise

    return app


@pytest.fixture(scope="module")
def fake_run() -> dict[Any, Any]:
    from flwr.simulation import run_simulation

    results: dict[Any, Any] = {}
    run_simulation(
        server_app=fake_server(results),
        client_app=fake_client(),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    assert "error" not in results, results.get("error")
    return results


def tolerance(weights: list[int], cfg: RunConfig) -> float:
    step = 2 * cfg.secagg.clip_range / cfg.secagg.quantization
    return len(weights) * step / sum(w / MAX_WEIGHT for w in weights) + 1e-6


def expected(rnd: int, pids: list[int]) -> dict[str, np.ndarray]:
    base = global_arrays()
    w = np.array([WEIGHTS[p] for p in pids], dtype=np.float64)
    return {
        k: base[k].numpy() + sum(wi * fake_delta(p, rnd, k) for wi, p in zip(w, pids, strict=True)) / w.sum()
        for k in SHAPES
        if ".lora_B." in k
    }


@pytest.mark.slow
def test_secagg_matches_plain_fedavg_within_quantization(fake_run: dict[Any, Any]) -> None:
    cfg = RunConfig.from_flower(RUN)
    r1 = fake_run[1]
    tol = tolerance(list(WEIGHTS), cfg)  # 4 sites: ~2.6e-5
    assert sorted(r1["secagg"]) == sorted(r1["plain"]) == sorted(k for k in SHAPES if ".lora_B." in k)
    for key, want in expected(1, [0, 1, 2, 3]).items():
        np.testing.assert_allclose(r1["plain"][key], want, atol=1e-6)
        err = np.abs(r1["secagg"][key] - r1["plain"][key]).max()
        assert err < tol, (key, err, tol)
        assert r1["secagg"][key].dtype == np.float32
    # the weighting matters: the unweighted mean is far outside the tolerance
    key = "m.l0.lora_B.weight"
    unweighted = global_arrays()[key].numpy() + np.mean([fake_delta(p, 1, key) for p in range(4)], axis=0)
    assert np.abs(unweighted - r1["secagg"][key]).max() > 100 * tol
    rows = {r.site: r for r in r1["rows"]}
    assert sorted(rows) == [f"fake-{p}" for p in range(4)]
    for p, r in enumerate(sorted(rows.values(), key=lambda r: r.site)):
        assert r.status == "trained" and r.metrics["num-examples"] == WEIGHTS[p]
        assert r.metrics["epsilon"] == 0.5 and r.scrub == {"PERSON": p}
        assert r.receipt["kind"] == "commit" and r.receipt["round"] == 1
        assert r.bytes_up > 0  # the masked vector: int64 per value, plus the weight factor


@pytest.mark.slow
def test_round_survives_a_site_dropping_mid_protocol(fake_run: dict[Any, Any]) -> None:
    cfg = RunConfig.from_flower(RUN)
    r2 = fake_run[2]
    rows = {r.site: r for r in r2["rows"]}
    dropped = [r for r in r2["rows"] if r.status == "failed"]
    assert len(dropped) == 1 and "collect_masked_vectors" in dropped[0].reason
    assert "drops out in round 2" in dropped[0].reason
    assert sorted(r.site for r in r2["rows"] if r.status == "trained") == ["fake-0", "fake-1", "fake-2"]
    assert len(rows) == 4
    assert r2["secagg"] is not None, "3 of 4 sites >= threshold 3: the round must complete"
    tol = tolerance([WEIGHTS[p] for p in (0, 1, 2)], cfg)
    for key, want in expected(2, [0, 1, 2]).items():
        np.testing.assert_allclose(r2["plain"][key], want, atol=1e-6)
        assert np.abs(r2["secagg"][key] - r2["plain"][key]).max() < tol


# ---------------------------------------------------------------- fast checks (no simulation)


def test_config_combinations_that_cannot_work_are_refused() -> None:
    """Checked with every other key of the run config, before any model or Ray starts."""
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower(
            {
                "secagg": True,
                "aggregation": "median",
                "site-dp-noise": 0.5,
                "secagg-shares": 3,
                "secagg-threshold": 3,
            }
        )
    text = str(err.value)
    for key in ("'aggregation'", "'site-dp-noise'", "'secagg-threshold'"):
        assert key in text
    cfg = RunConfig.from_flower({"secagg": True})
    check_secagg(cfg, num_sites=3)  # the defaults work with 3 sites
    with pytest.raises(ConfigError, match="1 site"):
        check_secagg(
            RunConfig.from_flower({"secagg": True, "secagg-threshold": 2, "secagg-shares": 3}), num_sites=1
        )
    with pytest.raises(ConfigError, match="secagg-shares"):
        RunConfig.from_flower({"secagg": True, "secagg-shares": 2, "secagg-threshold": 2})


@pytest.fixture
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def test_plain_train_messages_bypass_secagg(task_identity: None) -> None:
    """Flower's secaggplus_mod raises KeyError on a train message without its configs: route around it."""
    from flwr.client.mod import secaggplus_mod

    req = TrainRequest.build(RunConfig.from_flower(RUN), server_round=1, run_id=RUN_ID, fingerprint="0" * 64)
    msg = Message(
        RecordDict({"arrays": global_arrays(), "config": ConfigRecord(req.to_record())}),
        dst_node_id=7,
        message_type="train",
    )
    ctx = Context(1, 7, {}, RecordDict(), {})
    assert not is_secagg(msg)
    with pytest.raises(KeyError):
        secaggplus_mod(msg, ctx, lambda m, c: m)
    reply = train_reply(msg, ctx, lambda arrays, r: fake_train(0, arrays, r))
    assert sorted(reply.content.array_records["arrays"]) == sorted(k for k in SHAPES if ".lora_B." in k)
    assert reply.content.config_records["site"]["status"] == "trained"


@pytest.mark.slow
def test_refusing_sites_weigh_nothing_and_all_refusing_leaves_the_adapter(fake_run: dict[Any, Any]) -> None:
    cfg = RunConfig.from_flower(RUN)
    r3, r4 = fake_run[3], fake_run[4]
    assert sorted((r.site, r.status) for r in r3["rows"]) == [
        ("fake-0", "refused"),
        ("fake-1", "refused"),
        ("fake-2", "trained"),
        ("fake-3", "trained"),
    ]
    assert all(
        r.reason == "budget" and r.metrics["epsilon"] == 8.0 for r in r3["rows"] if r.status == "refused"
    )
    tol = tolerance([WEIGHTS[p] for p in (0, 1, 2, 3)], cfg)  # 4 vectors summed, 2 of them zero
    for key, want in expected(3, [2, 3]).items():
        np.testing.assert_allclose(r3["plain"][key], want, atol=1e-6)
        assert np.abs(r3["secagg"][key] - want).max() < tol
    assert [r.status for r in r4["rows"]] == ["refused"] * 4
    assert r4["secagg"] is None and r4["plain"] is None

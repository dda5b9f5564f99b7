"""SecAgg+ vs plain aggregation: round time and coordinator traffic, side by side in one run.

Usage::

    .venv/bin/python -m bench.secagg [--pairs 3] [--sites 3] [--local-steps 20]

One Flower simulation of the embedded tiny model and synthetic sites (``fedtune.simulate``'s
``default_model()`` / ``default_data()``), real ``SiteAgent`` training with DP-SGD. After one
plain warm-up round (model, spaCy and data loading; excluded), rounds alternate SecAgg+ and
plain aggregation ``--pairs`` times, so machine load hits both alike. Per round: wall time of
the train phase at the coordinator, and bytes sent and received there (record payloads of every
message through ``Grid.send_and_receive``, counted by ``server.secagg.MeteredGrid``: arrays,
config values and key names; protobuf framing excluded). The plain round sends the adapter and
gets adapters back; SecAgg+ runs four stages (keys, encrypted shares, masked int64 vectors,
unmasking shares). The last line is ``secagg_time_ratio=<x> secagg_bytes_ratio=<y>`` (means of
SecAgg+ over means of plain; bytes = sent + received).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.arrays import spec_of
from common.config import RunConfig, TrainRequest
from common.modeling import model_fingerprint, set_offline_env
from server.coordinator import initial_adapter
from server.registry import SiteRegistry
from server.secagg import MeteredGrid, secagg_train_round
from server.strategy import Guard, UpdateRules, build_strategy


def bench_server(overrides: dict[str, Any], schedule: list[str], rows: list[dict[str, Any]]) -> ServerApp:
    """A round loop that runs ``schedule`` (``plain`` / ``secagg`` per round) and measures each."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_flower(overrides)
        fingerprint = model_fingerprint(Path(cfg.model_dir))
        arrays, _ = initial_adapter(cfg)
        keys = cfg.lora.update_keys(arrays)
        template = {k: v for k, v in spec_of(arrays).items() if k in keys}
        n = len(list(grid.get_node_ids()))
        inner, _ = build_strategy(min_sites=n, fraction_train=1.0, sites_expected=n, site_dp=None)
        rules = UpdateRules(template, "bench-secagg", cfg.aggregation.max_update_norm)
        strategy = Guard(inner, rules, SiteRegistry(None, {}, {}))
        for rnd, mode in enumerate(schedule, start=1):
            req = TrainRequest.build(cfg, server_round=rnd, run_id="bench-secagg", fingerprint=fingerprint)
            config = ConfigRecord(req.to_record())
            messages = list(strategy.configure_train(rnd, arrays, config, grid))
            metered = MeteredGrid(grid)
            t0 = time.perf_counter()
            if mode == "secagg":
                nodes = [m.metadata.dst_node_id for m in messages]
                new, infos = secagg_train_round(metered, cfg, rnd, arrays, config, nodes)
            else:
                replies = list(metered.send_and_receive(messages, timeout=cfg.round_timeout))
                new, _ = strategy.aggregate_train(rnd, replies)
                infos = strategy.rows
            seconds = time.perf_counter() - t0
            if new is not None:
                arrays = ArrayRecord({**arrays, **new})
            rows.append(
                {
                    "round": rnd,
                    "mode": mode,
                    "seconds": seconds,
                    "sent": metered.bytes_sent,
                    "received": metered.bytes_received,
                    "trained": sum(i.status == "trained" for i in infos),
                    "updated": new is not None,
                }
            )
            print(_row(rows[-1]), flush=True)

    return app


def _row(r: dict[str, Any]) -> str:
    return (
        f"round {r['round']:2d}  {r['mode']:7s} {r['seconds']:7.2f} s  sent {r['sent']:>9,d} B  "
        f"received {r['received']:>9,d} B  trained {r['trained']}  updated {r['updated']}"
    )


def main() -> None:
    """Run the alternating rounds and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="SecAgg+/plain round pairs after warm-up")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    args = parser.parse_args()
    set_offline_env()
    from flwr.simulation import run_simulation

    from client.client_app import build_app as build_client
    from fedtune.simulate import default_data, default_model, prepare_run

    logging.getLogger("flwr").setLevel(logging.WARNING)
    model, data = default_model(), default_data(args.sites)
    out = Path(tempfile.mkdtemp(prefix="fedtune-bench-secagg-"))
    policies = prepare_run(out, sites=args.sites, model=model, data=data, max_epsilon=1000.0, delta=1e-5)
    schedule = ["plain"] + ["secagg", "plain"] * args.pairs
    overrides = {
        "num-server-rounds": len(schedule),
        "local-steps": args.local_steps,
        "noise-multiplier": 1.0,  # fixed: no calibration work in any round
        "min-train-sites": args.sites,
        "model-dir": str(model.resolve()),
        "out-dir": str(out),
        "sim-policies": ",".join(str(p) for p in policies),
    }
    rows: list[dict[str, Any]] = []
    run_simulation(
        server_app=bench_server(overrides, schedule, rows),
        client_app=build_client(overrides),
        num_supernodes=args.sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.sites},
        },
    )
    if len(rows) != len(schedule) or not all(r["updated"] for r in rows):
        raise SystemExit(f"incomplete benchmark: {rows}")
    timed = rows[1:]  # the warm-up round is excluded

    def mean(mode: str, field: str) -> float:
        return statistics.fmean(r[field] for r in timed if r["mode"] == mode)

    head = f"{args.sites} sites, {args.local_steps} local steps, tiny model"
    print(f"\n{head}; means over {args.pairs} rounds of each")
    print("| | plain | SecAgg+ | ratio |\n|---|---|---|---|")
    for field, unit in (("seconds", "s"), ("sent", "B"), ("received", "B")):
        p, s = mean("plain", field), mean("secagg", field)
        print(f"| {field} | {p:,.2f} {unit} | {s:,.2f} {unit} | {s / p:.2f} |")
    time_ratio = mean("secagg", "seconds") / mean("plain", "seconds")
    plain_bytes = mean("plain", "sent") + mean("plain", "received")
    bytes_ratio = (mean("secagg", "sent") + mean("secagg", "received")) / plain_bytes
    overhead = mean("secagg", "seconds") - mean("plain", "seconds")
    print(f"\nSecAgg+ adds {overhead:.2f} s per round at the coordinator (training included in both)")
    print(f"secagg_time_ratio={time_ratio:.2f} secagg_bytes_ratio={bytes_ratio:.2f}")


if __name__ == "__main__":
    main()

"""Coordinator cost per round as the federation grows: triage + FedAvg time and peak memory, side by side.

Usage::

    .venv/bin/python -m bench.scale_coordinator [--sites 3,10,30,100] [--shapes demo,7b]
        [--modes stream,collect] [--aggregation fedavg]

(run from the repository root, as a module of the ``bench`` package.)

Shapes: ``demo`` is the embedded tiny model's LoRA adapter (2 layers, hidden 64, r=16 on q_proj and
v_proj: 8,192 values, 32 KiB); ``7b`` is a 7B Llama's (32 layers, hidden 4096, r=16 on q_proj and
v_proj: 8.4M values, 32 MiB). Each site's reply is built the way the ClientApp lays it out
(``client.client_app.reply_records``): a float32 update, num-examples, a ledger receipt whose
``update_sha256`` matches the update. Replies are made only when the coordinator pulls them, as if
they arrived over the network, and the time spent making them is subtracted.

Modes, each in its own fresh process (glibc told to ``mmap`` allocations >= 64 KiB, so freed memory
leaves RSS at once), with the run's default triage rules (max-update-norm 100, update-norm-ratio 10,
max-weight-share 0.5):

* ``stream``: ``server.rounds.PlainRound`` -- each reply pulled by its message id, triaged, its
  update decoded once and stored on disk, then dropped; FedAvg folded from the store afterwards.
* ``collect``: Flower's way -- ``send_and_receive`` returns every reply, then
  ``Guard.aggregate_train`` triages and aggregates the list (the coordinator before streaming, and
  what robust aggregators still need).

Peak memory is the peak RSS during the round (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the RSS just before it, when the global adapter is already built; it is also printed in
updates' worth. Goal (issue #15): 100 updates of the 7B shape triaged and averaged in <= 30 s,
and peak memory above the global adapter <= 3 updates' worth whatever N. The last line is
``stream_7b_100_s=<s> stream_7b_worst_updates=<x> collect_7b_100_s=<s>`` (over the shapes run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = {"demo": (2, 64), "7b": (32, 4096)}  # (layers, hidden); r=16 on q_proj and v_proj
RANK = 16


def template(shape: str) -> dict[str, tuple[int, int]]:
    """Adapter key -> tensor shape of ``shape``, in PEFT's order."""
    layers, hidden = SHAPES[shape]
    out = {}
    for i in range(layers):
        for mod in ("q_proj", "v_proj"):
            stem = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            out[f"{stem}.lora_A.weight"] = (RANK, hidden)
            out[f"{stem}.lora_B.weight"] = (hidden, RANK)
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _worker(shape: str, sites: int, mode: str, aggregation: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import reply_records
    from client.outcome import RoundOutcome
    from common.arrays import ArraySpec, update_sha256
    from privacy.ledger_entries import GENESIS_HASH, entry_hash
    from server.registry import SiteRegistry
    from server.rounds import PlainRound
    from server.strategy import Guard, UpdateRules, build_strategy
    from tests.inprocess import QueueGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    shapes = template(shape)
    spec = {k: ArraySpec(s, "float32") for k, s in shapes.items()}
    global_ = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in shapes.items()})
    update_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())

    def reply(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        arrays = ArrayRecord(
            {k: Array(np.full(s, 1e-3 * (1 + node % 7), np.float32)) for k, s in shapes.items()}
        )
        body: dict[str, Any] = {
            "kind": "commit", "round": 1, "run_id": "bench", "seq": 1, "time": "2026-12-01T00:00:00+00:00",
            "prev_hash": GENESIS_HASH, "reserve_seq": 0, "num_examples": 100 + node, "metrics": {},
            "update_sha256": update_sha256(arrays),
        }  # fmt: skip
        body["hash"] = entry_hash(body)
        metrics = {"eval-loss-before": 5.0, "train-batches": 3.0, "noise-multiplier": 1.0}
        metrics |= {"sample-rate": 0.1, "steps": 3.0, "delta": 1e-5, "max-epsilon": 8.0, "private": 1.0}
        metrics |= {"epsilon": 1.0, "epsilon-rdp": 1.1, "train-loss": 4.0}
        out = RoundOutcome(f"site-{node:03d}", True, "", arrays, 100 + node, metrics, {}, body)
        content = reply_records(out)
        content["arrays"] = arrays
        return Message(content, reply_to=msg)

    class SyntheticGrid(QueueGrid):
        """``sites`` nodes whose replies are made when pulled (their making is timed apart)."""

        def __init__(self) -> None:
            super().__init__(range(1, sites + 1))
            self.making = 0.0

        def _deliver(self, msg: Message) -> Message:
            t = time.perf_counter()
            out = reply(msg)
            self.making += time.perf_counter() - t
            return out

    inner, _ = build_strategy(
        min_sites=1, fraction_train=1.0, sites_expected=sites, site_dp=None, aggregation=aggregation
    )
    rules = UpdateRules(spec, "bench", 100.0, 10.0, max_weight_share=0.5)
    guard = Guard(inner, rules, SiteRegistry(None, {}, {}))
    grid = SyntheticGrid()
    request = ConfigRecord({"server-round": 1})
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if mode == "stream":
        result = PlainRound(grid, guard, timeout=600.0)(1, global_, request)
        arrays, accepted = result.arrays, result.accepted
    else:
        messages = list(guard.configure_train(1, global_, request, grid))
        replies = grid.send_and_receive(messages)
        arrays = guard.aggregate_train(1, replies)[0]
        accepted = sum(r.status == "trained" for r in guard.rows)
        del replies
    seconds = time.perf_counter() - t0 - grid.making
    peak = (_rss_kib("VmHWM") - before) * 1024
    assert arrays is not None and accepted == sites, (accepted, guard.failure, [r.reason for r in guard.rows])
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "updates": peak / update_bytes,
        "update_bytes": update_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    """Run every (shape, sites, mode) in its own process and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", default="3,10,30,100")
    ap.add_argument("--shapes", default="demo,7b")
    ap.add_argument("--modes", default="stream,collect")
    ap.add_argument("--aggregation", default="fedavg")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(**json.loads(args.worker))))
        return
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    print(
        f"{'shape':<5} {'sites':>5} | "
        + " | ".join(f"{m:>7} s  {m:>7} MB  (updates)" for m in args.modes.split(","))
    )
    summary: dict[str, float] = {}
    for shape in args.shapes.split(","):
        for n in (int(x) for x in args.sites.split(",")):
            cells = []
            for mode in args.modes.split(","):
                job = {"shape": shape, "sites": n, "mode": mode, "aggregation": args.aggregation}
                out = subprocess.run(
                    [sys.executable, "-m", "bench.scale_coordinator", "--worker", json.dumps(job)],
                    env=env, capture_output=True, text=True, check=False,
                )  # fmt: skip
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    cells.append(f"{'failed':>31}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                cells.append(
                    f"{r['seconds']:>9.2f}  {r['peak_bytes'] / 2**20:>10.1f}  ({r['updates']:>5.2f})"
                )
                if shape == "7b":
                    key = f"{mode}_7b"
                    summary[f"{key}_worst_updates"] = max(
                        summary.get(f"{key}_worst_updates", 0.0), r["updates"]
                    )
                    if n == 100:
                        summary[f"{key}_100_s"] = r["seconds"]
            print(f"{shape:<5} {n:>5} | " + " | ".join(cells), flush=True)
    print(" ".join(f"{k}={v:.2f}" for k, v in sorted(summary.items())))


if __name__ == "__main__":
    main()

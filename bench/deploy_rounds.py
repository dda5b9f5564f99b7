"""Per-round site overhead in Flower's Deployment Engine: in-process agent vs the warm site worker.

Usage::

    .venv/bin/python -m bench.deploy_rounds [--rounds 3] [--modes in-process,worker]

On loopback, with TLS and SuperNode authentication (the ``deploy/*.sh`` wrappers, as a real federation
runs them): provision 2 sites, start a SuperLink and two SuperNodes, run ``--rounds`` rounds of the
embedded default with ``flwr run``, and read each round's wall time from the coordinator's
``metrics.jsonl``. Mode ``in-process``: each message's fresh ClientApp process builds the site agent
(imports torch, Opacus and Presidio, hashes the weights, loads the model, tokenizes). Mode ``worker``:
each site runs ``fedtune site serve`` and its SuperNode hands rounds over (``--worker``). The same
training in Flower's Simulation Engine (one long-lived process per site) is the reference: the
framework overhead of a round is ``1 - simulation round / deployment round``. Each site process uses
one thread (``OMP_NUM_THREADS=1``), as a simulated site's Ray actor does. Every process is
stopped by PID at the end. The last line is ``overhead_in_process=<x> overhead_worker=<y>`` for the
later rounds (2..N).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.test_deployment import Procs, _free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIG = {"local-steps": 5, "batch-size": 16, "max-seq-len": 256}


def _round_times(run: Path) -> list[float]:
    times = [json.loads(x)["time"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip([0.0, *times], times, strict=False)]


def _worker_seconds(log: str) -> list[float]:
    """A worker's answer times grouped per round (train then evaluate: two answers a round)."""
    answers = [float(m) for m in re.findall(r"answered in ([0-9.]+) s", log)]
    return [sum(answers[i : i + 2]) for i in range(0, len(answers), 2)]


def deployment(
    work: Path, model: Path, data: Path, rounds: int, worker: bool
) -> tuple[list[float], list[float]]:
    """Round times of one deployed run (TLS, node auth, 2 sites), and per round the seconds the
    slower site's worker spent answering (empty without workers)."""
    from client.policy import load_policy
    from client.prepare import prepare_site
    from fedtune.deploy_cli import provision_federation

    names = sorted(p.stem for p in data.glob("*.jsonl"))[:2]
    port = _free_port()
    fed, _ = provision_federation(
        work / "fed", sites=names, hosts=["127.0.0.1"], port=port, data_dir=data, model=model
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FLWR_HOME", None)
    env["OMP_NUM_THREADS"] = "1"  # one core per site, as the simulation's Ray actors (2 sites share 2 cores)
    (work / "logs").mkdir()
    procs = Procs(work / "logs", env)
    try:
        link = procs.start("superlink", DEPLOY / "start-superlink.sh", fed.operator, "--host", "127.0.0.1")
        procs.wait_for("superlink", "Uvicorn running on https://", link)
        home = {**env, "FLWR_HOME": str(fed.operator / "flwr-home")}
        subprocess.run([str(DEPLOY / "register-sites.sh"), str(fed.operator), *names], env=home, check=True)
        for name in names:  # each site's admin prepares its records first (not timed: no round runs it)
            prepare_site(load_policy(fed.sites[name] / "policy.toml"))
        for name in names:
            extra: list[str | Path] = []
            if worker:
                sock = fed.sites[name] / "worker.sock"
                w = procs.start(
                    f"{name}-worker",
                    "fedtune",
                    "site",
                    "serve",
                    fed.sites[name] / "policy.toml",
                    "--socket",
                    sock,
                )
                procs.wait_for(f"{name}-worker", "site worker ready", w, timeout=300)
                extra = ["--worker", sock]
            node = procs.start(
                name, DEPLOY / "start-supernode.sh", fed.sites[name], "--port", str(_free_port()), *extra
            )
            procs.wait_for(name, "SuperNode ID:", node)
        out = work / "run"
        cfg = " ".join(f"{k}={v}" for k, v in CONFIG.items())
        cfg += f" num-server-rounds={rounds} model-dir='{model}' out-dir='{out}'"
        r = subprocess.run(
            [str(DEPLOY / "run.sh"), str(fed.operator), "--", "--run-config", cfg],
            env=home, capture_output=True, text=True, timeout=3600, check=False,
        )  # fmt: skip
        if r.returncode:
            raise SystemExit(f"flwr run failed:\n{(r.stdout + r.stderr)[-3000:]}")
        spent = [_worker_seconds(procs.log(f"{name}-worker")) for name in names] if worker else []
        inside = [max(pair) for pair in zip(*spent, strict=False)]
        return _round_times(out), inside
    finally:
        left = procs.stop_all()
        if left:
            raise SystemExit(f"processes still running: {left}")


def simulation(work: Path, model: Path, data: Path, rounds: int) -> list[float]:
    """Round times of the same training in the Simulation Engine (the reference)."""
    from fedtune.simulate import simulate

    simulate(work / "sim", sites=2, rounds=rounds, model=model, data=data, run_config=dict(CONFIG))
    return _round_times(work / "sim")


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="in-process,worker")
    args = ap.parse_args(argv)
    from embedded.synthdata import write_synthetic_sites
    from fedtune.simulate import default_model

    work = Path(tempfile.mkdtemp(prefix="fedtune-deploy-bench-"))
    model = default_model()
    data = work / "data"
    write_synthetic_sites(data, sites=2, records_per_site=120, seed=1)
    t0 = time.perf_counter()
    rows = {"simulation": simulation(work / "s", model, data, args.rounds)}
    inside: list[float] = []
    for mode in args.modes.split(","):
        (work / mode).mkdir()
        rows[mode], answering = deployment(work / mode, model, data, args.rounds, worker=mode == "worker")
        inside = answering or inside
    ref = statistics.median(rows["simulation"][1:])
    print("\n| engine / site | round 1 s | later rounds s (median) | overhead of a later round |")
    print("|---|---|---|---|")
    overhead = {}
    for mode, times in rows.items():
        later = statistics.median(times[1:])
        overhead[mode] = 1 - ref / later if mode != "simulation" else 0.0
        shown = "reference" if mode == "simulation" else f"{overhead[mode]:.0%}"
        print(f"| {mode} | {times[0]:.1f} | {later:.1f} | {shown} |")
    if inside:
        answer, later = statistics.median(inside[1:]), statistics.median(rows["worker"][1:])
        print(
            f"\nworker mode, later rounds: {answer:.1f} s answering in the site workers, "
            f"{later - answer:.1f} s in Flower's messaging (SuperNode polling, a process per message)"
        )
    print(f"\n(total {time.perf_counter() - t0:.0f} s, work folder {work})")
    print(
        " ".join(f"overhead_{m.replace('-', '_')}={v:.2f}" for m, v in overhead.items() if m != "simulation")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

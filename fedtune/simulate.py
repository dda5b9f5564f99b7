"""``fedtune simulate``: N sites x R rounds on Flower's Simulation Engine, in one command.

Lays out a run folder as a real federation would have it -- one policy and state
dir per site, the coordinator's outputs beside them -- then runs the very same
ServerApp and ClientApp that ``flwr run`` deploys.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from client.compute import ComputeSection, resolve
from client.policy import render_policy
from common.config import SITE_NAME
from common.declare import parse
from common.errors import ConfigError
from common.fsutil import atomic_write_text
from common.modeling import check_model_dir, set_offline_env
from common.runfolder import RunFolder

RoundCallback = Callable[[dict[str, Any]], None]


def cache_dir() -> Path:
    """Where the embedded model and data are cached (``FEDTUNE_CACHE`` overrides)."""
    env = os.environ.get("FEDTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedtune"


def default_model() -> Path:
    """The embedded tiny model, built on first use and reused after."""
    from embedded.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir() / "tiny-model")


def default_data(sites: int) -> Path:
    """The embedded synthetic corpus for ``sites`` sites, written on first use."""
    from embedded.synthdata import write_synthetic_sites

    out = cache_dir() / f"synth-{sites}"
    if not (out / ".complete").is_file() or not (out / "dpo").is_dir():  # (older caches lack cpt/, dpo/)
        write_synthetic_sites(out, sites=sites)
        (out / ".complete").write_text("ok", encoding="utf-8")
    return out


def site_files(data: Path, sites: int) -> list[Path]:
    """The first ``sites`` data files (sorted) in ``data``; one file per site, named for it."""
    if not data.is_dir():
        raise ConfigError(str(data), ["--data must be a folder with one JSONL/CSV/Parquet file per site"])
    files = sorted(p for p in data.iterdir() if p.suffix in (".jsonl", ".csv", ".parquet"))
    if len(files) < sites:
        raise ConfigError(
            str(data),
            [
                f"--data holds {len(files)} site file(s) but --sites is {sites}: "
                "add one JSONL/CSV/Parquet file per site or lower --sites"
            ],
        )
    bad = [f.name for f in files[:sites] if not SITE_NAME.fullmatch(f.stem)]
    if bad:
        raise ConfigError(
            str(data),
            [
                f"{name!r}: a site's file name is its site name: 1-64 letters, digits, '-', '_'"
                for name in bad
            ],
        )
    return files[:sites]


def prepare_run(
    out: Path,
    *,
    sites: int,
    model: Path,
    data: Path,
    max_epsilon: float,
    delta: float,
    non_private: bool = False,
    seeded: bool = False,
    privacy: Mapping[str, Any] | None = None,
    compute: Mapping[str, Any] | None = None,
    kinds: Sequence[str] = ("sft",),
    workers: int = min(2, os.cpu_count() or 1),
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Write one policy and signing key per site under ``out/sites/<name>/``, prepare its ``kinds``.

    Each site's public key is copied to ``out/keys/<name>.pub``, as an auditor would receive it.
    ``non_private`` / ``seeded`` write the opt-ins a real site's privacy office would have to give
    (training without DP; reproducible, hence NOT private, noise for tests). Each site is then
    prepared as its admin would (``fedtune site prepare``, ``workers`` processes); ``say`` reports it.
    Returns the policies.
    """
    from client.policy import load_policy
    from client.prepare import prepare_site
    from privacy.keys import generate_keypair

    policies = []
    run = RunFolder(out)
    run.keys.mkdir(parents=True, exist_ok=True)
    for f in site_files(data, sites):
        name = f.stem
        site_dir = run.sites / name
        site_dir.mkdir(parents=True, exist_ok=True)
        private, public = generate_keypair(site_dir / "keys")
        shutil.copyfile(public, run.public_key(name))
        text = render_policy(
            name=name,
            data_path=f.resolve(),
            model_path=model.resolve(),
            max_epsilon=max_epsilon,
            delta=delta,
            signing_key=private,
            allow_non_private=non_private,
            allow_seeded_noise=seeded,
            privacy=privacy,
            compute=compute,
            cpt_path=cpt.resolve() if (cpt := f.parent / "cpt" / f.name).is_file() else None,
            dpo_path=dpo.resolve() if (dpo := f.parent / "dpo" / f.name).is_file() else None,
        )
        policy = site_dir / "policy.toml"
        policy.write_text(text, encoding="utf-8")
        policies.append(policy)
        pol = load_policy(policy)
        wanted = [k for k in dict.fromkeys(kinds) if pol.records_of(k) is not None]
        say(f"preparing site {name} ({', '.join(wanted)}; as `fedtune site prepare`) ...")
        for done in prepare_site(pol, workers=workers, kinds=wanted):
            say(f"  {done.summary()}")
    return policies


def collect_ledgers(out: Path, policies: list[Path]) -> list[Path]:
    """Copy each site's ledger and head record into ``out/ledgers/`` (as an auditor gathers them)."""
    from client.policy import load_policy

    run = RunFolder(out)
    run.ledgers.mkdir(exist_ok=True)
    copied = []
    for p in policies:
        pol = load_policy(p)
        if pol.ledger_path.is_file():
            shutil.copyfile(pol.ledger_path, run.ledger(pol.name))
            copied.append(run.ledger(pol.name))
        if pol.ledger_head.is_file():
            shutil.copyfile(pol.ledger_head, run.head(pol.name))
    return copied


def check_overrides(run_config: Mapping[str, Any]) -> None:
    """Refuse a bad run config before any folder, model or Ray worker is made (every problem at once)."""
    from common.config import RunConfig

    RunConfig.from_flower(run_config, source="--run-config")


def simulate(
    out: Path,
    *,
    sites: int = 3,
    rounds: int = 3,
    model: Path | None = None,
    data: Path | None = None,
    max_epsilon: float = 8.0,
    delta: float = 1e-5,
    run_config: Mapping[str, Any] | None = None,
    on_round: RoundCallback | None = None,
    quiet: bool = True,
    local_only: bool = False,
    privacy: Mapping[str, Any] | None = None,
    compute: Mapping[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a simulated federation into ``out``; return the coordinator's summary.

    ``local_only`` runs the baseline where every site trains alone (same budget, rounds and
    code); ``privacy`` adds ``[privacy]`` keys to every simulated site's policy, ``compute`` its
    ``[compute]`` keys (device, dtype, quantization, gradient checkpointing);
    ``run_config={"dp": False}`` the non-private baseline (the simulated sites' policies
    then allow it; a real site's policy refuses it unless its privacy office opts in). Each site
    is prepared before the run (``say`` reports it).
    """
    set_offline_env()
    out = out.resolve()
    overrides: dict[str, Any] = {
        "min-train-sites": min(2, sites),
        "federation-dir": str(out),  # a simulated federation lives and dies with its run folder
        "site-keys": str(RunFolder(out).keys),  # the operator received each simulated site's public key
        **dict(run_config or {}),
        "num-server-rounds": rounds,
        "out-dir": str(out),
    }
    check_overrides(overrides)
    budget = [
        (
            math.isfinite(max_epsilon) and max_epsilon > 0,
            f"--max-epsilon must be a number > 0, got {max_epsilon!r}",
        ),
        (math.isfinite(delta) and 0 < delta <= 1e-3, f"--delta must be a number in (0, 1e-3], got {delta!r}"),
    ]
    if any(not ok for ok, _ in budget):
        raise ConfigError("fedtune simulate", [why for ok, why in budget if not ok])
    plan = resolve(parse(ComputeSection, dict(compute or {}), "fedtune simulate"), where="fedtune simulate")
    model = check_model_dir(model, "--model") if model is not None else default_model()
    data = data if data is not None else default_data(sites)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(str(out), ["the run folder is not empty: choose a new --out"])
    site_files(data, sites)  # every site has a data file, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    cfg_in = dict(run_config or {})
    policies = prepare_run(
        out,
        sites=sites,
        model=model,
        data=data,
        max_epsilon=max_epsilon,
        delta=delta,
        non_private=not bool(cfg_in.get("dp", True)),
        seeded=int(cfg_in.get("seed", -1)) >= 0,
        privacy=privacy,
        compute=compute,
        kinds=("sft", str(cfg_in.get("train-kind", "sft"))),
        say=say,
    )
    overrides |= {"model-dir": str(model.resolve()), "sim-policies": json.dumps([str(p) for p in policies])}
    if local_only:
        from fedtune.local import run_local

        summary_local = run_local(policies, overrides)
        collect_ledgers(out, policies)
        return summary_local
    gpus = gpu_share(sites) if plan.is_cuda else 0.0
    spec = {"sites": sites, "policies": [str(p) for p in policies], "overrides": overrides, "gpus": gpus}
    atomic_write_text(RunFolder(out).simulation, json.dumps(spec, indent=2))
    return _run_flower(out, sites, overrides, policies, on_round=on_round, quiet=quiet, gpus=gpus)


def gpu_share(sites: int) -> float:
    """Each simulated site's share of this machine's GPUs (Ray hides GPUs from actors that ask for none)."""
    import torch

    return min(1.0, torch.cuda.device_count() / sites)


def resume(out: Path, *, on_round: RoundCallback | None = None, quiet: bool = True) -> dict[str, Any]:
    """Continue an interrupted ``simulate`` run in ``out`` from its newest checkpoint."""
    set_offline_env()
    out = out.resolve()
    try:
        spec = json.loads(RunFolder(out).simulation.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            str(RunFolder(out).simulation),
            [f"cannot read the simulation's settings ({exc}): is {out} a simulate run folder?"],
        ) from None
    from server.checkpoint import latest_checkpoint

    latest_checkpoint(out)  # fail now, naming the files, if no checkpoint verifies
    policies = [Path(p) for p in spec["policies"]]
    overrides = {**spec["overrides"], "resume": True}
    sites, gpus = int(spec["sites"]), float(spec.get("gpus", 0.0))
    return _run_flower(out, sites, overrides, policies, on_round=on_round, quiet=quiet, gpus=gpus)


def _run_flower(
    out: Path,
    sites: int,
    overrides: dict[str, Any],
    policies: list[Path],
    *,
    on_round: RoundCallback | None,
    quiet: bool,
    gpus: float = 0.0,
) -> dict[str, Any]:
    """Run the ServerApp and ClientApp on Flower's Simulation Engine; return the summary.

    ``gpus`` is each site's share of the GPUs (sites on CUDA); Ray then shows the GPUs to its actors.
    """
    from flwr.simulation import run_simulation

    from client.client_app import build_app as build_client
    from server.server_app import build_app as build_server

    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run = RunFolder(out)
    summary_path = run.summary
    summary_path.unlink(missing_ok=True)
    init: dict[str, Any] = {"num_cpus": min(sites, os.cpu_count() or 1)}
    if gpus:
        init["num_gpus"] = math.ceil(gpus * sites)
    run_simulation(
        server_app=build_server(overrides, on_round=on_round),
        client_app=build_client(overrides),
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": gpus},
            "init_args": init,
        },
    )
    if not summary_path.is_file():
        hint = " (resume it: fedtune simulate --resume RUN_DIR)" if run.checkpoints.is_dir() else ""
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above{hint}")
    collect_ledgers(out, policies)
    return run.read_summary()

"""The coordinator's per-round checkpoint: write atomically, verify, resume.

After every round the coordinator writes ``checkpoints/round-NNNN/`` in the run folder:

* ``adapter.safetensors`` -- the global adapter (tensor order kept in the manifest);
* ``state.json`` -- run id, completed round, run config, per-site summary, byte totals,
  strategy state (site-level DP releases), and the Python and NumPy RNG states;
  it names the adapter's SHA-256 and carries a SHA-256 of its own content.

A checkpoint is built in a hidden temporary folder and renamed into place, so a reader
sees a whole checkpoint or none. The two newest are kept: if the newest fails
verification, resume falls back to the one before it and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from common.errors import FedtuneError
from common.fsutil import atomic_write_bytes, file_sha256
from common.runfolder import RunFolder

log = logging.getLogger(__name__)
FORMAT = 1
KEEP = 2
# keys that may differ between the interrupted run and its resumption
RESUME_FREE_KEYS = frozenset({"resume", "round-timeout"})


class CheckpointError(FedtuneError):
    """No usable checkpoint (message names the files and the fix)."""


@dataclass
class CoordinatorState:
    """Everything the coordinator needs to continue a run after its last completed round."""

    run_id: str
    server_round: int  # the last round asked of the sites (its number is used up)
    arrays: ArrayRecord
    run_config: dict[str, Any]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    adapter_round: int = 0  # the round the global adapter comes from (< server_round after a stop)
    site_dp_releases: int = 0
    names: dict[str, str] = field(default_factory=dict)  # node id -> site name seen so far
    rng: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The global Python and NumPy RNG states (Flower samples sites and draws site-level noise there)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the states captured by :func:`capture_rng`."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def save_checkpoint(run_dir: Path, state: CoordinatorState) -> Path:
    """Write the checkpoint of ``state.server_round`` atomically; keep the newest two."""
    root = RunFolder(run_dir).checkpoints
    final = root / f"round-{state.server_round:04d}"
    tmp = root / f".round-{state.server_round:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    order = list(state.arrays.keys())
    atomic_write_bytes(tmp / "adapter.safetensors", st_save({k: state.arrays[k].numpy() for k in order}))
    body = {
        "format": FORMAT,
        "run_id": state.run_id,
        "server_round": state.server_round,
        "run_config": state.run_config,
        "sites": state.sites,
        "totals": state.totals,
        "elapsed": state.elapsed,
        "adapter_round": state.adapter_round,
        "site_dp_releases": state.site_dp_releases,
        "names": state.names,
        "rng": state.rng,
        "adapter_keys": order,
        "adapter_sha256": file_sha256(tmp / "adapter.safetensors"),
    }
    atomic_write_bytes(tmp / "state.json", json.dumps({**body, "sha256": _digest(body)}).encode("utf-8"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable before older checkpoints go
    finally:
        os.close(fd)
    for old in checkpoints(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = RunFolder(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-"))


def load_checkpoint(path: Path) -> CoordinatorState:
    """Read and verify one checkpoint folder; raise ``CheckpointError`` naming what is wrong."""
    state_file, adapter_file = path / "state.json", path / "adapter.safetensors"
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: not a fedtune checkpoint of format {FORMAT}")
    body = {k: v for k, v in raw.items() if k != "sha256"}
    if raw.get("sha256") != _digest(body):
        raise CheckpointError(f"{state_file}: content does not match its SHA-256 (corrupted or edited)")
    try:
        actual = file_sha256(adapter_file)
    except OSError as exc:
        raise CheckpointError(f"{adapter_file}: unreadable ({exc.strerror})") from None
    if actual != body["adapter_sha256"]:
        raise CheckpointError(
            f"{adapter_file}: SHA-256 {actual[:12]}... differs from {body['adapter_sha256'][:12]}... "
            "recorded in state.json (corrupted)"
        )
    tensors = st_load(adapter_file.read_bytes())
    arrays = ArrayRecord({k: Array(tensors[k]) for k in body["adapter_keys"]})
    return CoordinatorState(
        run_id=body["run_id"],
        server_round=int(body["server_round"]),
        arrays=arrays,
        run_config=body["run_config"],
        sites=body["sites"],
        totals=body["totals"],
        elapsed=float(body["elapsed"]),
        adapter_round=int(body["adapter_round"]),
        site_dp_releases=int(body["site_dp_releases"]),
        names=body["names"],
        rng=body["rng"],
    )


def latest_checkpoint(run_dir: Path) -> CoordinatorState:
    """The newest checkpoint that verifies, falling back to older ones with a warning."""
    found = checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"{run_dir}: no checkpoint under {run_dir / 'checkpoints'} -- the run ended before its first "
            "round completed; start a new run instead of resuming"
        )
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            log.error("checkpoint %s is unusable: %s", path.name, exc)
            problems.append(str(exc))
            continue
        if problems:
            log.warning(
                "resuming from the older checkpoint %s: sites that already trained the rounds after it "
                "refuse to train them again (their budget for them is spent), so those rounds go on "
                "without them",
                path.name,
            )
        return state
    raise CheckpointError(
        f"{run_dir}: no checkpoint verifies ({'; '.join(problems)}). The run cannot be resumed; "
        "restore the checkpoints folder from backup or start a new run"
    )


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Run-config keys whose value differs between the checkpointed run and the resuming one."""
    keys = (set(saved) | set(current)) - RESUME_FREE_KEYS
    return [
        f"'{k}' is {current.get(k)!r} but the interrupted run used {saved.get(k)!r}"
        for k in sorted(keys)
        if saved.get(k) != current.get(k)
    ]

"""The bad-input catalogue: every bad input tried, and the exact message fedtune gives.

``python -m tests.bad_inputs`` prints the table in docs/bad-inputs.md;
tests/test_bad_inputs.py checks that every message there is still the one produced.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from client.data import load_records
from client.faults import parse_faults
from client.policy import load_policy, render_policy
from client.site import SiteAgent
from common.arrays import spec_of, to_record, update_sha256
from common.config import RunConfig, default_run_config
from common.errors import ConfigError, FedtuneError
from server.checkpoint import CoordinatorState, config_drift, latest_checkpoint, save_checkpoint
from server.strategy import SiteReply, UpdateRules, check_reply

FIELDS = ("instruction", "response")
GOOD = json.dumps({"instruction": "Summarise the note.", "response": "Stable, discharged home."})


def _file(d: Path, name: str, data: bytes | str) -> Path:
    p = d / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def _folder(p: Path) -> Path:
    p.mkdir()
    return p


def _policy(d: Path, text: str) -> Path:
    return _file(d, "policy.toml", text)


def _site(d: Path) -> SiteAgent:
    data = _file(d, "notes.jsonl", GOOD + "\n")
    return SiteAgent(load_policy(_policy(d, render_policy(name="h1", data_path=data, model_path=d))))


def _update(problem: str) -> list[str]:
    start = to_record({"q.lora_A.weight": torch.zeros(2, 4), "q.lora_B.weight": torch.zeros(4, 2)})
    state = {"q.lora_A.weight": torch.full((2, 4), 0.1), "q.lora_B.weight": torch.full((4, 2), 0.1)}
    metrics = {"num-examples": 100.0}
    receipt_round = 3
    if problem == "nan":
        state["q.lora_B.weight"][0, 0] = float("nan")
    elif problem == "shape":
        state["q.lora_B.weight"] = torch.zeros(3, 2)
    elif problem == "norm":
        state = {k: v * 1000 for k, v in state.items()}
    elif problem == "examples":
        metrics = {"num-examples": -5.0}
    elif problem == "replay":
        receipt_round = 2
    record = to_record(state)
    receipt = {"update_sha256": update_sha256(record), "hash": "h", "round": receipt_round, "run_id": "r1"}
    if problem == "receipt":
        receipt["update_sha256"] = "0" * 64
    rules = UpdateRules(spec_of(start), 3, "r1", start, max_update_norm=100.0)
    return check_reply(record, SiteReply(1, "h1", "trained", metrics=metrics, receipt=receipt), rules)


def _checkpoint(d: Path) -> None:
    state = CoordinatorState("r1", 1, to_record({"b": torch.zeros(2)}), {})
    save_checkpoint(d, state)
    adapter = d / "checkpoints" / "round-0001" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-4] + b"\xff" * 4)
    latest_checkpoint(d)


def _policy_errors(d: Path) -> None:
    text = '[site]\nstate-dir = "s"\n\n[data]\npath = "d.jsonl"\neval-fraction = 0.9\n\n[privacy]\n'
    load_policy(_policy(d, text + "max-epsilon = -1\nmax-epsilom = 2\n\n[extra]\nx = 1\n"))


def _full_disk(d: Path) -> None:
    with mock.patch("client.site.shutil.disk_usage", return_value=mock.Mock(free=3 * 2**20)):
        _site(d).check_state_dir()


def _unwritable(d: Path) -> None:
    _file(d, "state", "a file where the state folder should be")
    _site(d).check_state_dir()


def _no_permission(d: Path) -> None:
    agent = _site(d)
    denied = PermissionError(13, "Permission denied")
    with mock.patch.object(Path, "write_text", side_effect=denied):
        agent.check_state_dir()


def _drift(d: Path) -> None:
    saved = default_run_config()
    drift = config_drift(saved, saved | {"learning-rate": 0.05, "lora-rank": 32})
    raise ConfigError("run config", [*drift, "resume with the interrupted run's run config"])


def _rejected(problem: str) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        raise FedtuneError("rejected: " + "; ".join(_update(problem)))

    return run


CASES: list[tuple[str, str, Callable[[Path], object]]] = [
    ("site policy", "several mistakes at once", _policy_errors),
    ("site policy", "not TOML", lambda d: load_policy(_policy(d, "[site\nname="))),
    ("site policy", "file missing", lambda d: load_policy(d / "none.toml")),
    (
        "run config",
        "three bad keys at once",
        lambda d: RunConfig.from_flower({"num-server-rounds": 0, "learning-rat": 0.1, "aggregation": "mean"}),
    ),
    (
        "data",
        "not UTF-8 (line 2)",
        lambda d: load_records(
            _file(d, "a.jsonl", GOOD.encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1")),
            FIELDS,
        ),
    ),
    ("data", "broken JSON (line 2)", lambda d: load_records(_file(d, "a.jsonl", GOOD + "\n{oops\n"), FIELDS)),
    (
        "data",
        "field missing",
        lambda d: load_records(_file(d, "a.jsonl", json.dumps({"instruction": "x"})), FIELDS),
    ),
    (
        "data",
        "empty field",
        lambda d: load_records(
            _file(d, "a.jsonl", json.dumps({"instruction": " ", "response": "y"})), FIELDS
        ),
    ),
    ("data", "JSON line is not an object", lambda d: load_records(_file(d, "a.jsonl", "[1, 2]\n"), FIELDS)),
    ("data", "empty file", lambda d: load_records(_file(d, "a.jsonl", ""), FIELDS)),
    (
        "data",
        "oversized record",
        lambda d: load_records(
            _file(d, "a.jsonl", json.dumps({"instruction": "x" * 300, "response": "y"})),
            FIELDS,
            max_chars=200,
        ),
    ),
    (
        "data",
        "path is a folder",
        lambda d: load_records(_folder(d / "dir.jsonl"), FIELDS),
    ),
    ("data", "file missing", lambda d: load_records(d / "gone.jsonl", FIELDS)),
    ("data", "unsupported file type", lambda d: load_records(_file(d, "a.txt", GOOD), FIELDS)),
    ("state dir", "a file, not a folder", _unwritable),
    ("state dir", "no write permission (EACCES, mocked: tests run as root)", _no_permission),
    ("state dir", "disk full (3 MiB free, mocked)", _full_disk),
    ("update", "NaN value", _rejected("nan")),
    ("update", "wrong shape", _rejected("shape")),
    ("update", "norm 1000x", _rejected("norm")),
    ("update", "absurd num-examples", _rejected("examples")),
    ("update", "replayed round", _rejected("replay")),
    ("update", "does not match its receipt", _rejected("receipt")),
    ("resume", "corrupt checkpoint (only one)", _checkpoint),
    ("resume", "run config changed", _drift),
    ("fault drill", "bad FEDTUNE_FAULTS", lambda d: parse_faults("h1:explode")),
]


def messages() -> list[tuple[str, str, str]]:
    """(input kind, what was wrong, message with the temporary folder shown as ``<dir>``)."""
    rows = []
    for kind, what, make in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp).resolve()
            try:
                make(d)
            except FedtuneError as exc:
                text = str(exc).replace(str(d), "<dir>")
            else:
                raise AssertionError(f"{kind} / {what}: no error raised")
        rows.append((kind, what, text))
    return rows


def table() -> str:
    """The markdown table of docs/bad-inputs.md."""
    out = ["| input | what was wrong | message |", "|---|---|---|"]
    for kind, what, text in messages():
        cell = text.replace("|", "\\|").replace("\n", "<br>")
        out.append(f"| {kind} | {what} | {cell} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())

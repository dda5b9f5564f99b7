"""The bad-input catalogue: every bad input tried, and the exact message fedtune gives.

``python -m tests.bad_inputs`` prints the table in docs/bad-inputs.md;
tests/test_bad_inputs.py checks that every message there is still the one produced, and that none
is a traceback. Makers live in tests/bad_input_cases.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from flwr.app import Array, ArrayRecord, RecordDict

from client.data import load_records
from client.faults import parse_faults
from client.policy import load_policy
from client.prepare import prepare_site
from common.arrays import to_record
from common.config import RunConfig, default_run_config
from common.errors import ConfigError, FedtuneError
from server.checkpoint import CoordinatorState, config_drift, latest_checkpoint, save_checkpoint
from tests.bad_input_cases import (
    FIELDS,
    GOOD,
    Maker,
    audit,
    bad_record_at_prepare,
    cli,
    corrupt_set,
    file,
    global_adapter,
    impostor,
    kind_not_prepared,
    metric,
    no_receipt,
    not_prepared,
    other_settings,
    policy,
    receipt_without_hash,
    refused,
    rejected,
    request,
    second_metric_record,
    site,
    site_field,
    site_round,
    trained_ledger,
    went_backwards,
)


def _checkpoint(d: Path, model: Path) -> None:
    save_checkpoint(d, CoordinatorState("r1", 1, to_record({"b": torch.zeros(2)}), {}))
    adapter = d / "checkpoints" / "round-0001" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-4] + b"\xff" * 4)
    latest_checkpoint(d)


def _policy_errors(d: Path, model: Path) -> None:
    text = '[site]\nstate-dir = "s"\n\n[data]\npath = "d.jsonl"\neval-fraction = 0.9\n\n[privacy]\n'
    load_policy(policy(d, text + "max-epsilon = -1\nmax-epsilom = 2\n\n[extra]\nx = 1\n"))


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _policy(text: str) -> Maker:
    return lambda d, model: load_policy(policy(d, text))


_MINIMAL = '[data]\npath = "d.jsonl"\n[model]\npath = "m"\n'


def _no_cuda(d: Path, model: Path) -> None:
    with mock.patch("torch.cuda.is_available", return_value=False):
        site(d, model, prepared=False, compute={"device": "cuda"}).compute()


def _too_big(d: Path, model: Path) -> None:
    site(d, model, prepared=False, compute={"max-memory-gb": 0.0001}).compute()


def _mislabelled(c: RecordDict) -> None:
    arrays = c.array_records["arrays"]
    for key, arr in list(arrays.items()):
        arrays[key] = Array("bfloat16", arr.shape, arr.stype, arr.data)


def _no_worker(d: Path, model: Path) -> None:
    from client.worker import WorkerClient

    WorkerClient(d / "site.sock").train(ArrayRecord(), {})


def _full_disk(d: Path, model: Path) -> None:
    with mock.patch("client.site.shutil.disk_usage", return_value=mock.Mock(free=3 * 2**20)):
        site(d, model, prepared=False).check_state_dir()


def _unwritable(d: Path, model: Path) -> None:
    file(d, "state", "a file where the state folder should be")
    site(d, model, prepared=False).check_state_dir()


def _unwritable_at_prepare(d: Path, model: Path) -> None:
    file(d, "state", "a file where the state folder should be")
    site(d, model)


def _no_permission(d: Path, model: Path) -> None:
    agent = site(d, model, prepared=False)
    with mock.patch.object(Path, "write_text", side_effect=PermissionError(13, "Permission denied")):
        agent.check_state_dir()


def _drift(d: Path, model: Path) -> None:
    saved = default_run_config()
    drift = config_drift(saved, saved | {"learning-rate": 0.05, "lora-rank": 32})
    raise ConfigError("run config", [*drift, "resume with the interrupted run's run config"])


def _data(text: bytes | str, fields: tuple[str, ...] = FIELDS, **kw: Any) -> Maker:
    return lambda d, model: load_records(file(d, "a.jsonl", text), fields, **kw)


def _delete(agent: Any, d: Path, start: Any) -> dict[str, Any]:
    agent.policy.ledger_path.unlink()
    return {}


def _empty(agent: Any, d: Path, start: Any) -> dict[str, Any]:
    agent.policy.ledger_path.write_text("")
    return {}


def _cut(agent: Any, d: Path, start: Any) -> dict[str, Any]:
    lines = agent.policy.ledger_path.read_text().splitlines()
    agent.policy.ledger_path.write_text(lines[0] + "\n")
    return {}


def _move_state(agent: Any, d: Path, start: Any) -> dict[str, Any]:
    text = (d / "policy.toml").read_text().replace('state-dir = "state"', 'state-dir = "state2"')
    (d / "policy.toml").write_text(text)
    prepare_site(load_policy(d / "policy.toml"))  # the admin prepared the new state dir too
    return {}


def _head_gone(agent: Any, d: Path, start: Any) -> dict[str, Any]:
    agent.policy.ledger_head.unlink()
    return {}


def _wiped(agent: Any, d: Path, start: Any) -> dict[str, Any]:
    last = agent.ledger.entries()[-1]
    agent.policy.ledger_path.unlink()
    agent.policy.ledger_head.unlink()
    return {"ledger-seq": last.seq, "ledger-hash": last.hash}


def _empty_ledger(d: Path, model: Path) -> list[Path]:
    return [file(d, "h1.jsonl", "")]


def _binary_ledger(d: Path, model: Path) -> list[Path]:
    return [file(d, "h1.jsonl", b"\x00\xff\xfe garbage\n")]


def _folder_ledger(d: Path, model: Path) -> list[Path]:
    (d / "h1.jsonl").mkdir()
    return [d / "h1.jsonl"]


def _nested_ledger(d: Path, model: Path) -> list[Path]:
    return [file(d, "h1.jsonl", "[" * 5000 + "]" * 5000 + "\n")]


def _cut_reservation(d: Path, model: Path) -> list[Path]:
    agent, ledger = trained_ledger(d, model)
    # dies after reserving
    killed = mock.patch.object(agent, "train_step", side_effect=RuntimeError("killed"))
    with killed, contextlib.suppress(RuntimeError):
        agent.train_round(global_adapter(model), request(model, **{"server-round": 2}))
    ledger.write_bytes(agent.policy.ledger_path.read_bytes())  # the auditor's copy ...
    (ledger.parent / "h1.head.json").write_bytes(agent.policy.ledger_head.read_bytes())
    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join(lines[:-1]) + "\n")  # ... with the uncommitted reservation cut off
    return [ledger]


def _receipt_lacks_entry(d: Path, model: Path) -> list[Path]:
    from privacy.ledger_entries import entry_hash
    from privacy.receipts import receipt_line

    agent, ledger = trained_ledger(d, model, head=False)
    entry = {k: v for k, v in agent.ledger.entries()[-1].raw.items() if k != "signature"} | {"seq": 7}
    entry["hash"] = entry_hash(entry)  # a well-formed receipt of an entry this ledger does not hold
    (d / "receipts.jsonl").write_text(receipt_line("h1", entry) + "\n")
    return [ledger]


def _nonfinite(d: Path, model: Path) -> None:
    start = global_adapter(model)
    key = next(iter(start))
    bad = start[key].numpy().copy()
    bad.flat[0] = float("inf")
    start[key] = type(start[key])(bad)
    out = site(d, model).train_round(start, request(model))
    raise FedtuneError(f"site refuses: {out.reason}")


def _lower_round(d: Path, model: Path) -> None:
    agent = site(d, model)
    start = global_adapter(model)
    agent.train_round(start, request(model, **{"server-round": 3}))
    out = agent.train_round(start, request(model, **{"server-round": 2}))
    raise FedtuneError(f"site refuses: {out.reason}")


CASES: list[tuple[str, str, Maker]] = [
    ("site policy", "several mistakes at once", _policy_errors),
    ("site policy", "not TOML", _policy("[site\nname=")),
    ("site policy", "file missing", lambda d, m: load_policy(d / "none.toml")),
    ("site policy", "a folder", lambda d, m: load_policy(d)),
    ("site policy", "not UTF-8", lambda d, m: load_policy(file(d, "p.toml", b"[site]\nname = '\xff'\n"))),
    (
        "site policy",
        "nested 10,000 deep",
        lambda d, m: load_policy(file(d, "p.toml", "x = " + "[" * 10000 + "]" * 10000)),
    ),
    ("site policy", "site name '../x'", _policy('[site]\nname = "../x"\n' + _MINIMAL)),
    ("site policy", "site name with a newline", _policy('[site]\nname = "a\\nb"\n' + _MINIMAL)),
    (
        "site policy",
        "ledger-head inside state-dir",
        _policy('[site]\nname = "a"\nledger-head = "state/h.json"\n' + _MINIMAL),
    ),
    (
        "site policy",
        "per-round budget above per-run",
        _policy(
            '[site]\nname = "a"\n'
            + _MINIMAL
            + "[privacy]\nmax-epsilon-per-run = 2.0\nmax-epsilon-per-round = 3.0\n"
        ),
    ),
    (
        "site policy",
        "[compute] device and quantization misspelt",
        _policy('[site]\nname = "a"\n' + _MINIMAL + '[compute]\ndevice = "gpu"\nquantization = "4bit"\n'),
    ),
    ("site policy", "[compute] device = 'cuda' on a machine without CUDA", _no_cuda),
    ("site policy", "[compute] a base model larger than max-memory-gb", _too_big),
    (
        "run config",
        "wire-dtype bfloat16 under SecAgg+",
        lambda d, m: RunConfig.from_flower({"secagg": True, "wire-dtype": "bfloat16", "min-train-sites": 3}),
    ),
    (
        "run config",
        "three bad keys at once",
        lambda d, m: RunConfig.from_flower(
            {"num-server-rounds": 0, "learning-rat": 0.1, "aggregation": "mean"}
        ),
    ),
    (
        "run config",
        "1e400 as a learning rate",
        lambda d, m: RunConfig.from_flower({"learning-rate": 10**400}),
    ),
    (
        "run config",
        "sim-policies not a JSON list",
        lambda d, m: RunConfig.from_flower({"sim-policies": "[1, 2"}).policy_paths(),
    ),
    (
        "data",
        "not UTF-8 (line 2)",
        _data(GOOD.encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1")),
    ),
    ("data", "broken JSON (line 2)", _data(GOOD + "\n{oops\n")),
    ("data", "field missing", _data(json.dumps({"instruction": "x"}))),
    ("data", "empty field", _data(json.dumps({"instruction": " ", "response": "y"}))),
    ("data", "JSON line is not an object", _data("[1, 2]\n")),
    (
        "data",
        "a conversation that ends with the user",
        _data(json.dumps({"messages": [{"role": "user", "content": "hi"}]}), ("messages",)),
    ),
    ("data", "empty file", _data("")),
    (
        "data",
        "oversized record",
        _data(json.dumps({"instruction": "x" * 300, "response": "y"}), max_chars=200),
    ),
    ("data", "an unpaired surrogate (\\ud800)", _data('{"instruction": "a\\ud800b", "response": "y"}\n')),
    ("data", "JSON nested 100,000 deep", _data("[" * 100_000 + "]" * 100_000 + "\n")),
    (
        "data",
        "path is a folder",
        lambda d, m: load_records(_folder(d / "dir.jsonl"), FIELDS),
    ),
    ("data", "file missing", lambda d, m: load_records(d / "gone.jsonl", FIELDS)),
    ("data", "unsupported file type", lambda d, m: load_records(file(d, "a.txt", GOOD), FIELDS)),
    ("data", "a bad record (line 3), at `fedtune site prepare`", bad_record_at_prepare),
    ("data", "site not prepared (a round before `fedtune site prepare`)", not_prepared),
    ("data", "a kind not prepared (its documents never were)", kind_not_prepared),
    ("data", "prepared with other [pii] settings", other_settings),
    ("data", "prepared set corrupt (a chunk cut short)", corrupt_set),
    ("state dir", "a file, not a folder", _unwritable),
    ("state dir", "a file, not a folder, at `fedtune site prepare`", _unwritable_at_prepare),
    ("state dir", "no write permission (EACCES, mocked: tests run as root)", _no_permission),
    ("state dir", "disk full (3 MiB free, mocked)", _full_disk),
    ("request", "negative learning rate", refused(**{"learning-rate": -0.5})),
    ("request", "NaN learning rate", refused(**{"learning-rate": float("nan")})),
    ("request", "learning rate above the policy's ceiling", refused(**{"learning-rate": 5.0})),
    ("request", "noise multiplier -1", refused(**{"noise-multiplier": -1.0})),
    (
        "request",
        "0 local steps, batch 0, clip 0, rank 0",
        refused(**{"local-steps": 0, "batch-size": 0, "max-grad-norm": 0.0, "lora-rank": 0}),
    ),
    ("request", "LoRA target the model lacks", refused(**{"lora-targets": "no_such_proj"})),
    ("request", "max-seq-len 100000", refused(**{"max-seq-len": 100_000})),
    ("request", "round past num-rounds", refused(**{"server-round": 9})),
    ("request", "train-kind the site has no records for", refused(**{"train-kind": "cpt"})),
    ("request", "train-kind 'rlhf'", refused(**{"train-kind": "rlhf"})),
    ("request", "max-seq-len no response fits in", refused(**{"max-seq-len": 8})),
    ("request", "run id '../x'", refused(**{"run-id": "../x"})),
    ("request", "a key the site does not know", refused(**{"site-weight": 2.0})),
    ("request", "a non-finite global adapter", lambda d, m: _nonfinite(d, m)),
    ("request", "seeded noise without the site's opt-in", refused(seed=7)),
    ("request", "noise below the site's floor", refused(**{"noise-multiplier": 0.1})),
    ("request", "a round lower than one reserved", _lower_round),
    ("request", "non-private round without the site's consent", refused(dp=False)),
    ("ledger", "deleted after round 1", site_round(_delete)),
    ("ledger", "emptied", site_round(_empty)),
    ("ledger", "its end cut off", site_round(_cut)),
    ("ledger", "state-dir changed", site_round(_move_state)),
    ("ledger", "head record deleted", site_round(_head_gone)),
    ("ledger", "ledger and head wiped; the coordinator remembers", site_round(_wiped)),
    ("reply", "an extra metric key", rejected(metric("my-metric", 1.0))),
    (
        "reply",
        "float32 bytes sent under the name bfloat16 (wire-dtype bfloat16)",
        rejected(_mislabelled, wire="bfloat16"),
    ),
    ("reply", "a second MetricRecord", rejected(second_metric_record)),
    ("reply", "a NaN metric", rejected(metric("train-loss", float("nan")))),
    ("reply", "site-weight 2 (site-level DP)", rejected(metric("site-weight", 2.0), site_dp=True)),
    ("reply", "site name '../x'", rejected(site_field("name", "../x"))),
    ("reply", "a kind the run did not ask for", rejected(site_field("train-kind", "cpt"))),
    ("reply", "site name with a newline", rejected(site_field("name", "a\nb"))),
    ("reply", "unknown status", rejected(site_field("status", "great"))),
    ("reply", "no receipt", rejected(no_receipt)),
    ("reply", "receipt without its hash", rejected(receipt_without_hash)),
    ("reply", "another site's name", impostor),
    ("reply", "its ledger went backwards", went_backwards),
    (
        "update",
        "NaN value",
        rejected(
            lambda c: None,
            arrays=to_record(
                {"a.lora_A.weight": torch.full((2, 4), float("nan")), "a.lora_B.weight": torch.zeros(4, 2)}
            ),
        ),
    ),
    (
        "update",
        "wrong shape",
        rejected(
            lambda c: None,
            arrays=to_record({"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(3, 2)}),
        ),
    ),
    ("update", "norm 1000x", rejected(lambda c: None, value=100.0)),
    ("update", "absurd num-examples", rejected(lambda c: None, n=0)),
    ("update", "replayed round", rejected(lambda c: None, rnd=2)),
    (
        "update",
        "does not match its receipt",
        rejected(
            lambda c: None,
            receipt_of=to_record(
                {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
            ),
        ),
    ),
    ("audit", "an empty ledger", audit(_empty_ledger)),
    ("audit", "a binary ledger", audit(_binary_ledger)),
    ("audit", "a folder for a ledger", audit(_folder_ledger)),
    ("audit", "a line nested 5,000 deep", audit(_nested_ledger)),
    ("audit", "the reservation of a crashed round cut off", audit(_cut_reservation)),
    (
        "audit",
        "a receipt the ledger lacks",
        lambda d, m: audit(_receipt_lacks_entry, receipts=d / "receipts.jsonl")(d, m),
    ),
    ("resume", "corrupt checkpoint (only one)", _checkpoint),
    ("resume", "run config changed", _drift),
    ("fault drill", "bad FEDTUNE_FAULTS", lambda d, m: parse_faults("h1:explode")),
    ("CLI", "simulate --max-epsilon 1e400", cli("simulate", "--out", "{d}/run", "--max-epsilon", "1e400")),
    (
        "CLI",
        "simulate --quantization nf8 (before anything is written)",
        cli("simulate", "--out", "{d}/run", "--quantization", "nf8"),
    ),
    ("node config", "worker set but no site worker running", _no_worker),
    (
        "CLI",
        "simulate --run-config with a typo (before Ray starts)",
        cli("simulate", "--out", "{d}/run", "--run-config", "learning-rat=0.1"),
    ),
    (
        "CLI",
        "an error naming [privacy] (no markup lost)",
        lambda d, m: cli(
            "site",
            "anchor",
            str(policy(d, '[site]\nname = "a"\n' + _MINIMAL + "[privacy]\nmax-epsilom = 1\n")),
        )(d, m),
    ),
]


_VOLATILE = [
    (re.compile(r"\b[0-9a-f]{12,64}\b"), "<hash>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00"), "<time>"),
    (re.compile(r"\(hash <hash>\.\.\.\)"), "(hash <hash>...)"),
]


def messages(model: Path) -> list[tuple[str, str, str]]:
    """(input kind, what was wrong, message with the temporary folder shown as ``<dir>``)."""
    rows = []
    for kind, what, make in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp).resolve()
            try:
                make(d, model)
            except FedtuneError as exc:
                text = str(exc).replace(str(d), "<dir>").replace(str(model), "<model>")
            else:
                raise AssertionError(f"{kind} / {what}: no error raised")
        for pattern, repl in _VOLATILE:
            text = pattern.sub(repl, text)
        rows.append((kind, what, text))
    return rows


def table(model: Path) -> str:
    """The markdown table of docs/bad-inputs.md."""
    out = ["| input | what was wrong | message |", "|---|---|---|"]
    for kind, what, text in messages(model):
        cell = text.replace("|", "\\|").replace("\n", "<br>")
        out.append(f"| {kind} | {what} | {cell} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    from fedtune.simulate import default_model

    sys.stdout.write(table(default_model()))

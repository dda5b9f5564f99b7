"""How each bad input of docs/bad-inputs.md is produced: small, self-contained makers per kind.

A maker gets a fresh temporary folder and the embedded tiny model's folder, and must raise the
``FedtuneError`` a user would see -- or, where the product answers with a reply instead of an
exception (a site's refusal, a rejected update), raise that reply's reason as one.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.policy import load_policy, render_policy
from client.prepare import prepare_site
from client.prepared import read_manifest
from client.site import SiteAgent
from common.arrays import to_record
from common.config import LoraSpec, RunConfig, TrainRequest
from common.errors import FedtuneError
from common.modeling import adapter_state, load_base_model, make_peft_model, model_fingerprint
from privacy.audit import verify_ledgers
from server.strategy import SiteLevelDP
from tests.server.replies import edit, guard, trained

FIELDS = ("instruction", "response")
GOOD = json.dumps({"instruction": "Summarise the note.", "response": "Stable, discharged home."})
Maker = Callable[[Path, Path], object]


def file(d: Path, name: str, data: bytes | str) -> Path:
    """Write ``data`` to ``d/name``."""
    p = d / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def policy(d: Path, text: str) -> Path:
    """A policy file with ``text``."""
    return file(d, "policy.toml", text)


def site(d: Path, model: Path, *, prepared: bool = True, **kw: Any) -> SiteAgent:
    """A site with 24 short records, the given model and a default policy; prepared unless not."""
    notes = [
        json.dumps({"instruction": f"Summarise note {i}.", "response": f"Stable on day {i}."})
        for i in range(24)
    ]
    data = file(d, "notes.jsonl", "\n".join(notes) + "\n")
    pol = load_policy(policy(d, render_policy(name="h1", data_path=data, model_path=model, **kw)))
    if prepared:
        prepare_site(pol, kinds=["sft"])  # as `fedtune site prepare` before any round
    return SiteAgent(pol)


@contextlib.contextmanager
def unprepared() -> Iterator[None]:
    """No preparation on a first round (the test suite's ``prepared_on_first_use`` is undone)."""
    with mock.patch("client.data.read_manifest", read_manifest):
        yield


def not_prepared(d: Path, model: Path) -> None:
    """A round at a site nobody prepared."""
    with unprepared():
        site(d, model, prepared=False).train_round(global_adapter(model), request(model))


def kind_not_prepared(d: Path, model: Path) -> None:
    """A cpt round at a site whose documents were never prepared (only its sft records were)."""
    docs = file(d, "docs.jsonl", "".join(json.dumps({"text": f"Ward note {i}."}) + "\n" for i in range(8)))
    agent = site(d, model, cpt_path=docs)
    with unprepared():
        out = agent.train_round(global_adapter(model), request(model, **{"train-kind": "cpt"}))
    raise FedtuneError(f"site refuses: {out.reason}" if not out.trained else "trained (no refusal)")


def other_settings(d: Path, model: Path) -> None:
    """The [pii] operator changed after preparation."""
    site(d, model)
    text = (d / "policy.toml").read_text(encoding="utf-8")
    (d / "policy.toml").write_text(text.replace('operator = "placeholder"', 'operator = "redact"'))
    with unprepared():
        SiteAgent(load_policy(d / "policy.toml")).train_round(global_adapter(model), request(model))


def corrupt_set(d: Path, model: Path) -> None:
    """A chunk of the prepared set cut short (a disk error, a bad copy)."""
    agent = site(d, model)
    chunk = next((agent.policy.state_dir / "prepared" / "sft").glob("*/*.json"))
    chunk.write_bytes(chunk.read_bytes()[:-40])
    SiteAgent(load_policy(d / "policy.toml")).train_round(global_adapter(model), request(model))


def bad_record_at_prepare(d: Path, model: Path) -> None:
    """`fedtune site prepare` of a file whose third record lacks its response."""
    data = file(d, "notes.jsonl", f"{GOOD}\n{GOOD}\n" + json.dumps({"instruction": "x"}) + "\n")
    prepare_site(load_policy(policy(d, render_policy(name="h1", data_path=data, model_path=model))))


def global_adapter(model: Path) -> ArrayRecord:
    """The round-0 global adapter of the coordinator."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return to_record(
            adapter_state(make_peft_model(load_base_model(model), LoraSpec(4, 8, "q_proj,v_proj")))
        )


def request(model: Path, **change: Any) -> dict[str, Any]:
    """A well-formed train request record, with ``change`` applied."""
    cfg = RunConfig.from_flower(
        {
            "lora-rank": 4,
            "lora-alpha": 8,
            "max-seq-len": 64,
            "local-steps": 1,
            "batch-size": 2,
            "num-server-rounds": 3,
        }
    )
    return (
        TrainRequest.build(cfg, server_round=1, run_id="r1", fingerprint=model_fingerprint(model)).to_record()
        | change
    )


def refused(**change: Any) -> Maker:
    """A request the site answers with a refusal: the refusal's reason."""

    def run(d: Path, model: Path) -> None:
        agent = site(d, model)
        out = agent.train_round(global_adapter(model), request(model, **change))
        raise FedtuneError(f"site refuses: {out.reason}" if not out.trained else "trained (no refusal)")

    return run


def site_round(prepare: Callable[[SiteAgent, Path, ArrayRecord], dict[str, Any]], **policy_kw: Any) -> Maker:
    """Train round 1, let ``prepare`` break something, then ask for round 2: the site's answer."""

    def run(d: Path, model: Path) -> None:
        agent = site(d, model, **policy_kw)
        start = global_adapter(model)
        agent.train_round(start, request(model))
        change = prepare(agent, d, start)
        again = SiteAgent(load_policy(d / "policy.toml"))  # a new process: nothing cached
        out = again.train_round(start, request(model, **{"server-round": 2, **change}))
        raise FedtuneError(f"site refuses: {out.reason}" if not out.trained else "trained (no refusal)")

    return run


def rejected(
    change: Callable[[RecordDict], None], *, site_dp: bool = False, wire: str = "float32", **reply: Any
) -> Maker:
    """A site reply the coordinator rejects (in a run whose updates travel as ``wire``): the reason logged."""

    def run(d: Path, model: Path) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        dp = SiteLevelDP(1.0, 1.0, 1e-3) if site_dp else None
        g = guard(site_dp=dp, max_update_norm=100.0, wire=wire)
        g.aggregate_train(1, [edit(trained(1, **({"value": 0.1} | reply)), change)])
        raise FedtuneError("rejected: " + g.rows[0].reason)

    return run


def metric(key: str, value: float) -> Callable[[RecordDict], None]:
    """Set one train metric."""
    return lambda c: c.metric_records["metrics"].__setitem__(key, value)


def site_field(key: str, value: str) -> Callable[[RecordDict], None]:
    """Set one field of the reply's ``site`` record."""
    return lambda c: c.config_records["site"].__setitem__(key, value)


def second_metric_record(c: RecordDict) -> None:
    """A hostile extra MetricRecord."""
    c["extra"] = MetricRecord({"x": 1.0})


def receipt_without_hash(c: RecordDict) -> None:
    """The receipt entry with its ``hash`` removed."""
    entry = json.loads(str(c.config_records["receipt"]["entry"]))
    del entry["hash"]
    c["receipt"] = ConfigRecord({"entry": json.dumps(entry)})


def no_receipt(c: RecordDict) -> None:
    """No receipt at all."""
    del c.config_records["receipt"]


def impostor(d: Path, model: Path) -> None:
    """Node 2 speaks as the site node 1 already is."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    g = guard()
    g.aggregate_train(1, [trained(1, 0.1, site="h1"), trained(2, 0.1, site="h1")])
    raise FedtuneError("rejected: " + g.rows[1].reason)


def went_backwards(d: Path, model: Path) -> None:
    """A site whose ledger answers with an older entry than the coordinator saw."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    g = guard()
    g.aggregate_train(1, [trained(1, 0.1, seq=9, epsilon=6.0)])
    g._round = 2
    g.aggregate_train(2, [trained(1, 0.1, rnd=2, seq=3, epsilon=1.0)])
    raise FedtuneError("rejected: " + g.rows[0].reason)


def audit(prepare: Callable[[Path, Path], list[Path]], **kw: Any) -> Maker:
    """``fedtune audit verify`` of what ``prepare`` lays out: its error findings."""

    def run(d: Path, model: Path) -> None:
        result = verify_ledgers(prepare(d, model), **kw)
        errors = [str(f) for f in result.findings if f.severity == "error"]
        raise FedtuneError("verification FAILED: " + "; ".join(errors) if errors else "all checks hold")

    return run


def trained_ledger(d: Path, model: Path, *, head: bool = True) -> tuple[SiteAgent, Path]:
    """A site that trained one round; its ledger (and head record) copied as an auditor gets them."""
    agent = site(d, model)
    agent.train_round(global_adapter(model), request(model))
    out = d / "audit"
    out.mkdir()
    ledger = out / "h1.jsonl"
    ledger.write_bytes(agent.policy.ledger_path.read_bytes())
    if head:
        (out / "h1.head.json").write_bytes(agent.policy.ledger_head.read_bytes())
    return agent, ledger


@contextlib.contextmanager
def _argv(args: list[str]) -> Iterator[io.StringIO]:
    err = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["fedtune", *args]),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        yield err


def cli(*args: str) -> Callable[[Path, Path], None]:
    """What ``fedtune ARGS`` prints on stderr (the console entry point, in this process)."""

    def run(d: Path, model: Path) -> None:
        from fedtune.cli import main

        resolved = [a.replace("{d}", str(d)).replace("{model}", str(model)) for a in args]
        with _argv(resolved) as err, contextlib.suppress(SystemExit):
            main()
        raise FedtuneError(" ".join(err.getvalue().split()))

    return run

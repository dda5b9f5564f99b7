"""Training kinds at a site: the policy decides which it trains, and the ledger says which it did."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord

from client.data import load_site_data
from client.policy import load_policy
from embedded.synthdata import generate_site_documents, generate_site_records
from tests.client.hostile import Site, reason, status


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 raw clinical documents (one to six visits each, with planted PII)."""
    docs, _ = generate_site_documents(0, 24, seed=2)
    path = tmp_path_factory.mktemp("cpt") / "notes.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def _ask(site: Site, arrays: ArrayRecord, rnd: int, **train: Any) -> Any:
    return site.ask_record(arrays, site.request_record(rnd) | train)


def test_continued_pretraining_trains_on_the_raw_documents_and_records_the_kind(
    tmp_path: Path, hostile_data: Path, tiny_model: Path, documents: Path, start_adapter: ArrayRecord
) -> None:
    site = Site(tmp_path / "site", hostile_data, tiny_model)
    site.policy.write_text(
        site.policy.read_text().replace('cpt-path = ""', f'cpt-path = "{documents}"'), encoding="utf-8"
    )
    reply = _ask(site, start_adapter, 1, **{"train-kind": "cpt", "max-seq-len": 64, "batch-size": 3})
    assert status(reply) == "trained", reason(reply)
    assert reply.content.config_records["site"]["train-kind"] == "cpt"
    reserve = [e for e in site.entries() if e["kind"] == "reserve"]
    assert reserve[-1]["train_kind"] == "cpt"
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] < 24 and metrics["records-too-long"] == 0  # documents, not chunks
    assert (site.root / "state" / "scrub-report-cpt.json").is_file()  # the documents were scrubbed
    sft = _ask(site, start_adapter, 2)
    assert status(sft) == "trained" and sft.content.config_records["site"]["train-kind"] == "sft"
    kinds = [e.get("train_kind") for e in site.entries() if e["kind"] == "reserve"]
    assert kinds == ["cpt", "sft"]  # one ledger, one budget for every kind


def test_a_kind_the_policy_does_not_allow_or_has_no_records_for_is_refused(
    fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    reply = _ask(fresh_site, start_adapter, 1, **{"train-kind": "cpt"})
    assert status(reply) == "refused" and "cpt-path is not set" in reason(reply)
    text = re.sub(r"allowed-kinds = \[[^\]]*\]", 'allowed-kinds = ["cpt"]', fresh_site.policy.read_text())
    fresh_site.policy.write_text(text, encoding="utf-8")
    reply = _ask(fresh_site, start_adapter, 2)
    assert status(reply) == "refused" and "not in the site's [training] allowed-kinds (cpt)" in reason(reply)
    assert fresh_site.kinds() == ["refuse", "refuse"]  # nothing reserved


def test_an_unknown_kind_is_refused_with_its_key(fresh_site: Site, start_adapter: ArrayRecord) -> None:
    reply = _ask(fresh_site, start_adapter, 1, **{"train-kind": "rlhf"})
    assert status(reply) == "refused" and "train-kind" in reason(reply)


def test_a_site_trains_multi_turn_conversations_with_every_turn_scrubbed(
    tmp_path: Path, tiny_model: Path, start_adapter: ArrayRecord
) -> None:
    records, planted = generate_site_records(1, 40, seed=6)
    chats = [
        {"messages": [
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["response"]},
            {"role": "user", "content": "Thanks. Anything to flag for the next visit?"},
            {"role": "assistant", "content": "Confirm the follow-up date with the patient."},
        ]}
        for r in records
    ]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    site = Site(tmp_path / "site", data, tiny_model)
    text = re.sub(r"text-fields = \[[^\]]*\]", 'text-fields = ["messages"]', site.policy.read_text())
    site.policy.write_text(text, encoding="utf-8")
    reply = site.ask_record(start_adapter, site.request_record(1) | {"max-seq-len": 192})
    assert status(reply) == "trained", reason(reply)
    prepared = load_site_data(load_policy(site.policy))  # the prepared set
    turns = [turn for e in prepared.train + prepared.eval for _, turn in e.turns]
    assert len(turns) == 4 * 40
    leaked = [p.value for p in planted if any(p.value in t for t in turns)]
    assert not leaked, leaked[:3]

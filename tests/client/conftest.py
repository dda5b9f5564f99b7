"""Fixtures of the site tests that play a hostile coordinator (tests/client/hostile.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.supercore.task_identity import TaskIdentity

from common.arrays import to_record
from common.config import LoraSpec
from common.modeling import adapter_state, load_base_model, make_peft_model
from embedded.synthdata import generate_site_records
from tests.client.hostile import Site

LORA = LoraSpec(rank=4, alpha=8, targets="q_proj,v_proj")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: micro-model steps are tiny, and a shared 2-core box thrashes with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def message_identity() -> Iterator[None]:
    """Flower needs a task identity to build messages outside a ServerApp."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic records of one site."""
    records, _ = generate_site_records(0, 40, seed=5)
    path = tmp_path_factory.mktemp("hostile") / "site.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def start_adapter(tiny_model: Path) -> ArrayRecord:
    """The coordinator's round-0 adapter."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return to_record(adapter_state(make_peft_model(load_base_model(tiny_model), LORA)))


@pytest.fixture
def fresh_site(tmp_path: Path, hostile_data: Path, tiny_model: Path) -> Site:
    """A fresh site per test."""
    return Site(tmp_path / "site", hostile_data, tiny_model)


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory: pytest.TempPathFactory, hostile_data: Path, tiny_model: Path) -> Site:
    """One site for the cases that only ever refuse (its data and model load once)."""
    return Site(tmp_path_factory.mktemp("shared") / "site", hostile_data, tiny_model)

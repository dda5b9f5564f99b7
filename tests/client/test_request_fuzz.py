"""Fuzz of coordinator requests against one site: train and commit, or refuse and record why.

For any request a coordinator could send (any keys, any values of any type, any adapter): the site's
ledger grows by exactly ``reserve, commit`` (it trained) or ``refuse`` (it said why), never by a
reservation that was not committed; a request that its parser or the site policy would refuse never
reaches a reservation; and the ledger's epsilon never passes max-epsilon.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.policy import load_policy
from common.config import TrainRequest
from common.errors import ConfigError
from privacy.accounting import MechanismStep, epsilon
from tests.client.hostile import Site, status

MAX_EPSILON = 50.0
RUNS = itertools.count()
KEYS = [
    "server-round", "num-rounds", "run-id", "local-steps", "batch-size", "learning-rate", "max-grad-norm",
    "noise-multiplier", "max-seq-len", "lora-rank", "lora-alpha", "lora-targets", "ffa-lora", "dp",
    "base-model-fingerprint", "seed", "ledger-seq", "ledger-hash", "site-weight",
]  # fmt: skip
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.binary(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
)
PLAUSIBLE = {
    "server-round": st.integers(0, 5),
    "num-rounds": st.integers(0, 5),
    "run-id": st.sampled_from(["runA", "runB", "../x", "", "a" * 70]),
    "local-steps": st.integers(-1, 3),
    "batch-size": st.integers(-1, 40),
    "learning-rate": st.sampled_from([0.01, 0.05, -0.5, 0.0, 2.0, 1e30, math.nan, math.inf]),
    "max-grad-norm": st.sampled_from([0.5, 1.0, 0.0, -1.0, 50.0]),
    "noise-multiplier": st.sampled_from([0.0, 0.05, 0.6, 1.0, 2.0, -1.0, math.nan]),
    "max-seq-len": st.sampled_from([8, 64, 0, 100_000]),
    "lora-rank": st.sampled_from([4, 0, 2, 10_000]),
    "lora-targets": st.sampled_from(["q_proj,v_proj", "q_proj", "no_such", "", "q_proj,,v_proj"]),
    "ffa-lora": st.booleans(),
    "dp": st.booleans(),
    "seed": st.sampled_from([-1, 0, 7]),
    "ledger-seq": st.sampled_from([-1, 0, 1, 10**6]),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request record: mostly well-formed, each key perturbed with some probability."""
    run = f"run{next(RUNS)}"  # a run of its own: rounds of earlier examples do not refuse it
    changes: dict[str, Any] = {"server-round": draw(st.integers(1, 3)), "run-id": run}
    changes["noise-multiplier"] = 1.0  # requested noise: no calibration per example (it is drawn below too)
    if draw(st.integers(0, 3)) == 0:  # a quarter untouched, so the accepting path is always reached too
        return changes
    for key in KEYS:
        how = draw(st.sampled_from(["keep"] * 16 + ["any", "plausible", "drop"]))  # shrinks to "keep"
        if how == "any":
            changes[key] = draw(ANY)
        elif how == "plausible" and key in PLAUSIBLE:
            changes[key] = draw(PLAUSIBLE[key])
        elif how == "drop" and key != "site-weight":
            changes[key] = None  # dropped below
    return changes


@st.composite
def adapters(draw: st.DrawFn) -> str:
    """How the global adapter is spoiled (or not)."""
    return draw(st.sampled_from(["intact"] * 8 + ["inf", "nan", "float64", "missing-key", "huge"]))


def _adapter(start: ArrayRecord, how: str) -> ArrayRecord:
    items = dict(start.items())
    key = next(iter(items))
    x = items[key].numpy().copy()
    if how == "inf":
        x.flat[0] = np.inf
    elif how == "nan":
        x.flat[-1] = np.nan
    elif how == "huge":
        x[:] = 1e30
    elif how == "float64":
        items[key] = Array(x.astype(np.float64))
        return ArrayRecord(items)
    elif how == "missing-key":
        del items[key]
        return ArrayRecord(items)
    items[key] = Array(x)
    return ArrayRecord(items)


def _parses(record: dict[str, Any]) -> TrainRequest | None:
    try:
        return TrainRequest.from_record(record)
    except ConfigError:
        return None


@pytest.fixture(scope="module")
def fuzz_site(tmp_path_factory: pytest.TempPathFactory, hostile_data: Path, tiny_model: Path) -> Site:
    """A site whose budget lasts the fuzz: only the mechanism of each round is exercised."""
    root = tmp_path_factory.mktemp("fuzz") / "site"
    return Site(root, hostile_data, tiny_model, max_epsilon=MAX_EPSILON)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(requests(), adapters())
def test_any_request_is_trained_and_committed_or_refused_and_recorded(
    fuzz_site: Site, start_adapter: ArrayRecord, changes: dict[str, Any], how: str
) -> None:
    site = fuzz_site
    before = site.entries()
    base = site.request_record(1, run="runA")
    record = {k: v for k, v in (base | changes).items() if v is not None}
    reply = site.ask_record(_adapter(start_adapter, how), record)
    after = site.entries()
    new = [e["kind"] for e in after[len(before) :]]
    assert after[: len(before)] == before  # append-only
    assert status(reply) in ("trained", "refused"), reply.error.reason if reply.has_error() else reply
    assert new in (["reserve", "commit"], ["refuse"]), new
    if new == ["reserve", "commit"]:
        req = _parses(record)
        pol = load_policy(site.policy)
        assert req is not None, "a request the parser refuses reached a reservation"
        assert how in ("intact", "huge"), "a malformed global adapter reached a reservation"  # huge: finite
        assert (
            req.train.learning_rate <= pol.training.max_learning_rate
            and req.train.max_seq_len <= pol.training.max_seq_len
        )
        assert (
            req.lora.rank <= pol.training.max_lora_rank
            and req.train.local_steps <= pol.privacy.max_steps_per_round
        )
        assert req.train.seed < 0 and req.train.dp  # the policy allows neither seeded nor non-private rounds
        reserve = after[len(before)]
        assert reserve["noise_multiplier"] >= pol.privacy.min_noise_multiplier
    history = [
        MechanismStep(e["noise_multiplier"], e["sample_rate"], e["steps"])
        for e in after
        if e["kind"] == "reserve"
    ]
    assert epsilon(history, delta=1e-5) <= MAX_EPSILON
    assert all(e["epsilon"] <= MAX_EPSILON for e in after if e["kind"] == "reserve")
    json.dumps(after)  # every entry stays plain JSON
    OUTCOMES.append(new[0])


OUTCOMES: list[str] = []


def test_the_fuzz_reached_both_outcomes() -> None:
    """Runs after the fuzz (file order): it must have trained some requests and refused others."""
    assert OUTCOMES.count("reserve") >= 5 and OUTCOMES.count("refuse") >= 5, OUTCOMES

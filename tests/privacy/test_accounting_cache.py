"""Tests for privacy.accounting_prv: cached, incremental accounting equals Opacus from scratch."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import Domain, PoissonSubsampledGaussianPRV, compute_safe_domain_size

import privacy.accounting_prv as prv
from privacy import accounting
from privacy.accounting import PRV_EPS_ERROR, MechanismStep, accounting_settings, calibrate_noise, epsilon
from privacy.audit import recompute_epsilon, verify_ledgers
from privacy.ledger import PrivacyLedger
from tests.privacy.accounting_helpers import counting, fresh_process

DELTA = 1e-5
Hist = list[tuple[float, float, int]]

histories = st.lists(
    st.tuples(st.floats(0.8, 3.0), st.floats(0.001, 0.05), st.integers(1, 100)),
    min_size=1,
    max_size=3,
    unique_by=lambda e: e[:2],
)


def _stock(history: Hist, accountant: str = "prv") -> float:
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(
            acc.get_epsilon(DELTA, eps_error=PRV_EPS_ERROR) if accountant == "prv" else acc.get_epsilon(DELTA)
        )


def _fixed(history: Hist) -> float:
    """Opacus's PRVAccountant from scratch on the recorded domain (what an auditor runs)."""
    acc = prv.FixedDomainPRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(acc.get_epsilon(DELTA, eps_error=PRV_EPS_ERROR))


@pytest.fixture(autouse=True)
def _cold() -> Iterator[None]:
    fresh_process()  # memory only (a site agent built earlier in this process may have set a store)
    yield
    fresh_process()


def _key(domain: Domain) -> tuple[float, float, int]:
    return (domain.t_min, domain.t_max, domain.size)


@settings(max_examples=5, deadline=None, database=None)
@given(history=histories)
def test_rdp_from_cached_vectors_is_opacus_bit_for_bit(history: Hist) -> None:
    assert prv.rdp_epsilon(history, DELTA) == _stock(history, "rdp")
    expected = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
        [n for *_, n in history],
        eps_error=PRV_EPS_ERROR,
        delta_error=DELTA / 1000,
    )
    assert prv.safe_width(history, PRV_EPS_ERROR, DELTA / 1000) == expected


@pytest.mark.parametrize(
    "history", [[(1.0, 0.01, 1000)], [(2.0, 0.001, 3)], [(0.8, 0.05, 200), (1.5, 0.02, 77)]]
)
def test_domain_is_finer_and_wider_than_opacus_with_its_layout(history: Hist) -> None:
    delta_error = DELTA / 1000
    total = sum(n for *_, n in history)
    opacus_mesh = PRV_EPS_ERROR / np.sqrt(total * np.log(12 / delta_error) / 2)
    width = prv.safe_width(history, PRV_EPS_ERROR, delta_error)
    domain = prv.prv_domain(history, PRV_EPS_ERROR, delta_error)
    assert domain.dt <= opacus_mesh * (1 + 1e-12)
    assert domain.t_min <= -width and domain.t_max >= width and domain.size % 2 == 0
    assert domain.ts[domain.size // 2 - 1] == pytest.approx(0.0, abs=domain.dt * 1e-6)  # Opacus's layout


@settings(max_examples=5, deadline=None, database=None)
@given(history=histories, data=st.data())
def test_incremental_equals_opacus_from_scratch(history: Hist, data: st.DataObject) -> None:
    # warm the caches with prefixes of the history and other histories, in any order
    for k in data.draw(st.lists(st.integers(1, len(history)), max_size=3)):
        prv.prv_epsilon(history[:k], DELTA, PRV_EPS_ERROR)
    incremental = prv.prv_epsilon(history, DELTA, PRV_EPS_ERROR)
    scratch = _fixed(history)
    # the same convolutions, folded instead of paired: equal to rounding, never below
    assert incremental == pytest.approx(scratch, rel=1e-9, abs=1e-6)
    assert incremental >= scratch - 1e-6
    # a stock PRVAccountant (Opacus's own domain): both are upper bounds of the same guarantee
    assert abs(incremental - _stock(history)) <= 2 * PRV_EPS_ERROR
    prv.clear_caches()
    assert prv.prv_epsilon(history, DELTA, PRV_EPS_ERROR) == incremental  # cache == no cache


@pytest.mark.parametrize(
    ("history", "expected"),
    [([(1.0, 0.01, 1000)], 1.8383716370172951), ([(1.0, 0.01, 500), (1.2, 0.02, 300)], 2.0007026925843707)],
)
def test_pinned_values_stay_within_the_stated_bound(history: Hist, expected: float) -> None:
    value = epsilon([MechanismStep(*e) for e in history], delta=DELTA)
    assert abs(value - expected) <= 1e-4  # measured: < 1e-6; the guarantee: 2 * eps_error


def test_growing_ledger_discretises_only_the_new_mechanism(monkeypatch: pytest.MonkeyPatch) -> None:
    discretised = counting(monkeypatch, "discretize")
    powers = counting(monkeypatch, "_compose_fourier")
    ledger = [(1.0, 0.01, 70)] + [(1.1 + 0.1 * i, 0.01, 5) for i in range(5)]
    grown = [*ledger[:-1], (ledger[-1][0], 0.01, 15)]  # the current run's next round: its steps grow
    histories = [*(ledger[:k] for k in range(1, 7)), grown]
    assert (
        len({_key(prv.prv_domain(h, PRV_EPS_ERROR, DELTA / 1000)) for h in histories}) == 1
    )  # 70..105 steps
    for k in range(len(ledger)):
        before = discretised["n"], powers["n"]
        epsilon([MechanismStep(*e) for e in ledger[: k + 1]], delta=DELTA)
        assert (discretised["n"] - before[0], powers["n"] - before[1]) == (1, 1), f"mechanism {k + 1}"
    epsilon([MechanismStep(*e) for e in grown], delta=DELTA)  # the rest of the ledger is not recomposed
    assert (discretised["n"], powers["n"]) == (6, 7)  # its discretisation was kept too


def test_calibration_resumes_from_the_composed_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = [MechanismStep(1.0 + 0.1 * i, 0.01, 60) for i in range(5)]
    kwargs: dict[str, Any] = {"target_epsilon": 3.0, "delta": DELTA, "sample_rate": 0.02, "steps": 50}
    previous = calibrate_noise(history=ledger[:-1], **kwargs)  # a site worker: the previous run's
    epsilon(ledger, delta=DELTA)  # ... and its reservation
    discretised = counting(monkeypatch, "discretize")
    probes = counting(monkeypatch, "prv_epsilon", accounting)
    sigma = calibrate_noise(history=ledger, **kwargs)
    entries = [(s.noise_multiplier, s.sample_rate, s.steps) for s in ledger]
    before, now = (_key(prv.prv_domain(h, PRV_EPS_ERROR, DELTA / 1000)) for h in (
        [*entries[:-1], (previous, 0.02, 50)], [*entries, (sigma, 0.02, 50)]
    ))  # fmt: skip
    assert before == now  # the calibrations share a domain: the composed ledger on it is reused
    assert probes["n"] >= 2
    # each probe discretises its own mechanism; of the ledger, only the newest mechanism is added
    assert discretised["n"] <= probes["n"] + 1
    assert epsilon([*ledger, MechanismStep(sigma, 0.02, 50)], delta=DELTA) <= 3.0


def _stock_accounting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's accounting before the cache: stock Opacus accountants on every call."""
    monkeypatch.setattr(accounting, "rdp_epsilon", lambda h, d: _stock(list(h), "rdp") if h else 0.0)
    monkeypatch.setattr(accounting, "prv_epsilon", lambda h, d, e: _stock(list(h)))


def test_calibration_unchanged_against_stock_opacus(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs: dict[str, Any] = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.02, "steps": 40}
    history = [MechanismStep(1.2, 0.01, 50)]
    new = calibrate_noise(history=history, rounds=2, **kwargs)
    accounting._epsilon_cached.cache_clear()
    with monkeypatch.context() as m:
        _stock_accounting(m)
        old = calibrate_noise(history=history, rounds=2, **kwargs)
    assert new == pytest.approx(old, rel=0.021)  # each is within 1% of its own smallest feasible sigma


def test_settings_name_the_domain_and_the_audit_recomputes_with_it() -> None:
    assert accounting_settings()["prv_domain"] == prv.PRV_DOMAIN
    history = ((1.0, 0.01, 60), (1.4, 0.02, 20))
    live = epsilon([MechanismStep(*e) for e in history], delta=DELTA)
    audited, audited_rdp = recompute_epsilon(history, DELTA, PRV_EPS_ERROR, 50.0, prv.PRV_DOMAIN)
    assert audited == pytest.approx(live, rel=1e-9, abs=1e-6)
    assert audited_rdp == _stock(list(history), "rdp")
    old_ledger, _ = recompute_epsilon(history, DELTA, PRV_EPS_ERROR, 50.0)  # written before: Opacus's domain
    assert old_ledger == _stock(list(history))


def test_audit_recomputes_a_ledger_written_with_the_cache(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "site.jsonl")
    for rnd, sigma in enumerate((1.0, 1.3, 1.3), start=1):
        ledger.reserve(
            round=rnd, run_id=f"run{min(rnd, 2)}", step=MechanismStep(sigma, 0.02, 30), max_grad_norm=1.0,
            delta=DELTA, max_epsilon=10.0, data_fingerprint="f" * 64,
        )  # fmt: skip
    assert all(e.raw["accounting"]["prv_domain"] == prv.PRV_DOMAIN for e in ledger.entries())
    result = verify_ledgers([tmp_path / "site.jsonl"])
    reserves = [e for e in result.ledgers[0].entries if e.kind == "reserve"]
    assert len(reserves) == 3 and not [f for f in result.findings if f.check == "epsilon"]
    for e in reserves:  # the auditor's fresh Opacus accountant on the recorded domain: the same numbers
        assert e.epsilon_recomputed == pytest.approx(e.parameters["epsilon"], rel=1e-9, abs=1e-6)

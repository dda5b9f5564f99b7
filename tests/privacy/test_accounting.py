"""Tests for privacy.accounting: epsilon pinned to Opacus, calibration never over target.

The cache and the quantised PRV domain are tested in ``test_accounting_cache.py``.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from common.errors import BudgetExceededError, ConfigError
from privacy.accounting import MechanismStep, calibrate_noise, epsilon, merge_history
from privacy.accounting_prv import FixedDomainPRVAccountant

DELTA = 1e-5

# (history, PRV epsilon, RDP epsilon) at delta=1e-5, computed once with opacus 1.6.0.
# A change here means the accountant changed behaviour: re-check before re-pinning.
PINNED = [
    ([(1.0, 0.01, 1000)], 1.8383716370172951, 2.1013652716430564),
    ([(0.8, 0.05, 200)], 7.712688208472719, 8.73182993236997),
    ([(2.0, 0.001, 10000)], 0.18334769754110672, 0.20127230462935622),
    ([(5.0, 0.1, 50)], 0.5364267465549006, 0.5828325576229288),
    ([(1.0, 0.01, 500), (1.2, 0.02, 300)], 2.0007026925843707, 2.241599719800421),
]


def _opacus(history: list[tuple[float, float, int]], accountant: str, delta: float = DELTA) -> float:
    """A fresh Opacus accountant: ``prv`` on Opacus's own domain, ``fixed`` on the recorded one."""
    acc = {"prv": PRVAccountant, "fixed": FixedDomainPRVAccountant, "rdp": RDPAccountant}[accountant]()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(acc.get_epsilon(delta))


def _steps(history: list[tuple[float, float, int]]) -> list[MechanismStep]:
    return [MechanismStep(*entry) for entry in history]


@pytest.mark.parametrize(("history", "prv", "rdp"), PINNED)
def test_epsilon_matches_opacus_and_pinned_values(
    history: list[tuple[float, float, int]], prv: float, rdp: float
) -> None:
    assert _opacus(history, "prv") == pytest.approx(prv, rel=1e-3)
    assert _opacus(history, "rdp") == pytest.approx(rdp, rel=1e-3)
    value = epsilon(_steps(history), delta=DELTA)
    assert value == pytest.approx(_opacus(history, "fixed"), rel=1e-9, abs=1e-6)
    assert value == pytest.approx(prv, abs=1e-4)  # the quantised domain: stated bound 2 * eps_error
    assert epsilon(_steps(history), delta=DELTA, accountant="rdp") == _opacus(history, "rdp")
    assert prv <= rdp  # PRV is the tighter bound


def test_empty_history_is_zero() -> None:
    assert epsilon([], delta=DELTA) == 0.0
    assert epsilon([], delta=DELTA, accountant="rdp") == 0.0


def test_merge_history_sums_identical_mechanisms_in_first_seen_order() -> None:
    a, b = MechanismStep(1.0, 0.01, 100), MechanismStep(1.5, 0.01, 50)
    assert merge_history([a, b, a, a]) == [MechanismStep(1.0, 0.01, 300), b]
    assert epsilon([a, a, a], delta=DELTA) == epsilon([MechanismStep(1.0, 0.01, 300)], delta=DELTA)
    assert epsilon([a, b, a], delta=DELTA) == pytest.approx(
        _opacus([(1.0, 0.01, 200), (1.5, 0.01, 50)], "fixed"), rel=1e-9, abs=1e-6
    )


def test_prv_failure_falls_back_to_the_larger_rdp_bound(caplog: pytest.LogCaptureFixture) -> None:
    history = [(1.0, 0.01, 1000)]
    with pytest.raises(ValueError, match="Floating point errors"):
        _opacus(history, "prv", delta=1e-14)  # Opacus's PRV cannot handle such a small delta
    with caplog.at_level(logging.WARNING, logger="privacy.accounting"):
        value = epsilon(_steps(history), delta=1e-14)
    assert value == pytest.approx(_opacus(history, "rdp", delta=1e-14), rel=1e-9)
    assert "reporting the RDP bound" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"delta": 0.0}, "delta must be in (0, 1)"),
        ({"delta": 1.5}, "delta must be in (0, 1)"),
        ({"delta": DELTA, "accountant": "gdp"}, "accountant must be one of"),
    ],
)
def test_invalid_accounting_arguments(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        epsilon([MechanismStep(1.0, 0.01, 10)], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [((0.0, 0.01, 10), "noise_multiplier"), ((1.0, 1.5, 10), "sample_rate"), ((1.0, 0.01, 0), "steps")],
)
def test_invalid_mechanism(args: tuple[float, float, int], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        MechanismStep(*args)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrate_meets_target_and_is_tight(accountant: str) -> None:
    sigma = calibrate_noise(
        history=[], target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=1000, accountant=accountant
    )
    step = MechanismStep(sigma, 0.01, 1000)
    assert epsilon([step], delta=DELTA, accountant=accountant) <= 1.0
    smaller = MechanismStep(sigma / 1.02, 0.01, 1000)  # beyond the 1% tolerance
    assert epsilon([smaller], delta=DELTA, accountant=accountant) > 1.0


def test_calibrate_prv_needs_less_noise_than_rdp() -> None:
    def sigma(accountant: str) -> float:
        return calibrate_noise(
            history=[], target_epsilon=3.0, delta=DELTA, sample_rate=0.01, steps=1000, accountant=accountant
        )

    assert sigma("prv") < sigma("rdp")


def test_calibrate_plans_several_rounds_after_history() -> None:
    history = [MechanismStep(1.2, 0.01, 200)] * 2
    sigma = calibrate_noise(
        history=history, target_epsilon=4.0, delta=DELTA, sample_rate=0.02, steps=300, rounds=3
    )
    planned = history + [MechanismStep(sigma, 0.02, 300)] * 3
    assert epsilon(planned, delta=DELTA) <= 4.0


def test_calibrate_refuses_when_even_max_noise_exceeds_target() -> None:
    history = [MechanismStep(0.8, 0.05, 200)]  # already epsilon ~7.7
    with pytest.raises(BudgetExceededError) as info:
        calibrate_noise(history=history, target_epsilon=5.0, delta=DELTA, sample_rate=0.01, steps=100)
    assert info.value.budget == 5.0
    assert info.value.spent == pytest.approx(PINNED[1][1], rel=1e-3)
    assert info.value.requested > 5.0
    assert "max-epsilon=5" in str(info.value)


def test_calibrate_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError) as info:
        calibrate_noise(history=[], target_epsilon=-1.0, delta=DELTA, sample_rate=0.01, steps=10, rounds=0)
    assert len(info.value.problems) == 2


history_entries = st.lists(
    st.builds(
        MechanismStep,
        noise_multiplier=st.floats(0.7, 5.0),
        sample_rate=st.floats(0.001, 0.05),
        steps=st.integers(1, 500),
    ),
    max_size=3,
)


def _check_calibration(
    history: list[MechanismStep], target: float, q: float, steps: int, rounds: int, accountant: str
) -> None:
    try:
        sigma = calibrate_noise(
            history=history,
            target_epsilon=target,
            delta=DELTA,
            sample_rate=q,
            steps=steps,
            rounds=rounds,
            accountant=accountant,
        )
    except BudgetExceededError as exc:
        assert exc.requested > target
        return
    planned = list(history) + [MechanismStep(sigma, q, steps)] * rounds
    assert epsilon(planned, delta=DELTA, accountant=accountant) <= target
    assert math.isfinite(sigma) and 0 < sigma <= 50.0


@settings(max_examples=25, deadline=None, database=None)
@given(
    history=history_entries,
    target=st.floats(0.3, 12.0),
    q=st.floats(0.001, 0.1),
    steps=st.integers(1, 2000),
    rounds=st.integers(1, 3),
)
def test_calibrated_noise_never_exceeds_target_rdp(
    history: list[MechanismStep], target: float, q: float, steps: int, rounds: int
) -> None:
    _check_calibration(history, target, q, steps, rounds, "rdp")


@settings(max_examples=6, deadline=None, database=None)
@given(
    history=st.lists(st.just(MechanismStep(1.0, 0.01, 200)), max_size=2),
    target=st.floats(0.5, 8.0),
    q=st.floats(0.002, 0.05),
    steps=st.integers(10, 500),
)
def test_calibrated_noise_never_exceeds_target_prv(
    history: list[MechanismStep], target: float, q: float, steps: int
) -> None:
    _check_calibration(history, target, q, steps, 1, "prv")

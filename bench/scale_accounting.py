"""Accounting at scale: epsilon and noise calibration for a long ledger, from scratch vs incremental.

Usage::

    .venv/bin/python -m bench.scale_accounting [--sizes 1,5,10,20] [--earlier 0,5,10] [--seed 0]

(run from the repository root, as a module of the ``bench`` package.)

A site's ledger is simulated as distinct DP-SGD mechanisms, one per run (seeded: noise 0.9-1.6,
sample rate 0.002-0.01, 100-400 steps; about epsilon 2 after 20 runs at delta 1e-5). Two ways of
computing each number run side by side in one process:

* **old**: today's accounting before the cache -- ``privacy.accounting.epsilon`` with a fresh Opacus
  ``RDPAccountant`` and ``PRVAccountant`` (Opacus's own domain) on the whole history at every call;
* **new**: ``privacy.accounting`` as it is (cached RDP vectors and PRVs, quantised domain, composed
  prefixes: ``privacy/accounting_prv.py``).

Epsilon, for a ledger of N distinct mechanisms: *old* is one from-scratch call; *new, growing* is the
N-th call of a ledger that grew one mechanism at a time in this process (a site worker after each
run), with ``domain`` saying whether the quantised domain was kept or had to be rebuilt at that call;
*new, cold* is the first call in a fresh process (empty caches). Calibration (``calibrate_noise``,
target 8.0, sample rate 0.01, 300 steps, 3 rounds) after E earlier mechanisms: *old* from scratch;
*new, worker*: as in a site worker, the previous run was calibrated (after E - 1 mechanisms) and the
ledger's epsilon after E computed (when the last reservation was written) before the timed call;
``domain`` says whether that calibration's domain was the previous one's; *new, cold*: empty
caches. Epsilons of both methods and their differences are printed (for
calibration: of the history plus the planned rounds at each method's noise).

Goal (``docs/performance.md``, "Accounting at scale"): epsilon of 20 distinct mechanisms < 1 s and
calibration after 10 < 5 s on the 2-core VM; epsilons within the stated PRV bound of Opacus's. The
last line is ``eps20_s=<x> calib10_s=<y> max_abs_eps_diff=<z>`` (growing ledger; worker calibration;
over all epsilon rows).
"""

from __future__ import annotations

import argparse
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy import accounting, accounting_prv
from privacy.accounting import PRV_EPS_ERROR, MechanismStep, calibrate_noise, epsilon

DELTA = 1e-5
TARGET, SAMPLE_RATE, STEPS, ROUNDS = 8.0, 0.01, 300, 3


def _stock(history: Sequence[tuple[float, float, int]], delta: float, kind: str) -> float:
    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        if kind == "prv":
            return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        return float(acc.get_epsilon(delta))


@contextmanager
def old_accounting() -> Iterator[None]:
    """Swap in fresh stock Opacus accountants per call (the accounting before the cache)."""
    saved = accounting.rdp_epsilon, accounting.prv_epsilon
    accounting.rdp_epsilon = lambda h, d: _stock(h, d, "rdp") if h else 0.0  # type: ignore[assignment]
    accounting.prv_epsilon = lambda h, d, e: _stock(h, d, "prv")  # type: ignore[assignment]
    accounting._epsilon_cached.cache_clear()
    try:
        yield
    finally:
        accounting.rdp_epsilon, accounting.prv_epsilon = saved
        accounting._epsilon_cached.cache_clear()


def cold() -> None:
    accounting_prv.clear_caches()
    accounting._epsilon_cached.cache_clear()


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def ledger(n: int, seed: int) -> list[MechanismStep]:
    rng = random.Random(seed)
    return [
        MechanismStep(
            round(rng.uniform(0.9, 1.6), 3), round(rng.uniform(0.002, 0.01), 4), rng.randint(100, 400)
        )
        for _ in range(n)
    ]


def _domain(history: Sequence[MechanismStep]) -> tuple[float, int]:
    entries = [(s.noise_multiplier, s.sample_rate, s.steps) for s in accounting.merge_history(history)]
    d = accounting_prv.prv_domain(entries, PRV_EPS_ERROR, DELTA / 1000)
    return float(d.t_max), d.size


def bench_epsilon(sizes: list[int], mechanisms: list[MechanismStep]) -> tuple[list[float], float]:
    """Print the epsilon table; return the new - old differences and the growing time at max(sizes)."""
    print("epsilon of a ledger of N distinct mechanisms (delta 1e-5)")
    cold()
    grown: dict[int, tuple[float, float, str]] = {}
    for k in range(1, max(sizes) + 1):
        kept = k > 1 and _domain(mechanisms[:k]) == _domain(mechanisms[: k - 1])
        value, seconds = timed(lambda k=k: epsilon(mechanisms[:k], delta=DELTA))  # type: ignore[misc]
        grown[k] = (value, seconds, "kept" if kept else "rebuilt")
    rebuilt = [f"{k} ({grown[k][1]:.2f} s)" for k in range(2, max(sizes) + 1) if grown[k][2] == "rebuilt"]
    print(f"growing 1..{max(sizes)}: domain rebuilt at N = {', '.join(rebuilt) or 'never'}")
    print(
        "| N | old s | new s (growing) | domain | new s (cold) | speed-up | old eps | new eps | new - old |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    diffs = []
    for n in sizes:
        with old_accounting():
            old, old_s = timed(lambda n=n: epsilon(mechanisms[:n], delta=DELTA))  # type: ignore[misc]
        cold()
        _, cold_s = timed(lambda n=n: epsilon(mechanisms[:n], delta=DELTA))  # type: ignore[misc]
        new, new_s, domain = grown[n]
        diffs.append(new - old)
        print(
            f"| {n} | {old_s:.2f} | {new_s:.2f} | {domain} | {cold_s:.2f} | {old_s / new_s:.1f}x "
            f"| {old:.6f} | {new:.6f} | {new - old:+.2e} |",
            flush=True,
        )
    return diffs, grown[max(sizes)][1]


def bench_calibration(earlier: list[int], mechanisms: list[MechanismStep]) -> dict[int, float]:
    """Print the calibration table; return the warm calibration time per number of earlier mechanisms."""
    print(
        f"\ncalibrate_noise after E earlier mechanisms "
        f"(target {TARGET}, q {SAMPLE_RATE}, {STEPS} steps x {ROUNDS} rounds)"
    )
    print(
        "| E | old s | new s (worker) | domain | new s (cold) | speed-up "
        "| old sigma | new sigma | eps at old | eps at new |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    out = {}
    for e in earlier:
        history = mechanisms[:e]

        def run(h: list[MechanismStep] = history) -> float:
            return calibrate_noise(
                history=h,
                target_epsilon=TARGET,
                delta=DELTA,
                sample_rate=SAMPLE_RATE,
                steps=STEPS,
                rounds=ROUNDS,
            )

        with old_accounting():
            old, old_s = timed(run)
        cold()
        _, cold_s = timed(run)
        cold()
        previous = None
        if e:  # a site worker: it calibrated the previous run, then wrote that run's reservations
            sigma = run(mechanisms[: e - 1])
            previous = _domain([*mechanisms[: e - 1], *[MechanismStep(sigma, SAMPLE_RATE, STEPS)] * ROUNDS])
            epsilon(history, delta=DELTA)
        new, new_s = timed(run)
        planned = [*history, *[MechanismStep(new, SAMPLE_RATE, STEPS)] * ROUNDS]
        domain = "-" if previous is None else "kept" if previous == _domain(planned) else "rebuilt"
        eps_old = epsilon([*history, *[MechanismStep(old, SAMPLE_RATE, STEPS)] * ROUNDS], delta=DELTA)
        eps_new = epsilon([*history, *[MechanismStep(new, SAMPLE_RATE, STEPS)] * ROUNDS], delta=DELTA)
        out[e] = new_s
        print(
            f"| {e} | {old_s:.2f} | {new_s:.2f} | {domain} | {cold_s:.2f} | {old_s / new_s:.1f}x "
            f"| {old:.4f} | {new:.4f} | {eps_old:.4f} | {eps_new:.4f} |",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1,5,10,20", help="ledger sizes (distinct mechanisms)")
    parser.add_argument("--earlier", default="0,5,10", help="earlier mechanisms before calibration")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated ledger")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    earlier = [int(x) for x in args.earlier.split(",")]
    mechanisms = ledger(max([*sizes, *earlier]), args.seed)
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    diffs, eps_last = bench_epsilon(sizes, mechanisms)
    calib = bench_calibration(earlier, mechanisms)
    print(
        f"eps{max(sizes)}_s={eps_last:.3f} calib{max(earlier)}_s={calib[max(earlier)]:.3f} "
        f"max_abs_eps_diff={max(abs(d) for d in diffs):.2e}"
    )


if __name__ == "__main__":
    main()

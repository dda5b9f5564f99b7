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
*new, cold* is the first call in a fresh process (empty caches, no persisted state); *new, cold
persisted*: a fresh process whose state dir holds what the growing process had persisted after N - 1
mechanisms (``privacy/accounting_store.py``; the growing and worker columns write it).

Calibration (``calibrate_noise``, target 8.0, sample rate 0.01, 300 steps, 3 rounds) after E earlier
mechanisms: *old* from scratch; *new, worker*: as in a site worker, the previous run was calibrated
(after E - 1 mechanisms) and the ledger's epsilon after E computed (when the last reservation was
written) before the timed call; ``domain`` says whether that calibration's domain was the previous
one's; *new, cold*: empty caches; *new, cold persisted*: empty caches, the state that worker had
persisted before the timed call. Epsilons of both methods and their differences are printed (for
calibration: of the history plus the planned rounds at each method's noise).

Goal (``docs/performance.md``, "Accounting at scale"): epsilon of 20 distinct mechanisms < 1 s and
calibration after 10 < 5 s on the 2-core VM; epsilons within the stated PRV bound of Opacus's. The
last line is ``eps20_s=<x> calib10_s=<y> max_abs_eps_diff=<z> eps20_persisted_s=<u>
calib10_persisted_s=<v>`` (growing ledger; worker calibration; over all epsilon rows; fresh processes
on the persisted state).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy import accounting, accounting_prv
from privacy.accounting import PRV_EPS_ERROR, MechanismStep, calibrate_noise, epsilon
from privacy.accounting_store import use_persistent_cache

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


def cold(folder: Path | None = None) -> None:
    """A fresh process: empty caches, persisting to (and reading from) ``folder`` if given."""
    accounting_prv.clear_caches()
    accounting._epsilon_cached.cache_clear()
    use_persistent_cache(folder)


def snapshot(folder: Path, to: Path) -> Path:
    """A copy of the persisted state as it is now (what a fresh process would find)."""
    shutil.copytree(folder, to) if folder.exists() else to.mkdir(parents=True)
    return to


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


def bench_epsilon(
    sizes: list[int], mechanisms: list[MechanismStep], tmp: Path
) -> tuple[list[float], float, float]:
    """Print the epsilon table; return the new - old differences, growing and persisted s at max(sizes)."""
    print("epsilon of a ledger of N distinct mechanisms (delta 1e-5)")
    cold(tmp / "growing")
    grown: dict[int, tuple[float, float, str]] = {}
    persisted: dict[int, Path] = {}
    for k in range(1, max(sizes) + 1):
        if k in sizes:  # what a process started now would find
            persisted[k] = snapshot(tmp / "growing", tmp / f"after-{k - 1}")
        kept = k > 1 and _domain(mechanisms[:k]) == _domain(mechanisms[: k - 1])
        value, seconds = timed(lambda k=k: epsilon(mechanisms[:k], delta=DELTA))  # type: ignore[misc]
        grown[k] = (value, seconds, "kept" if kept else "rebuilt")
    rebuilt = [f"{k} ({grown[k][1]:.2f} s)" for k in range(2, max(sizes) + 1) if grown[k][2] == "rebuilt"]
    print(f"growing 1..{max(sizes)}: domain rebuilt at N = {', '.join(rebuilt) or 'never'}")
    print(
        "| N | old s | new s (growing) | domain | new s (cold) | new s (cold, persisted) | speed-up "
        "| old eps | new eps | new - old |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    diffs, persisted_s = [], 0.0
    for n in sizes:
        cold()
        with old_accounting():
            old, old_s = timed(lambda n=n: epsilon(mechanisms[:n], delta=DELTA))  # type: ignore[misc]
        cold()
        _, cold_s = timed(lambda n=n: epsilon(mechanisms[:n], delta=DELTA))  # type: ignore[misc]
        cold(persisted[n])
        again, persisted_s = timed(lambda n=n: epsilon(mechanisms[:n], delta=DELTA))  # type: ignore[misc]
        new, new_s, domain = grown[n]
        assert again == new, (again, new)  # the persisted state gives the same number, bit for bit
        diffs.append(new - old)
        print(
            f"| {n} | {old_s:.2f} | {new_s:.2f} | {domain} | {cold_s:.2f} | {persisted_s:.2f} "
            f"| {old_s / new_s:.1f}x | {old:.6f} | {new:.6f} | {new - old:+.2e} |",
            flush=True,
        )
    cold()
    return diffs, grown[max(sizes)][1], persisted_s


def bench_calibration(
    earlier: list[int], mechanisms: list[MechanismStep], tmp: Path
) -> dict[int, tuple[float, float]]:
    """Print the calibration table; return the worker and persisted times per number of earlier mechanisms."""
    print(
        f"\ncalibrate_noise after E earlier mechanisms "
        f"(target {TARGET}, q {SAMPLE_RATE}, {STEPS} steps x {ROUNDS} rounds)"
    )
    print(
        "| E | old s | new s (worker) | domain | new s (cold) | new s (cold, persisted) | speed-up "
        "| old sigma | new sigma | eps at old | eps at new |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
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
        cold(tmp / f"worker-{e}")
        previous = None
        if e:  # a site worker: it calibrated the previous run, then wrote that run's reservations
            sigma = run(mechanisms[: e - 1])
            previous = _domain([*mechanisms[: e - 1], *[MechanismStep(sigma, SAMPLE_RATE, STEPS)] * ROUNDS])
            epsilon(history, delta=DELTA)
        persisted = snapshot(tmp / f"worker-{e}", tmp / f"worker-{e}-before")
        new, new_s = timed(run)
        cold(persisted)
        again, persisted_s = timed(run)
        assert again == new, (again, new)
        cold()
        planned = [*history, *[MechanismStep(new, SAMPLE_RATE, STEPS)] * ROUNDS]
        domain = "-" if previous is None else "kept" if previous == _domain(planned) else "rebuilt"
        eps_old = epsilon([*history, *[MechanismStep(old, SAMPLE_RATE, STEPS)] * ROUNDS], delta=DELTA)
        eps_new = epsilon([*history, *[MechanismStep(new, SAMPLE_RATE, STEPS)] * ROUNDS], delta=DELTA)
        out[e] = (new_s, persisted_s)
        print(
            f"| {e} | {old_s:.2f} | {new_s:.2f} | {domain} | {cold_s:.2f} | {persisted_s:.2f} "
            f"| {old_s / new_s:.1f}x "
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
    with tempfile.TemporaryDirectory(prefix="scale-accounting-") as tmp:
        diffs, eps_last, eps_persisted = bench_epsilon(sizes, mechanisms, Path(tmp))
        calib = bench_calibration(earlier, mechanisms, Path(tmp))
    worker, persisted = calib[max(earlier)]
    print(
        f"eps{max(sizes)}_s={eps_last:.3f} calib{max(earlier)}_s={worker:.3f} "
        f"max_abs_eps_diff={max(abs(d) for d in diffs):.2e} "
        f"eps{max(sizes)}_persisted_s={eps_persisted:.3f} calib{max(earlier)}_persisted_s={persisted:.3f}"
    )


if __name__ == "__main__":
    main()

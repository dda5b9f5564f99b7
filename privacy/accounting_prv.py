"""Incremental PRV composition: Opacus's own PRV objects on a shared, quantised domain, cached.

No accountant math lives here: every number comes from Opacus functions (``compute_rdp``,
``get_privacy_spent``, ``PoissonSubsampledGaussianPRV``, ``TruncatedPrivacyRandomVariable``,
``discretize``, ``_compose_fourier``, ``_compose_two``, ``DiscretePRV.compute_epsilon``). What this
module adds is *which* domain they run on and *what is kept* between calls.

Domain (``PRV_DOMAIN``, recorded in every reservation)
------------------------------------------------------
Opacus's ``PRVAccountant._get_domain`` sizes the mesh from the total step count ``K``
(``eps_error / sqrt(K log(12 / delta_error) / 2)``) and the half-width ``L`` from
``compute_safe_domain_size``; both move with every round, so nothing could be reused. Here the
mesh uses ``K`` rounded up to a power of two (at most ``sqrt 2`` finer), ``L`` is rounded up to
6, 12, 24, 48, ... (``1.5 * 2**k``: at most twice as wide; epsilon ~8 at delta 1e-5 lies in the
middle of the 24 bucket), and the size is widened to a fast FFT length, keeping Opacus's layout
(``t = 0`` at index ``size / 2 - 1``). A ledger's histories and the calibrations towards its
budget thus fall into a few domains, each with its own incremental prefixes.

Exactness: a finer mesh and a wider domain only tighten the preconditions of Gopi et al.'s error
bound that Opacus implements, so ``compute_epsilon``'s upper value (estimate at ``delta -
delta_error`` plus ``eps_error``) stays a valid upper bound. A stock ``PRVAccountant``'s value and
this one bracket the same true epsilon within the guarantee's width, so they differ by at most
about ``2 * eps_error`` (0.02); measured: below 1e-5 (``bench/scale_accounting.py``).
:class:`FixedDomainPRVAccountant` is a stock Opacus ``PRVAccountant`` on this domain: what an
auditor runs, from scratch, without these caches.

Caches (per process; a site worker keeps them across rounds)
------------------------------------------------------------
* the one-step RDP vector of each ``(sigma, q)`` over Opacus's default orders: composition sums
  ``steps * vector``, exactly what ``RDPAccountant`` computes (bit-identical);
* the truncated PRV's mean (Opacus's numerical integral, the slow part of ``discretize``) per
  ``(sigma, q, domain)``, and the last few discretised PRVs;
* the composed PRV of history prefixes per domain (:func:`prv_epsilon` folds mechanisms left to
  right with ``_compose_two`` and resumes from the longest cached prefix). Folding instead of
  Opacus's pairwise tree only reorders exact convolutions: the result equals
  :class:`FixedDomainPRVAccountant`'s to floating-point rounding (measured ~1e-10).

The prefix cache is bounded (``_STATE_BYTES``, oldest first); it is rebuilt from scratch when the
domain changes: the total steps pass a power of two or the width its bucket. With
:func:`~privacy.accounting_store.use_persistent_cache` (the site agent's state dir), each call's
history without its last mechanism (the ledger before the current run, or before a calibration's
probe) is also written to disk, and a prefix missing from memory is looked up there before it is
recomposed: a fresh process starts warm, with the same numbers bit for bit.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    discretize,
)
from opacus.accountants.analysis.prv.compose import _compose_fourier, _compose_two
from scipy.fft import next_fast_len

from privacy import accounting_store

__all__ = [
    "PRV_DOMAIN",
    "FixedDomainPRVAccountant",
    "clear_caches",
    "prv_domain",
    "prv_epsilon",
    "rdp_epsilon",
    "safe_width",
]

History = Sequence[tuple[float, float, int]]
PRV_DOMAIN = "quantised-1: mesh of total steps up to 2**k, width up to 1.5 * 2**k, fast FFT size"
_ALPHAS = list(RDPAccountant.DEFAULT_ALPHAS)
_ALPHA_NOTE = r"Optimal order is the (largest|smallest) alpha"
_STATE_BYTES = 256 * 2**20  # composed prefixes kept: at most this much memory
_DPRVS = 4  # discretised single mechanisms kept (the current run's, whose steps grow)


@functools.lru_cache(maxsize=4096)
def _rdp_vector(sigma: float, q: float) -> np.ndarray:
    vector = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_ALPHAS)
    vector.flags.writeable = False
    return vector


def rdp_epsilon(history: History, delta: float) -> float:
    """``RDPAccountant(history).get_epsilon(delta)``, from cached one-step RDP vectors (same numbers)."""
    if not history:
        return 0.0
    rdp = sum([_rdp_vector(sigma, q) * n for sigma, q, n in history])
    with warnings.catch_warnings():
        # the best order at the edge of Opacus's grid: the bound stays valid, only looser
        warnings.filterwarnings("ignore", message=_ALPHA_NOTE, category=UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def safe_width(history: History, eps_error: float, delta_error: float) -> float:
    """Opacus's ``compute_safe_domain_size`` for ``history``, from the cached RDP vectors."""
    total = sum(n for _, _, n in history)
    width = rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        width = max(width, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    return max(width, eps_error) + 3


def prv_domain(history: History, eps_error: float, delta_error: float) -> Domain:
    """The quantised discretisation domain of ``history`` (see the module docstring)."""
    total = sum(n for _, _, n in history)
    steps = 1 << (total - 1).bit_length()  # smallest power of two >= total
    width = 1.5 * 2.0 ** math.ceil(math.log2(safe_width(history, eps_error, delta_error) / 1.5))
    mesh = float(eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2))
    size = Domain.create_aligned(-width, width, mesh).size
    size = next_fast_len(size, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    # Opacus's layout (t = 0 at index size/2 - 1, as create_aligned gives), widened to a fast FFT length
    return Domain(-(size // 2 - 1) * mesh, size // 2 * mesh, size)


class FixedDomainPRVAccountant(PRVAccountant):
    """Opacus's ``PRVAccountant`` on :func:`prv_domain`: a from-scratch recomputation, for auditors."""

    def _get_domain(
        self,
        prvs: list[PoissonSubsampledGaussianPRV],
        num_self_compositions: list[int],
        eps_error: float,
        delta_error: float,
    ) -> Domain:
        return prv_domain(list(self.history), eps_error, delta_error)


class _Truncated(TruncatedPrivacyRandomVariable):
    """Opacus's truncated PRV with its (slow, numerically integrated) mean computed once."""

    _mean: float | None = None

    def mean(self) -> float:
        if self._mean is None:
            self._mean = float(super().mean())
        return self._mean


@functools.lru_cache(maxsize=1024)
def _truncated(sigma: float, q: float, t_min: float, t_max: float) -> _Truncated:
    return _Truncated(PoissonSubsampledGaussianPRV(q, sigma), t_min, t_max)


@functools.lru_cache(maxsize=_DPRVS)
def _discrete(sigma: float, q: float, t_min: float, t_max: float, size: int) -> DiscretePRV:
    domain = Domain(t_min, t_max, size)
    return discretize(_truncated(sigma, q, t_min, t_max), domain)


_DomainKey = tuple[float, float, int]
_lock = threading.Lock()  # the prefix cache is shared by every caller of the process
_states: OrderedDict[tuple[_DomainKey, tuple[tuple[float, float, int], ...]], DiscretePRV] = OrderedDict()


def _remember(key: tuple[_DomainKey, tuple[tuple[float, float, int], ...]], state: DiscretePRV) -> None:
    _states[key] = state
    _states.move_to_end(key)
    while len(_states) > 2 and sum(s.pmf.nbytes for s in _states.values()) > _STATE_BYTES:
        _states.popitem(last=False)


def _composed(
    history: tuple[tuple[float, float, int], ...], domain: Domain, errors: tuple[float, float]
) -> DiscretePRV:
    """The composition of ``history`` on ``domain``, resumed from the longest cached prefix.

    ``errors`` (``eps_error``, ``delta_error``) only key the prefixes kept on disk.
    """
    where: _DomainKey = (float(domain.t_min), float(domain.t_max), int(domain.size))
    start, state = 0, None
    for k in range(len(history), 0, -1):
        if (hit := _states.get((where, history[:k]))) is not None:
            _states.move_to_end((where, history[:k]))
            start, state = k, hit
            break
    if (disk := accounting_store.store()) is not None:
        for k in range(len(history), start, -1):  # a longer prefix, written by an earlier process
            key = disk.key(where, history[:k], *errors, PRV_DOMAIN)
            if (hit := accounting_store.load(disk, key, where)) is not None:
                _remember((where, history[:k]), hit)
                start, state = k, hit
                break
    last = len(history) - 1
    prefix = state if start == last else None  # the history but its last mechanism
    for k in range(start, len(history)):
        sigma, q, n = history[k]
        one = _compose_fourier(_discrete(sigma, q, *where), n)
        state = one if state is None else _compose_two(state, one)
        if k >= last - 1:  # the whole history, and all but its last (the current run's)
            _remember((where, history[: k + 1]), state)
        if k == last - 1:
            prefix = state
    if disk is not None and prefix is not None:
        accounting_store.save(disk, disk.key(where, history[:last], *errors, PRV_DOMAIN), prefix)
    assert state is not None  # history is not empty
    return state


def prv_epsilon(history: History, delta: float, eps_error: float) -> float:
    """PRV upper bound on epsilon of ``history`` on :func:`prv_domain` (Opacus's ``delta_error``).

    Raises whatever Opacus raises (``ValueError``, ``RuntimeError``...) for parameters it cannot handle.
    """
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history)
    if not entries:
        raise ValueError("prv_epsilon needs at least one mechanism")
    delta_error = delta / 1000  # Opacus's default
    domain = prv_domain(entries, eps_error, delta_error)
    with _lock, np.errstate(divide="ignore"):  # q == 1: Opacus evaluates log(1 - q) = -inf, as intended
        composed = _composed(entries, domain, (eps_error, delta_error))
        _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(upper)


def clear_caches() -> None:
    """Forget every cached vector, PRV and composition (tests; memory); files on disk stay."""
    with _lock:
        _states.clear()
        if (disk := accounting_store.store()) is not None:
            disk.saved.clear()
    for cached in (_rdp_vector, _truncated, _discrete):
        cached.cache_clear()

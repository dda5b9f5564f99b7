"""Scrub record groups in forked worker processes (``Scrubber.scrub_records(..., workers=N)``).

Workers are forked from the calling process, so each reuses the spaCy pipeline and
Presidio engines already loaded there (no second load, no download).  Chunks keep
their order; results are identical to a single-process scrub.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

Groups = Sequence[Sequence[str]]


Scrub = Callable[[Groups], tuple[list[list[str]], list[Counter[str]]]]
_FORKED: list[Scrub] = []  # the running pool's scrub function: inherited by fork, never pickled


def _scrub_chunk(groups: Groups) -> tuple[list[list[str]], list[Counter[str]]]:
    return _FORKED[-1](groups)


def scrub_in_workers(
    scrub: Scrub, groups: Groups, workers: int
) -> tuple[list[list[str]], list[Counter[str]]]:
    """Run ``scrub`` over ``groups`` in ``workers`` forked processes; output order equals input order.

    Parameters
    ----------
    scrub
        The scrubber's group function, its engines already loaded (each worker inherits them).
    groups
        One group of texts per record.
    workers
        Number of worker processes (>= 2); falls back to one process where ``fork``
        is unavailable.

    Returns
    -------
    tuple[list[list[str]], list[Counter[str]]]
        Scrubbed groups and per-group entity counts, in input order.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return scrub(groups)
    size = max(1, -(-len(groups) // (workers * 4)))
    chunks = [groups[i : i + size] for i in range(0, len(groups), size)]
    out: list[list[str]] = []
    counts: list[Counter[str]] = []
    context = multiprocessing.get_context("fork")
    _FORKED.append(scrub)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for chunk_out, chunk_counts in pool.map(_scrub_chunk, chunks):
                out += chunk_out
                counts += chunk_counts
    finally:
        _FORKED.pop()
    return out, counts

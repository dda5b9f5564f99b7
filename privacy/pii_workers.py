"""Scrub record groups in forked worker processes (``Scrubber.scrub_records(..., workers=N)``).

Workers are forked from the calling process, so each reuses the spaCy pipeline and
Presidio engines already loaded there (no second load, no download).  Chunks keep
their order; results are identical to a single-process scrub.  :func:`worker_pool`
keeps one pool for a stream of batches (site preparation: ``client.prepare``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

Groups = Sequence[Sequence[str]]


Result = tuple[list[list[str]], list[Counter[str]]]
Scrub = Callable[[Groups], Result]
Runner = Callable[[Iterable[Groups]], Iterator[Result]]
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


@contextlib.contextmanager
def worker_pool(scrub: Scrub, workers: int) -> Iterator[Runner]:
    """A runner mapping batches of groups to their results, in order, over one pool of ``workers``.

    With ``workers <= 1`` (or no ``fork``) the batches are scrubbed lazily in this process; else
    ``workers`` forked processes share the batches, each one a task (keep them small, e.g. 64
    records, so the processes stay busy to the last batch).
    """
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield lambda batches: map(scrub, batches)
        return
    _FORKED.append(scrub)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    try:
        yield lambda batches: pool.map(_scrub_chunk, batches)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an interrupt: drop the queued batches
        _FORKED.pop()

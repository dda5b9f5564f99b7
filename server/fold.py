"""A round's accepted updates kept on disk, and FedAvg folded from there one update at a time.

Triage decodes each reply once, as it arrives, and writes its float32 values here
(:class:`UpdateStore`); the reply is then dropped. Which updates count and with what weight is
only known once every reply is in (the median-relative norm bound, the weight cap), so the
weighted mean is folded afterwards, reading one update at a time (:func:`fedavg`): the
coordinator's memory holds the global adapter, the running sum and one tensor of one update,
whatever the number of sites. The sum is Flower's own ``aggregate_arrayrecords`` arithmetic --
``x * (w / total)`` added in order, in float32 -- so it equals Flower's FedAvg to the bit.

Robust aggregators (median, trimmed mean, Krum) and Flower's site-level DP wrapper need every
update at once: :meth:`UpdateStore.records` rebuilds them in memory for those.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from common.arrays import ArraySpec

__all__ = ["UpdateStore", "capped_weights", "fedavg"]

PREFIX = ".updates-"  # the store's folder in the run folder (hidden: not part of the run's record)


@dataclass(frozen=True)
class _Layout:
    """Where each tensor of one stored update lies in its file."""

    path: Path
    offsets: dict[str, tuple[int, tuple[int, ...]]]  # key -> (byte offset, shape)


class UpdateStore:
    """Decoded (float32) updates of one round, one file each, under a temporary folder.

    Parameters
    ----------
    root
        Folder the temporary folder is made in (the run folder: its disk, not RAM);
        ``None`` = the system's temporary folder.
    """

    def __init__(self, root: Path | None = None) -> None:
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix=PREFIX, dir=root)
        self._updates: dict[str, _Layout] = {}

    @staticmethod
    def sweep(root: Path) -> None:
        """Delete the stores a killed process left under ``root``."""
        for stale in root.glob(f"{PREFIX}*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    def put(self, name: str, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store update ``name`` from its decoded tensors; nothing is kept if ``tensors`` raises."""
        path = Path(self._dir.name) / f"{len(self._updates)}.f32"
        offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        at = 0
        try:
            with open(path, "wb") as fh:
                for key, values in tensors:
                    data = np.ascontiguousarray(values, dtype=np.float32)
                    data.tofile(fh)
                    offsets[key] = (at, tuple(data.shape))
                    at += data.nbytes
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._updates[name] = _Layout(path, offsets)

    def __contains__(self, name: object) -> bool:
        return name in self._updates

    def tensors(self, name: str) -> Iterator[tuple[str, np.ndarray]]:
        """The stored tensors of update ``name``, read one at a time (never mapped)."""
        layout = self._updates[name]
        with open(layout.path, "rb") as fh:
            for key, (offset, shape) in layout.offsets.items():
                fh.seek(offset)
                count = int(np.prod(shape)) if shape else 1
                yield key, np.fromfile(fh, dtype=np.float32, count=count).reshape(shape)

    def records(self, names: Sequence[str]) -> list[ArrayRecord]:
        """Updates ``names`` as in-memory records (for aggregators that need all of them at once)."""
        return [ArrayRecord({k: Array(v) for k, v in self.tensors(n)}) for n in names]

    def close(self) -> None:
        """Delete every stored update."""
        self._updates.clear()
        self._dir.cleanup()


def fedavg(
    store: UpdateStore, names: Sequence[str], weights: Sequence[float], template: Mapping[str, ArraySpec]
) -> ArrayRecord:
    """The weighted mean of stored updates ``names``, folded in the given order one tensor at a time.

    The arithmetic is Flower's ``aggregate_arrayrecords``: each update times ``w / sum(weights)``,
    added in order into a float32 sum, so the result is the same to the bit.
    """
    if not names or len(names) != len(weights):
        raise ValueError("fedavg needs one weight per update and at least one update")
    total = sum(weights)
    if not total > 0:
        raise ValueError(f"the weights sum to {total}, not a positive number")
    acc: dict[str, np.ndarray] = {}
    for name, w in zip(names, weights, strict=True):
        factor = w / total
        for key, values in store.tensors(name):
            if key in acc:
                acc[key] += values * factor
            else:
                acc[key] = values * factor
    return ArrayRecord({k: Array(acc.pop(k)) for k in template if k in acc})  # each sum freed once copied


def capped_weights(weights: list[float], cap: float) -> list[float]:
    """``weights`` rescaled so that none is above ``cap`` of the total (water-filling; sums kept)."""
    total = sum(weights)
    if total <= 0 or cap >= 1 or not weights:
        return list(weights)
    if cap * len(weights) <= 1:  # no feasible cap above the equal share: equal weights
        return [total / len(weights)] * len(weights)
    w = list(weights)
    for _ in range(len(w)):
        capped = [i for i, x in enumerate(w) if x >= cap * total - 1e-12]
        free = [i for i in range(len(w)) if i not in capped]
        free_sum = sum(w[i] for i in free)
        if free_sum <= 0:
            break
        # capped sites get exactly cap * total; the rest keep their proportions of what is left
        scale = (1 - cap * len(capped)) * total / free_sum
        new = [cap * total if i in capped else w[i] * scale for i in range(len(w))]
        if all(x <= cap * total + 1e-9 for x in new):
            return new
        w = new
    return w

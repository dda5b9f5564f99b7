"""Fault injection for drills and tests: make this site fail or misbehave on purpose.

Off unless the agent's environment sets ``FEDTUNE_FAULTS``, a comma-separated list of
``SITE:KIND@ROUND`` (``@ROUND`` optional: every round). When on, every affected round logs
a loud warning. Kinds:

* ``raise`` -- crash mid-training, after the budget reservation (as a killed process would);
* ``nan`` -- send an update holding a NaN;
* ``wrong-shape`` -- send one tensor with a row missing;
* ``scale-100`` -- send ``global + 100 x (update - global)``;
* ``sign-flip`` -- send ``global - (update - global)`` (a poisoning site).

Corrupted updates are made *before* the ledger commit, like a compromised site that signs
what it sends: the coordinator must catch them by content, not by receipt.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from common.errors import ConfigError

log = logging.getLogger(__name__)
ENV = "FEDTUNE_FAULTS"
KINDS = ("raise", "nan", "wrong-shape", "scale-100", "sign-flip")


class InjectedFault(RuntimeError):
    """The crash that ``raise`` injects."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: which site, what, and in which round (0 = every round)."""

    site: str
    kind: str
    round: int = 0


def parse_faults(text: str) -> list[Fault]:
    """Parse ``FEDTUNE_FAULTS``; every bad item is reported at once."""
    faults, problems = [], []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        site, _, rest = item.partition(":")
        kind, _, rnd = rest.partition("@")
        if not site or kind not in KINDS or (rnd and not rnd.isdigit()):
            problems.append(f"'{item}' must look like SITE:KIND[@ROUND] with KIND one of {', '.join(KINDS)}")
            continue
        faults.append(Fault(site, kind, int(rnd or 0)))
    if problems:
        raise ConfigError(f"environment variable {ENV}", problems)
    return faults


def active(site: str, server_round: int) -> str | None:
    """The fault kind injected at ``site`` in ``server_round`` (None: behave)."""
    text = os.environ.get(ENV, "")
    if not text:
        return None
    for f in parse_faults(text):
        if f.site == site and f.round in (0, server_round):
            log.warning("FAULT INJECTION (%s): site %s round %d: %s", ENV, site, server_round, f.kind)
            return f.kind
    return None


def corrupt(kind: str, update: ArrayRecord, start: ArrayRecord) -> ArrayRecord:
    """The update a misbehaving site would send instead of ``update`` (started from ``start``)."""
    out: dict[str, Array] = {}
    for i, (key, arr) in enumerate(update.items()):
        x = arr.numpy().copy()
        x0 = start[key].numpy()
        if kind == "nan" and i == 0:
            x.flat[0] = np.nan
        elif kind == "wrong-shape" and i == 0:
            x = x[:-1]
        elif kind == "scale-100":
            x = x0 + 100.0 * (x - x0)
        elif kind == "sign-flip":
            x = x0 - (x - x0)
        out[key] = Array(np.ascontiguousarray(x.astype(arr.numpy().dtype)))
    return ArrayRecord(out)

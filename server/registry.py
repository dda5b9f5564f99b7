"""Who is who in a federation, and what the coordinator last saw of each site's ledger.

* For one run, a Flower node id is bound to the site name it first spoke under: a reply under another
  name, or a second connected node claiming a known name, is rejected. (A node that disappeared may be
  replaced -- a site restarted -- and the binding moves, with a warning.)
* For the whole federation (``federation-dir/federation.json``, kept across runs), a site name is bound
  to its ledger key (trust on first use, or the operator's ``site-keys`` folder), and the coordinator
  remembers the last ledger entry and epsilon each site reported. Every request carries that entry, so a
  site whose ledger lost it refuses; a reply whose ledger went backwards, or whose epsilon went down, is
  rejected and flagged -- its ledger was reset.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.fsutil import atomic_write_text
from privacy.keys import public_key_fingerprint, public_key_from_pem
from privacy.ledger_checks import parse_json
from server.replies import SiteReply

__all__ = ["FEDERATION_NAME", "SiteRecord", "SiteRegistry", "load_site_keys"]

log = logging.getLogger(__name__)
FEDERATION_NAME = "federation.json"


@dataclass
class SiteRecord:
    """What the federation remembers of one site."""

    key_fingerprint: str = ""  # "" = the site does not sign
    ledger_seq: int = -1
    ledger_hash: str = ""
    epsilon: float | None = None
    run_id: str = ""
    round: int = 0


def load_site_keys(folder: str) -> dict[str, str]:
    """``site -> key fingerprint`` from the operator's folder of ``<site>.pub`` / ``<site>.pub.pem`` files."""
    if not folder:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError("run config", [f"'site-keys' = '{folder}' is not a folder of <site>.pub.pem files"])
    keys = {}
    for path in sorted(root.iterdir()):
        name = path.name.removesuffix(".pem").removesuffix(".pub")
        if path.is_file() and path.name.endswith((".pub", ".pub.pem")):
            keys[name] = public_key_fingerprint(path)
    return keys


class SiteRegistry:
    """Node bindings of a run and site records of the federation."""

    def __init__(self, path: Path | None, names: dict[str, str], site_keys: dict[str, str]) -> None:
        self.path = path
        self.names = names  # node id (str) -> site name, this run (kept in the checkpoint)
        self.site_keys = site_keys
        self.sites: dict[str, SiteRecord] = self._load()
        self.flags: dict[str, list[str]] = {}

    def _load(self) -> dict[str, SiteRecord]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            raw, problem = parse_json(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raw, problem = None, str(exc)
        fix = "restore it from backup (it records what every site's ledger held; never delete it)"
        if raw is None or not isinstance(raw.get("sites"), dict):
            raise ConfigError(
                str(self.path), [f"unreadable federation record ({problem or 'no sites'}): {fix}"]
            )
        try:
            return {str(k): SiteRecord(**v) for k, v in raw["sites"].items()}
        except TypeError as exc:
            raise ConfigError(str(self.path), [f"malformed federation record ({exc}): {fix}"]) from None

    def save(self) -> None:
        """Write the federation record atomically."""
        if self.path is not None:
            body = {"format": 1, "sites": {k: asdict(v) for k, v in sorted(self.sites.items())}}
            atomic_write_text(self.path, json.dumps(body, indent=2, sort_keys=True) + "\n")

    def name_of(self, node: int) -> str | None:
        """The site this node spoke as in this run."""
        return self.names.get(str(node))

    def head_for(self, node: int) -> tuple[int, str]:
        """``(seq, hash)`` of the last ledger entry seen from this node's site (-1, '' if none)."""
        name = self.name_of(node)
        record = self.sites.get(name) if name else None
        return (record.ledger_seq, record.ledger_hash) if record else (-1, "")

    def flag(self, site: str, problem: str) -> None:
        """Remember a problem that points at a reset or forged ledger."""
        log.error("site %s flagged: %s", site, problem)
        self.flags.setdefault(site, []).append(problem)

    def identity(self, node_id: int, name: str, connected: set[int]) -> str:
        """Why node ``node_id`` may not speak as ``name`` in this run ('' when it may)."""
        node = str(node_id)
        bound = self.names.get(node)
        if bound is not None and bound != name:
            return f"node {node} spoke as site {bound!r} earlier in this run and now claims to be {name!r}"
        live = [n for n, s in self.names.items() if s == name and n != node and int(n) in connected]
        if live:
            return f"site {name!r} is already node {live[0]} in this run; a second node may not claim it"
        return ""

    def check(self, row: SiteReply, connected: set[int]) -> str:
        """Why this reply may not speak for ``row.site`` ('' when it may); checks identity and progress."""
        name = row.site
        problem = self.identity(row.node_id, name, connected)
        if problem:
            return problem
        key_fp = ""
        if row.public_key:
            key = public_key_from_pem(row.public_key)
            if key is None:
                return "the ledger key sent is not an Ed25519 public key"
            key_fp = public_key_fingerprint(key)
        if self.site_keys:
            expected = self.site_keys.get(name)
            if expected is None:
                return f"site {name!r} has no ledger key in the operator's 'site-keys' folder"
            if key_fp != expected:
                shown = key_fp[:16] or "(none)"
                return f"site {name!r} signs with key {shown}, not its registered {expected[:16]}"
        record = self.sites.get(name)
        if record is not None and record.key_fingerprint and key_fp != record.key_fingerprint:
            was, now = record.key_fingerprint[:16], key_fp[:16] or "none"
            problem = f"site {name!r} changed its ledger key ({was} -> {now})"
            self.flag(name, problem)
            return problem
        return self._progress(row, record)

    def _progress(self, row: SiteReply, record: SiteRecord | None) -> str:
        """A site's ledger only grows, and its epsilon never goes down."""
        if record is None:
            return ""
        seq = row.receipt.get("seq")
        if isinstance(seq, int) and seq <= record.ledger_seq:
            problem = (
                f"its ledger answered with entry seq {seq}, but the coordinator already saw seq "
                f"{record.ledger_seq}: the ledger went backwards (reset or restored from an old copy)"
            )
            self.flag(row.site, problem)
            return problem
        eps = row.metrics.get("epsilon")
        if eps is not None and record.epsilon is not None and eps < record.epsilon - 1e-9:
            problem = (
                f"reported epsilon {eps:.4f} is below the {record.epsilon:.4f} it reported before: "
                "budget reset"
            )
            self.flag(row.site, problem)
            return problem
        return ""

    def record(self, row: SiteReply, node_changed_ok: bool = True) -> None:
        """Bind the node and remember the entry and epsilon of an accepted (or refused) reply."""
        node, name = str(row.node_id), row.site
        for other in [n for n, s in self.names.items() if s == name and n != node]:
            if node_changed_ok:
                log.warning("site %s now answers from node %s (was node %s)", name, node, other)
            del self.names[other]
        self.names[node] = name
        record = self.sites.setdefault(name, SiteRecord())
        if row.public_key:
            key = public_key_from_pem(row.public_key)
            record.key_fingerprint = public_key_fingerprint(key) if key else record.key_fingerprint
        seq, digest = row.receipt.get("seq"), row.receipt.get("hash")
        if isinstance(seq, int) and isinstance(digest, str):
            record.ledger_seq, record.ledger_hash = seq, digest
        eps = row.metrics.get("epsilon")
        if eps is not None and math.isfinite(eps):
            record.epsilon = eps
        record.run_id = str(row.receipt.get("run_id", record.run_id))
        rnd = row.receipt.get("round")
        record.round = rnd if isinstance(rnd, int) else record.round

    def snapshot(self) -> dict[str, Any]:
        """Flags per site, for the summary."""
        return {k: list(v) for k, v in self.flags.items()}

"""The run folder's layout, owned in one place (coordinator, local baseline, simulator, report, auditor).

::

    RUN/
      summary.json          the coordinator's summary of the run (written last)
      metrics.jsonl         one line per round
      receipts.jsonl        every ledger entry a site answered with, as received
      adapter/              the exported PEFT adapter
      checkpoints/          round-NNNN/ (the newest two)
      ledgers/<site>.jsonl  the sites' ledgers as an auditor collects them, and <site>.head.json
      keys/<site>.pub       the sites' public ledger keys
      sites/<site>/         simulated sites: policy.toml, state/, keys/ (simulation only)
      simulation.json       how a simulated run was launched (for --resume)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.fsutil import atomic_write_text

__all__ = ["RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    """Paths and small readers / writers of one run folder."""

    root: Path

    @property
    def summary(self) -> Path:
        """``summary.json``."""
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``."""
        return self.root / "metrics.jsonl"

    @property
    def receipts(self) -> Path:
        """``receipts.jsonl``."""
        return self.root / "receipts.jsonl"

    @property
    def adapter(self) -> Path:
        """``adapter/``."""
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``."""
        return self.root / "checkpoints"

    @property
    def ledgers(self) -> Path:
        """``ledgers/``."""
        return self.root / "ledgers"

    @property
    def keys(self) -> Path:
        """``keys/``."""
        return self.root / "keys"

    @property
    def sites(self) -> Path:
        """``sites/`` (simulated sites)."""
        return self.root / "sites"

    @property
    def simulation(self) -> Path:
        """``simulation.json``."""
        return self.root / "simulation.json"

    def ledger(self, site: str) -> Path:
        """A site's collected ledger."""
        return self.ledgers / f"{site}.jsonl"

    def head(self, site: str) -> Path:
        """A site's collected head record."""
        return self.ledgers / f"{site}.head.json"

    def public_key(self, site: str) -> Path:
        """A site's public ledger key."""
        return self.keys / f"{site}.pub"

    def collected_ledgers(self) -> list[Path]:
        """The ledgers in ``ledgers/``, by site name."""
        return sorted(self.ledgers.glob("*.jsonl"))

    def public_keys(self) -> dict[str, Path]:
        """Site -> public key file, as the sites handed them over."""
        return {p.name.removesuffix(".pub"): p for p in sorted(self.keys.glob("*.pub"))}

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        atomic_write_text(self.summary, json.dumps(summary, indent=2, sort_keys=False) + "\n")

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` (``FileNotFoundError`` / ``ValueError`` for the caller to explain)."""
        data: dict[str, Any] = json.loads(self.summary.read_text(encoding="utf-8"))
        return data

    def append_metrics(self, line: Mapping[str, Any]) -> None:
        """Append one round's line to ``metrics.jsonl``."""
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    def write_metrics(self, lines: Iterable[Mapping[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` atomically."""
        atomic_write_text(self.metrics, "".join(json.dumps(line) + "\n" for line in lines))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (none when the file is missing)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(x) for x in self.metrics.read_text(encoding="utf-8").splitlines() if x.strip()]

    def append_receipts(self, lines: Iterable[str]) -> None:
        """Append receipt lines durably (the auditor's cross-check must survive a crash)."""
        with open(self.receipts, "a", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

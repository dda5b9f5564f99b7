"""What a site answers to one training request (light: no torch, so a forwarding ClientApp stays quick)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord

__all__ = ["RoundOutcome"]


@dataclass
class RoundOutcome:
    """A site's answer to one training request; ``receipt`` is the ledger entry that answered it."""

    site: str
    trained: bool
    reason: str = ""
    arrays: ArrayRecord | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    scrub_counts: dict[str, int] = field(default_factory=dict)
    receipt: dict[str, Any] = field(default_factory=dict)
    public_key: str = ""
    train_kind: str = ""  # what a trained round trained (sft, cpt)

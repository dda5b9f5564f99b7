"""Sections of a run config: LoRA, the training asked of each site, aggregation, site-level DP, SecAgg+.

Each key is declared once (:func:`common.declare.option`); :class:`common.config.RunConfig` groups the
sections, and a site's :class:`common.config.TrainRequest` carries the LoRA and training ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from common.declare import option

__all__ = [
    "AGGREGATIONS",
    "MODULUS",
    "AggregationConfig",
    "LoraConfig",
    "LoraSpec",
    "SecAggConfig",
    "SiteDPConfig",
    "TrainConfig",
    "between",
]

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
MODULUS = 2**32  # Flower's SecAgg+ mask modulus


def between(low: float, high: float) -> Any:
    """A check: ``low <= x <= high``."""
    return lambda x: bool(low <= x <= high)


def _targets_ok(value: str) -> bool:
    names = [t.strip() for t in value.split(",")]
    return 0 < len(names) <= 64 and all(_MODULE.fullmatch(t) for t in names)


@dataclass(frozen=True)
class LoraConfig:
    """The adapter structure every party of a federation must share."""

    rank: int = option("lora-rank", 16, "LoRA rank r", "an integer in [1, 4096]", between(1, 4096))
    alpha: int = option("lora-alpha", 32, "LoRA scale alpha", "an integer in [1, 65536]", between(1, 65536))
    targets: str = option(
        "lora-targets", "q_proj,v_proj", "modules LoRA adapts", "comma-separated module names", _targets_ok
    )
    ffa: bool = option(
        "ffa-lora", False, "FFA-LoRA: A frozen at the shared init, only B trained and sent", "true or false"
    )

    @property
    def modules(self) -> tuple[str, ...]:
        """The target module names."""
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def update_keys(self, keys: Iterable[str]) -> list[str]:
        """The adapter keys a site trains and sends (all of them, or only B under FFA-LoRA)."""
        return [k for k in keys if not self.ffa or ".lora_B." in k]


LoraSpec = LoraConfig  # the name the model code uses for "the LoRA layout"


@dataclass(frozen=True)
class TrainConfig:
    """The local training a coordinator requests of every site (each site's policy has the last word)."""

    local_steps: int = option(
        "local-steps", 5, "DP-SGD steps per round", "an integer in [1, 100000]", between(1, 100_000)
    )
    batch_size: int = option(
        "batch-size", 16, "expected Poisson batch", "an integer in [1, 1000000]", between(1, 1_000_000)
    )
    learning_rate: float = option(
        "learning-rate", 0.02, "AdamW learning rate", "a number in (0, 1000]", lambda x: 0 < x <= 1000
    )
    max_grad_norm: float = option(
        "max-grad-norm", 1.0, "per-record clip norm", "a number in (0, 1e6]", lambda x: 0 < x <= 1e6
    )
    noise_multiplier: float = option(
        "noise-multiplier", 0.0, "DP noise multiplier",
        "0 (each site calibrates to its budget) or a number in (0, 1e4]",
        between(0, 1e4),
    )  # fmt: skip
    max_seq_len: int = option(
        "max-seq-len", 256, "tokens per record", "an integer in [8, 1000000]", between(8, 1_000_000)
    )
    dp: bool = option(
        "dp", True, "record-level DP", "true, or false for a non-private baseline (sites must allow it)"
    )
    seed: int = option(
        "seed", -1, "noise seed", "-1 (unpredictable DP noise) or a seed >= 0 (testing only: NOT private)",
        between(-1, 2**62),
    )  # fmt: skip


@dataclass(frozen=True)
class AggregationConfig:
    """How the coordinator picks sites, checks their updates and combines them."""

    fraction_train: float = option(
        "fraction-train",
        1.0,
        "share of connected sites asked per round",
        "a fraction in (0, 1]",
        lambda x: 0 < x <= 1,
    )
    min_train_sites: int = option(
        "min-train-sites", 2, "updates a round needs", "an integer >= 1", lambda x: x >= 1
    )
    method: str = option(
        "aggregation",
        "fedavg",
        "aggregation",
        "one of " + ", ".join(AGGREGATIONS),
        lambda x: x in AGGREGATIONS,
    )
    trim_beta: float = option(
        "trim-beta",
        0.2,
        "share trimmed at each end (trimmed-mean)",
        "a fraction in (0, 0.5)",
        lambda x: 0 < x < 0.5,
    )
    max_update_norm: float = option(
        "max-update-norm",
        100.0,
        "L2 bound on each site's update",
        "a number >= 0 (0 = off)",
        lambda x: x >= 0,
    )
    update_norm_ratio: float = option(
        "update-norm-ratio",
        10.0,
        "bound relative to the round's median update norm",
        "a number >= 0 (0 = off)",
        lambda x: x >= 0,
    )
    weighting: str = option(
        "weighting",
        "num-examples",
        "weight of each update",
        "'num-examples' or 'equal'",
        lambda x: x in ("num-examples", "equal"),
    )
    max_weight_share: float = option(
        "max-weight-share", 0.5, "largest share of the aggregate one site may weigh",
        "a fraction in (0, 1] (1 = off)",
        lambda x: 0 < x <= 1,
    )  # fmt: skip


@dataclass(frozen=True)
class SiteDPConfig:
    """Site-level DP at the coordinator (Flower's server-side fixed clipping)."""

    noise: float = option(
        "site-dp-noise", 0.0, "site-level DP noise multiplier", "a number >= 0 (0 = off)", lambda x: x >= 0
    )
    clip: float = option(
        "site-dp-clip", 1.0, "L2 bound on each site's update", "a number > 0", lambda x: x > 0
    )
    delta: float = option(
        "site-dp-delta",
        1e-3,
        "site-level delta",
        "a number in (0, 1]: ~1/number-of-sites or smaller",
        lambda x: 0 < x <= 1,
    )


@dataclass(frozen=True)
class SecAggConfig:
    """Flower's SecAgg+: the coordinator sees only the sum of the updates."""

    enabled: bool = option("secagg", False, "SecAgg+ aggregation", "true or false")
    shares: int = option(
        "secagg-shares", 3, "secret shares per site's key", "an integer >= 2", lambda x: x >= 2
    )
    threshold: int = option(
        "secagg-threshold", 2, "shares needed to unmask", "an integer >= 2", lambda x: x >= 2
    )
    clip_range: float = option(
        "secagg-clip-range", 8.0, "update values are clipped to +-range", "a number > 0", lambda x: x > 0
    )
    quantization: int = option(
        "secagg-quantization", 4194304, "quantization levels", "an integer >= 2", lambda x: x >= 2
    )

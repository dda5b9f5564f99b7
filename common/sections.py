"""Sections of a run config: LoRA, the training asked of each site, aggregation, site-level DP, SecAgg+.

Each key is declared once (:func:`common.declare.option`); :class:`common.config.RunConfig` groups the
sections, and a site's :class:`common.config.TrainRequest` carries the LoRA and training ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from common.declare import Rule, above, at_least, fraction, one_of, option, within

__all__ = [
    "AGGREGATIONS",
    "MODULUS",
    "AggregationConfig",
    "LoraConfig",
    "LoraSpec",
    "SecAggConfig",
    "SiteDPConfig",
    "TrainConfig",
]

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
TRAIN_KINDS = ("sft", "cpt", "dpo")
"""What a round trains: instruction tuning (sft), continued pretraining on raw text (cpt) or
preference tuning on (prompt, chosen, rejected) pairs (dpo)."""
MODULUS = 2**32  # Flower's SecAgg+ mask modulus


def _targets_ok(value: str) -> bool:
    names = [t.strip() for t in value.split(",")]
    return 0 < len(names) <= 64 and all(_MODULE.fullmatch(t) for t in names)


@dataclass(frozen=True)
class LoraConfig:
    """The adapter structure every party of a federation must share."""

    rank: int = option("lora-rank", 16, "LoRA rank r", within(1, 4096))
    alpha: int = option("lora-alpha", 32, "LoRA scale alpha", within(1, 65536))
    targets: str = option(
        "lora-targets",
        "q_proj,v_proj",
        "modules LoRA adapts",
        Rule("comma-separated module names", _targets_ok),
    )
    ffa: bool = option(
        "ffa-lora",
        False,
        "FFA-LoRA: A frozen at the shared init, only B trained and sent",
        Rule("true or false"),
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

    local_steps: int = option("local-steps", 5, "DP-SGD steps per round", within(1, 100000))
    batch_size: int = option("batch-size", 16, "expected Poisson batch", within(1, 1000000))
    learning_rate: float = option(
        "learning-rate", 0.02, "AdamW learning rate", within(0, 1000, open_low=True)
    )
    max_grad_norm: float = option("max-grad-norm", 1.0, "per-record clip norm", within(0, 1e6, open_low=True))
    noise_multiplier: float = option(
        "noise-multiplier",
        0.0,
        "DP noise multiplier",
        Rule("0 (each site calibrates to its budget) or a number in (0, 1e4]", within(0, 1e4).check),
    )
    train_kind: str = option(
        "train-kind",
        "sft",
        "what the sites train: sft (instruction -> response, loss on the response), cpt (continued "
        "pretraining on raw text) or dpo (preference pairs); each site's policy says which it allows "
        "and where the records are",
        one_of(TRAIN_KINDS),
    )
    dpo_beta: float = option(
        "dpo-beta",
        0.1,
        "DPO's beta: how far the tuned model may move from the base",
        within(0, 100, open_low=True),
    )
    max_seq_len: int = option("max-seq-len", 256, "tokens per record", within(8, 1000000))
    dp: bool = option(
        "dp", True, "record-level DP", Rule("true, or false for a non-private baseline (sites must allow it)")
    )
    wire_dtype: str = option(
        "wire-dtype",
        "float32",
        "precision of the update a site sends (rounding a DP release costs no privacy)",
        one_of(("float32", "bfloat16", "float16")),
    )
    seed: int = option(
        "seed",
        -1,
        "noise seed",
        Rule(
            "-1 (unpredictable DP noise) or a seed >= 0 (testing only: NOT private)", within(-1, 2**62).check
        ),
    )


@dataclass(frozen=True)
class AggregationConfig:
    """How the coordinator picks sites, checks their updates and combines them."""

    fraction_train: float = option(
        "fraction-train",
        1.0,
        "share of connected sites asked per round",
        fraction(1),
    )
    min_train_sites: int = option("min-train-sites", 2, "updates a round needs", at_least(1))
    method: str = option(
        "aggregation",
        "fedavg",
        "aggregation",
        one_of(AGGREGATIONS),
    )
    trim_beta: float = option(
        "trim-beta",
        0.2,
        "share trimmed at each end (trimmed-mean)",
        fraction(0.5, open_high=True),
    )
    max_update_norm: float = option(
        "max-update-norm",
        100.0,
        "L2 bound on each site's update",
        at_least(0, note="0 = off"),
    )
    update_norm_ratio: float = option(
        "update-norm-ratio",
        10.0,
        "bound relative to the round's median update norm",
        at_least(0, note="0 = off"),
    )
    weighting: str = option(
        "weighting",
        "num-examples",
        "weight of each update",
        one_of(("num-examples", "equal")),
    )
    max_weight_share: float = option(
        "max-weight-share", 0.5, "largest share of the aggregate one site may weigh",
        fraction(1, note='1 = off'),
    )  # fmt: skip


@dataclass(frozen=True)
class SiteDPConfig:
    """Site-level DP at the coordinator (Flower's server-side fixed clipping)."""

    noise: float = option("site-dp-noise", 0.0, "site-level DP noise multiplier", at_least(0, note="0 = off"))
    clip: float = option("site-dp-clip", 1.0, "L2 bound on each site's update", above(0))
    delta: float = option(
        "site-dp-delta",
        1e-3,
        "site-level delta",
        within(0, 1, open_low=True, note="~1/number-of-sites or smaller"),
    )


@dataclass(frozen=True)
class SecAggConfig:
    """Flower's SecAgg+: the coordinator sees only the sum of the updates."""

    enabled: bool = option("secagg", False, "SecAgg+ aggregation", Rule("true or false"))
    shares: int = option("secagg-shares", 3, "secret shares per site's key", at_least(2))
    threshold: int = option("secagg-threshold", 2, "shares needed to unmask", at_least(2))
    clip_range: float = option("secagg-clip-range", 8.0, "update values are clipped to +-range", above(0))
    quantization: int = option("secagg-quantization", 4194304, "quantization levels", at_least(2))

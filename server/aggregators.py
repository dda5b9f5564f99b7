"""Which Flower strategy aggregates a run: FedAvg, its robust variants, site-level DP around FedAvg.

:class:`server.strategy.Guard` wraps what :func:`build_strategy` returns; plain FedAvg is folded
from the round's stored updates (``server.fold``), the others get every update at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from common.errors import ConfigError

__all__ = ["AGGREGATIONS", "WEIGHT", "SiteLevelDP", "build_strategy"]

AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
WEIGHT = "weight"  # the only metric the inner strategy sees


@dataclass(frozen=True)
class SiteLevelDP:
    """Site-level DP at the coordinator: each site's update clipped, Gaussian noise on the sum."""

    noise_multiplier: float
    clipping_norm: float
    delta: float


def build_strategy(
    *,
    min_sites: int,
    fraction_train: float,
    sites_expected: int,
    site_dp: SiteLevelDP | None,
    aggregation: str = "fedavg",
    trim_beta: float = 0.2,
) -> tuple[Strategy, DifferentialPrivacyServerSideFixedClipping | None]:
    """Flower's FedAvg (or its robust median / trimmed-mean / Krum), optionally with site-level DP.

    The inner strategy aggregates by the ``weight`` the :class:`Guard` gives each update (equal weights
    under site-level DP: with num-examples weights one site's influence would depend on its size).
    Flower's DP accountant requires FedAvg's own aggregation, so site-level DP combines with ``fedavg`` only.
    """
    common: dict[str, Any] = {
        "fraction_train": fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
        "weighted_by_key": WEIGHT,
    }
    robust: dict[str, Callable[[], FedAvg]] = {
        "median": lambda: FedMedian(**common),
        "trimmed-mean": lambda: FedTrimmedAvg(beta=trim_beta, **common),
        "krum": lambda: Krum(num_malicious_nodes=max(0, (sites_expected - 3) // 2), **common),
    }
    if aggregation not in AGGREGATIONS:
        raise ConfigError("run config", [f"'aggregation' must be one of {', '.join(AGGREGATIONS)}"])
    if aggregation != "fedavg":
        if site_dp is not None:
            raise ConfigError(
                "run config",
                [
                    "site-level DP ('site-dp-noise' > 0) needs 'aggregation' = 'fedavg': Flower's DP "
                    "accountant covers FedAvg's own aggregation only"
                ],
            )
        return robust[aggregation](), None
    fedavg = FedAvg(**common)
    if site_dp is None:
        return fedavg, None
    config = PrivacyConfig(
        target_delta=site_dp.delta,
        population_size=sites_expected,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        fedavg,
        noise_multiplier=site_dp.noise_multiplier,
        clipping_norm=site_dp.clipping_norm,
        num_sampled_clients=sites_expected,
        accountant=RdpAccountant(config),
    )
    return wrapper, wrapper

"""The one place that turns Flower's ``run_config`` / ``node_config`` into frozen dataclasses.

Every key is declared once, as a field with its key, default, rule and help (:mod:`common.declare`),
grouped into sub-configs: LoRA (:class:`LoraConfig`), the training a coordinator requests of each site
(:class:`TrainConfig`), aggregation (:class:`AggregationConfig`), site-level DP (:class:`SiteDPConfig`)
and SecAgg+ (:class:`SecAggConfig`); room is left for compute and training-kind sections. The run
config (:class:`RunConfig`) and a site's train request (:class:`TrainRequest`) share the LoRA and
training declarations, so a key has one domain wherever it is read. Every problem -- per key and
across keys -- is reported at once, naming the key and the fix. ``pyproject.toml``'s
``[tool.flwr.app.config]`` equals :func:`default_run_config` (a test keeps them equal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.declare import Rule, defaults, flatten, one_of, option, parse, section, within
from common.errors import ConfigError
from common.sections import (
    MODULUS,
    AggregationConfig,
    LoraConfig,
    LoraSpec,
    SecAggConfig,
    SiteDPConfig,
    TrainConfig,
)

__all__ = [
    "SITE_NAME",
    "AggregationConfig",
    "LoraConfig",
    "LoraSpec",
    "NodeConfig",
    "RunConfig",
    "SecAggConfig",
    "SiteDPConfig",
    "TrainConfig",
    "TrainRequest",
    "default_run_config",
    "policy_paths",
]

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a site's name: also a file name in run folders
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RunConfig:
    """The coordinator's run configuration (Flower ``run_config``)."""

    num_server_rounds: int = option("num-server-rounds", 12, "federated rounds", within(1, 100000))
    round_timeout: float = option(
        "round-timeout", 900.0, "seconds to wait for sites each round", Rule("seconds > 0", lambda x: x > 0)
    )
    resume: bool = option(
        "resume", False, "continue the run in out-dir from its checkpoint", Rule("true or false")
    )
    eval_full: str = option(
        "eval-full",
        "never",
        "ask sites to score every held-out record, not their policy's bounded sample (a site "
        "honours it only if its [evaluation] allow-full-on-request is true)",
        one_of(("never", "last-round", "every-round")),
    )
    model_dir: str = option("model-dir", "", "the base model's local folder", Rule("a local folder"))
    out_dir: str = option("out-dir", "runs/latest", "the run folder", Rule("a writable folder", bool))
    federation_dir: str = option(
        "federation-dir", "", "a folder kept across runs", Rule("a folder (default: out-dir's parent)")
    )
    site_keys: str = option(
        "site-keys",
        "",
        "the sites' ledger keys",
        Rule("'' (trust each site's key on first use) or a folder of <site>.pub.pem"),
    )
    sim_policies: str = option(
        "sim-policies", "", "site policies by partition id (simulation only)", Rule("a JSON list of paths")
    )
    lora: LoraConfig = section(LoraConfig, "LoRA")
    train: TrainConfig = section(TrainConfig, "local training requested of every site")
    aggregation: AggregationConfig = section(AggregationConfig, "aggregation")
    site_dp: SiteDPConfig = section(SiteDPConfig, "site-level DP")
    secagg: SecAggConfig = section(SecAggConfig, "SecAgg+")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], source: str = "run config") -> RunConfig:
        """Build from Flower's ``context.run_config`` (missing keys take defaults)."""
        built: RunConfig = parse(cls, run_config, source)
        return built

    def problems(self) -> list[str]:
        """What the keys get wrong together (checked with everything else, before anything starts)."""
        out = []
        fedavg = self.aggregation.method == "fedavg"
        if self.site_dp.noise > 0 and self.lora.ffa:
            out.append(
                "'site-dp-noise' > 0 cannot be combined with 'ffa-lora' = true yet: Flower's clipping "
                "wrapper clips whole adapters; set one of them off"
            )
        if self.site_dp.noise > 0 and not fedavg:
            out.append(
                "site-level DP ('site-dp-noise' > 0) needs 'aggregation' = 'fedavg': Flower's DP accountant "
                "covers FedAvg's own aggregation only"
            )
        sa = self.secagg
        if sa.enabled and not fedavg:
            out.append(
                f"'secagg' = true needs 'aggregation' = 'fedavg' (got {self.aggregation.method!r}): robust "
                "aggregators need the individual updates that SecAgg+ hides"
            )
        if sa.enabled and self.site_dp.noise > 0:
            out.append(
                "'secagg' = true cannot be combined with 'site-dp-noise' > 0: Flower's server-side clipping "
                "needs each site's update; set one of them off"
            )
        if sa.enabled and self.train.wire_dtype != "float32":
            out.append(
                f"'secagg' = true needs 'wire-dtype' = 'float32' (got {self.train.wire_dtype!r}): SecAgg+ "
                "sends its own quantized integers"
            )
        if sa.enabled and sa.shares < 3:
            out.append(f"'secagg-shares' must be >= 3 under SecAgg+ (got {sa.shares})")
        if sa.enabled and sa.threshold >= sa.shares:
            out.append(
                f"'secagg-threshold' ({sa.threshold}) must be below 'secagg-shares' ({sa.shares}): a secret "
                "is rebuilt from threshold of its shares"
            )
        if sa.enabled and sa.quantization >= MODULUS:
            out.append(f"'secagg-quantization' must be below 2**32, the mask modulus (got {sa.quantization})")
        try:
            policy_paths(self.sim_policies)
        except ConfigError as exc:
            out += exc.problems
        return out

    def policy_paths(self) -> list[str]:
        """Site policy paths for simulation, indexed by partition id."""
        return policy_paths(self.sim_policies)


def policy_paths(sim_policies: str) -> list[str]:
    """``sim-policies`` as a list: a JSON array of paths, or (paths without commas) comma-separated."""
    text = sim_policies.strip()
    if text.startswith("["):
        try:
            paths = json.loads(text)
        except ValueError:
            paths = None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(
                "run config", ["'sim-policies' must be a JSON array of paths, e.g. [\"/a/policy.toml\"]"]
            )
        return paths
    return [p.strip() for p in text.split(",") if p.strip()]


def default_run_config() -> dict[str, Any]:
    """The defaults as Flower would see them (kebab-case keys)."""
    return defaults(RunConfig)


def _hex64(value: str) -> bool:
    return bool(_HEX64.fullmatch(value))


@dataclass(frozen=True)
class TrainRequest:
    """What the coordinator asks a site to do in one round (a ``ConfigRecord``).

    It carries the run's LoRA and training sections -- the same declarations, hence the same domains,
    as the run config -- plus the round's identity. ``train.seed`` >= 0 asks for reproducible (NOT
    private) noise, which a site refuses unless its policy allows seeded noise; ``ledger_seq`` /
    ``ledger_hash`` name the last entry of this site's ledger the coordinator saw (-1 / "" when none),
    so a site whose ledger lost it refuses.
    """

    server_round: int = option(
        "server-round", 1, "the round", Rule("an integer in [1, num-rounds]", within(1, 100000).check)
    )
    num_rounds: int = option("num-rounds", 1, "rounds the run plans", within(1, 100000))
    run_id: str = option(
        "run-id",
        "",
        "the run",
        Rule("1-64 letters, digits, '_', '.', '-'", lambda x: bool(RUN_ID.fullmatch(x))),
    )
    base_model_fingerprint: str = option(
        "base-model-fingerprint", "", "SHA-256 of the base model", Rule("64 lowercase hex characters", _hex64)
    )
    ledger_seq: int = option(
        "ledger-seq",
        -1,
        "the site's last ledger entry the coordinator saw",
        Rule("-1 (none) or a seq", within(-1, 2**62).check),
    )
    ledger_hash: str = option(
        "ledger-hash",
        "",
        "that entry's hash",
        Rule("'' or 64 lowercase hex characters", lambda x: x == "" or _hex64(x)),
    )
    lora: LoraConfig = section(LoraConfig)
    train: TrainConfig = section(TrainConfig)

    @classmethod
    def build(cls, cfg: RunConfig, *, server_round: int, run_id: str, fingerprint: str) -> TrainRequest:
        """The request a coordinator running ``cfg`` sends in ``server_round``."""
        return cls(server_round, cfg.num_server_rounds, run_id, fingerprint, lora=cfg.lora, train=cfg.train)

    def to_record(self) -> dict[str, Any]:
        """Kebab-case mapping suitable for a Flower ``ConfigRecord``."""
        return flatten(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainRequest:
        """Parse a received ``ConfigRecord``: every key required (three have safe defaults), in its domain."""
        safe = {"seed", "ledger-seq", "ledger-hash"}  # absent: unseeded noise, no coordinator view
        required = [k for k in flatten(cls()) if k not in safe]
        built: TrainRequest = parse(cls, record, "train request from the coordinator", required=required)
        return built

    def problems(self) -> list[str]:
        """Cross-key rules of a request."""
        out = []
        if self.server_round > self.num_rounds:
            out.append(f"'server-round' {self.server_round} is past 'num-rounds' {self.num_rounds}")
        if (self.ledger_seq >= 0) != bool(self.ledger_hash):
            out.append("'ledger-seq' and 'ledger-hash' name one ledger entry: give both, or neither")
        return out

    @staticmethod
    def salvage(record: Mapping[str, Any]) -> tuple[int, str]:
        """``(round, run id)`` of a request that failed to parse, as far as they are valid (its refusal's)."""
        rnd, run = record.get("server-round"), record.get("run-id")
        round_ok = isinstance(rnd, int) and not isinstance(rnd, bool) and 0 <= rnd <= 100000
        run_ok = isinstance(run, str) and bool(RUN_ID.fullmatch(run))
        return (rnd if round_ok and isinstance(rnd, int) else 0), (
            run if run_ok and isinstance(run, str) else "invalid-request"
        )


@dataclass(frozen=True)
class NodeConfig:
    """A SuperNode's ``node_config``: the site policy it runs, or the site worker it hands rounds to."""

    policy: str = option(
        "policy", "", "the site policy this SuperNode runs", Rule("the policy file's absolute path")
    )
    worker: str = option(
        "worker",
        "",
        "hand every round to the site worker (keeps model and data warm)",
        Rule("the socket of `fedtune site serve`, or '' (the agent runs in each ClientApp process)"),
    )

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any], sim_policies: str = "") -> NodeConfig:
        """Resolve the site policy path.

        A deployed SuperNode sets ``policy`` (or ``worker``: the socket of ``fedtune site serve``) in
        its ``--node-config``. In simulation the
        node has only ``partition-id``; the run config's ``sim-policies`` maps it to a policy.
        """
        policy, worker = node_config.get("policy"), node_config.get("worker")
        if isinstance(worker, str) and worker:  # `fedtune site serve` holds the policy and everything else
            return cls(policy=policy if isinstance(policy, str) else "", worker=worker)
        if isinstance(policy, str) and policy:
            return cls(policy=policy)
        pid = node_config.get("partition-id")
        paths = policy_paths(sim_policies)
        if isinstance(pid, int) and 0 <= pid < len(paths):
            return cls(policy=paths[pid])
        raise ConfigError(
            "node config",
            [
                "no site policy: start the SuperNode with --node-config \"policy='/path/site.toml'\""
                + (
                    f" (simulation: partition-id {pid} has no entry in 'sim-policies', "
                    f"which lists {len(paths)} path(s))"
                    if pid is not None
                    else ""
                )
            ],
        )

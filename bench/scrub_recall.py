"""Measure the scrubber's recall per entity type and throughput on the synthetic sites.

Usage: ``.venv/bin/python -m bench.scrub_recall [--sites 3] [--records 240]``

Three rows: ``records`` (``Scrubber.scrub_records`` over instruction + response, names
propagate across the two fields), ``texts`` (``scrub_texts``: each field alone) and
``presidio-baseline`` (Presidio's built-in recognizers + the same spaCy pipeline, no
clinical recognizers, filters or propagation) to show what the additions buy.
A planted value counts as missed if it, or (for names) any name token of >= 3
characters, is still present as a word in the scrubbed record.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence

from embedded.synthdata import PlantedPII, generate_site_records
from privacy.pii import ScrubConfig, get_scrubber

_TITLES = {"Dr", "Mr", "Mrs", "Ms"}


def missed(planted: PlantedPII, text: str) -> bool:
    """True when ``planted`` (or a name token of it) survives in ``text``."""
    if planted.value in text:
        return True
    if planted.entity_type != "PERSON":
        return False
    tokens = [t for t in re.findall(r"[\w'\-]+", planted.value) if t not in _TITLES and len(t) >= 3]
    return any(re.search(rf"(?<![\w'\-]){re.escape(t)}(?![\w'\-])", text) for t in tokens)


def recall(planted: Sequence[PlantedPII], scrubbed: dict[str, str]) -> dict[str, tuple[float, int]]:
    """Recall and count per entity type."""
    total = Counter(p.entity_type for p in planted)
    miss = Counter(p.entity_type for p in planted if missed(p, scrubbed[p.record_id]))
    return {k: (1 - miss[k] / n, n) for k, n in sorted(total.items())}


def main(argv: Sequence[str] | None = None) -> None:
    """Print recall per entity type and records/s for each scrubbing mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--records", type=int, default=240)
    args = parser.parse_args(argv)
    records, planted = [], []
    for index in range(args.sites):
        site_records, site_planted = generate_site_records(index, args.records)
        records += site_records
        planted += site_planted
    start = time.perf_counter()
    scrubber = get_scrubber(ScrubConfig())
    print(f"scrubber load: {time.perf_counter() - start:.1f} s")

    def by_records() -> list[str]:
        out, _ = scrubber.scrub_records(records, ["instruction", "response"])
        return [f"{r['instruction']}\n{r['response']}" for r in out]

    def by_texts() -> list[str]:
        out, _ = scrubber.scrub_texts([r[f] for r in records for f in ("instruction", "response")])
        return [f"{out[2 * i]}\n{out[2 * i + 1]}" for i in range(len(records))]

    def baseline() -> list[str]:
        from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine
        from presidio_anonymizer import AnonymizerEngine

        nlp_engine = scrubber._analyzer.nlp_engine  # same spaCy pipeline, default registry
        batch = BatchAnalyzerEngine(AnalyzerEngine(nlp_engine=nlp_engine, supported_languages=["en"]))
        texts = [f"{r['instruction']}\n{r['response']}" for r in records]
        found = batch.analyze_iterator(texts, language="en", batch_size=32, score_threshold=0.4)
        anonymizer = AnonymizerEngine()
        return [anonymizer.anonymize(t, list(f)).text for t, f in zip(texts, found, strict=True)]  # type: ignore[arg-type]

    modes: list[tuple[str, Callable[[], list[str]]]] = [
        ("records", by_records),
        ("texts", by_texts),
        ("presidio-baseline", baseline),
    ]
    for name, run in modes:
        start = time.perf_counter()
        texts = run()
        elapsed = time.perf_counter() - start
        scores = recall(planted, {r["id"]: t for r, t in zip(records, texts, strict=True)})
        rate = len(records) / elapsed
        print(f"\n{name}: {len(records)} records in {elapsed:.1f} s = {rate:.1f} records/s")
        for kind, (value, n) in scores.items():
            print(f"  {kind:<22} recall {value:.4f}  (n={n})")


if __name__ == "__main__":
    main()

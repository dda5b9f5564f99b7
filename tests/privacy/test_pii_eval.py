"""Measured recall on the labelled clinical/banking/insurance set, per-entity operators, workers."""

from __future__ import annotations

import re

import pytest

from common.errors import ConfigError
from embedded.synthpii import generate_labelled_texts
from privacy.pii import Scrubber, ScrubConfig, get_scrubber
from privacy.pii_eval import STRUCTURED, evaluate, score

KEY = b"site-a-secret-0123456789"


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return get_scrubber(ScrubConfig())


def test_recall_and_kept_terms_meet_targets(scrubber: Scrubber) -> None:
    texts = generate_labelled_texts(120, seed=3)
    report = evaluate(scrubber, texts)
    print("\n" + report.table())
    assert set(report.total) >= STRUCTURED, set(report.total)
    assert {"PERSON", "STREET_ADDRESS", "ZIP_CODE", "DATE_TIME"} <= set(report.total)
    assert min(report.total.values()) >= 30 and report.terms_total > 500
    assert not report.failures(), (report.failures(), report.missed)


def test_scorer_counts_partial_cover_as_miss() -> None:
    texts = generate_labelled_texts(1, seed=0)[:1]
    item = texts[0]
    full = [(s.start, s.end) for s in item.pii]
    assert sum(score(texts, [full]).caught.values()) == len(item.pii)
    partial = [(s.start, s.end - 1) for s in item.pii]
    assert sum(score(texts, [partial]).caught.values()) == 0
    touched = score(texts, [[(item.terms[0].start, item.terms[0].start + 1)]])
    assert touched.terms_kept == len(item.terms) - 1


def test_per_entity_operators_and_date_year() -> None:
    text = ["Mr. Kowalski, MRN 4829103, DOB March 3, 1956, called 617-382-0142 on 2021-05-04."]
    config = ScrubConfig(
        operator="placeholder",
        entity_operators={"DATE_TIME": "redact", "MRN": "pseudonym", "PERSON": "placeholder"},
        pseudonym_key=KEY,
        keep_date_year=True,
    )
    out, report = Scrubber(config).scrub_texts(text)
    assert re.fullmatch(
        r"Mr\. <PERSON>, MRN <MRN_[0-9a-f]{6}>, DOB 1956, called <PHONE> on 2021\.", out[0]
    ), out[0]
    assert config.operator_for("MEDICAL_RECORD_NUMBER") == "pseudonym"
    assert config.operator_for("US_SSN") == "placeholder"
    assert report.counts["DATE_TIME"] == 2
    kept, _ = get_scrubber(ScrubConfig(keep_date_year=True)).scrub_texts(["Seen 03/14/2021 and 3/1/22."])
    assert kept == ["Seen <DATE> 2021 and <DATE>."]


def test_entity_operator_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        ScrubConfig(entity_operators={"SHOE_SIZE": "redact", "PERSON": "mask", "DATE": "pseudonym"})
    text = str(err.value)
    assert "SHOE_SIZE" in text and "entity-operators.PERSON" in text and "pseudonym-key" in text
    a = ScrubConfig(entity_operators={"DATE": "redact"})
    assert a == ScrubConfig(entity_operators={"DATE_TIME": "redact"}) and hash(a) == hash(ScrubConfig())
    assert a != ScrubConfig()


def test_workers_give_identical_output(scrubber: Scrubber) -> None:
    texts = [t.text for t in generate_labelled_texts(8, seed=5)]
    records = [{"id": i, "text": t, "n": i * 2} for i, t in enumerate(texts)]
    single, report1 = scrubber.scrub_records(records, ["text"])
    multi, report2 = scrubber.scrub_records(records, ["text"], workers=2)
    assert single == multi and report1 == report2


def test_detect_matches_scrub_and_skips_letterless_text(scrubber: Scrubber) -> None:
    texts = ["Call 617-382-0142 now.", "617-382-0142", "4111 1111 1111 1111", "", "plain words only"]
    spans = scrubber.detect(texts)
    assert [[d.entity_type for d in s] for s in spans] == [
        ["PHONE_NUMBER"],
        ["PHONE_NUMBER"],
        ["CREDIT_CARD"],
        [],
        [],
    ]
    out, _ = scrubber.scrub_texts(texts)
    assert out == ["Call <PHONE> now.", "<PHONE>", "<CARD>", "", "plain words only"]

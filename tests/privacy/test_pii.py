"""The Presidio scrubber: no planted PII survives, clinical vocabulary does, reports hold no values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from common.errors import ConfigError, DataError
from embedded.synthdata import SITE_PROFILES, PlantedPII, generate_site_records
from privacy.pii import Scrubber, ScrubConfig, ScrubReport, get_scrubber
from privacy.pii_spans import merge_overlaps

TITLES = {"Dr", "Mr", "Mrs", "Ms"}
SURROGATE = re.compile(r"<PERSON_[0-9a-f]{6}>")
KEY_A, KEY_B = b"site-a-secret-0123456789", b"site-b-secret-9876543210"


def _present_as_word(token: str, text: str) -> bool:
    return re.search(rf"(?<![\w'\-]){re.escape(token)}(?![\w'\-])", text) is not None


def _leaks(planted: PlantedPII, text: str) -> bool:
    """True when the value, or (for names) any name token of >= 3 letters, is still in ``text``."""
    if planted.value in text:
        return True
    if planted.entity_type != "PERSON":
        return False
    tokens = [t for t in re.findall(r"[\w'\-]+", planted.value) if t not in TITLES and len(t) >= 3]
    return any(_present_as_word(t, text) for t in tokens)


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return get_scrubber(ScrubConfig())


Corpus = tuple[list[dict[str, str]], list[PlantedPII], list[dict[str, object]], ScrubReport]


@pytest.fixture(scope="module")
def corpus(scrubber: Scrubber) -> Corpus:
    """All three synthetic sites (3 x 240 records), scrubbed once."""
    records: list[dict[str, str]] = []
    planted: list[PlantedPII] = []
    for index in range(3):
        site_records, site_planted = generate_site_records(index, 240)
        records += site_records
        planted += site_planted
    scrubbed, report = scrubber.scrub_records(records, ["instruction", "response"])
    return records, planted, scrubbed, report


def test_no_planted_pii_survives(corpus: Corpus) -> None:
    _, planted, scrubbed, _ = corpus
    by_id = {str(r["id"]): f"{r['instruction']}\n{r['response']}" for r in scrubbed}
    leaks = Counter(p.entity_type for p in planted if _leaks(p, by_id[p.record_id]))
    totals = Counter(p.entity_type for p in planted)
    print("\nrecall per entity type:", {k: f"{1 - leaks[k] / n:.4f} (n={n})" for k, n in totals.items()})
    assert set(totals) >= {"PERSON", "MEDICAL_RECORD_NUMBER", "PHONE_NUMBER", "EMAIL_ADDRESS", "DATE_TIME"}
    assert not leaks, leaks


def test_domain_vocabulary_survives(corpus: Corpus) -> None:
    records, _, scrubbed, _ = corpus
    lost, seen = Counter[str](), Counter[str]()
    for before, after in zip(records, scrubbed, strict=True):
        profile = next(p for p in SITE_PROFILES if before["id"].startswith(p.name))
        for term in profile.diagnoses + profile.medications + profile.findings:
            for field in ("instruction", "response"):
                if term in before[field]:
                    seen[term] += 1
                    lost[term] += term not in str(after[field])
    assert sum(seen.values()) > 3000
    assert not +lost, +lost
    text = "\n".join(str(r["instruction"]) for r in scrubbed)
    handful = ("atrial fibrillation", "metoprolol", "apixaban", "pembrolizumab", "multiple myeloma",
               "ondansetron", "bronchiolitis", "albuterol", "otitis media", "ECG", "NSTEMI")  # fmt: skip
    for term in handful:
        assert term in text, term


def test_fields_order_and_other_keys_kept(corpus: Corpus) -> None:
    records, _, scrubbed, _ = corpus
    assert [r["id"] for r in scrubbed] == [r["id"] for r in records]
    assert all(set(r) == {"id", "instruction", "response"} for r in scrubbed)
    assert all(str(a["instruction"]).split(":")[0] == b["instruction"].split(":")[0]
               for a, b in zip(scrubbed, records, strict=True))  # fmt: skip


def test_report_has_counts_and_no_values(corpus: Corpus) -> None:
    _, planted, _, report = corpus
    assert report.records == 720 and report.records_touched == 720
    for kind in ("PERSON", "MEDICAL_RECORD_NUMBER", "PHONE_NUMBER", "EMAIL_ADDRESS", "DATE_TIME"):
        assert report.counts[kind] > 100, report.counts
    dumped = json.dumps(report.to_dict())
    assert set(report.to_dict()) == {"records", "records_touched", "counts"}
    values = {p.value for p in planted} | {
        t for p in planted if p.entity_type == "PERSON" for t in p.value.split() if t.strip(".") not in TITLES
    }
    assert not [v for v in values if v in dumped]


def test_pseudonyms_consistent_per_key_and_separated_across_keys(scrubber: Scrubber) -> None:
    texts = ["Patient: Maria Lopez, MRN: 4829103, seen by Dr. Chen.", "Dr. Chen called Maria Lopez back."]
    site_a = Scrubber(ScrubConfig(operator="pseudonym", pseudonym_key=KEY_A))
    a1, report = site_a.scrub_texts(texts)
    a2, _ = get_scrubber(ScrubConfig(operator="pseudonym", pseudonym_key=KEY_A)).scrub_texts(texts[::-1])
    b1, _ = Scrubber(ScrubConfig(operator="pseudonym", pseudonym_key=KEY_B)).scrub_texts(texts)
    assert "Lopez" not in " ".join(a1 + b1) and "Chen" not in " ".join(a1 + b1)
    patient_a, doctor_a = SURROGATE.findall(a1[0])
    assert SURROGATE.findall(a1[1]) == [doctor_a, patient_a]
    assert a2 == a1[::-1]
    patient_b, doctor_b = SURROGATE.findall(b1[0])
    assert {patient_a, doctor_a}.isdisjoint({patient_b, doctor_b})
    assert re.search(r"MRN: <MRN_[0-9a-f]{6}>", a1[0])
    assert report.counts["PERSON"] == 4 and report.records_touched == 2


def test_redact_and_placeholder_operators() -> None:
    text = ["Mrs. Nakamura (MRN 48-29103) lives at 12 Oak Street, Dover, MA 02134; call 617.382.0142."]
    redacted, _ = Scrubber(ScrubConfig(operator="redact")).scrub_texts(text)
    assert not re.search(r"Nakamura|29103|Oak|Dover|02134|0142", redacted[0])
    assert "<" not in redacted[0] and redacted[0].startswith("Mrs. ")
    placeholder, report = get_scrubber(ScrubConfig()).scrub_texts(text)
    assert placeholder[0] == ("Mrs. <PERSON> (MRN <MRN>) lives at <ADDRESS>; call <PHONE>.")
    assert report.counts == {"MEDICAL_RECORD_NUMBER": 1, "PERSON": 1, "PHONE_NUMBER": 1, "STREET_ADDRESS": 1}


def test_notes_outside_the_synthetic_templates(scrubber: Scrubber) -> None:
    texts = [
        "Seen with wife Ana Souza. Reach her at 415 662 0199. Chart number 33-1234567.",
        "A 92-year-old woman, DOB Feb. 3, 1932, email a.souza@example.org, SSN 214-58-3391.",
        "Dr. Ward reviewed the ECG; Keiko O'Brien-Sato's Holter showed atrial fibrillation.",
        "",
    ]
    out, report = scrubber.scrub_texts(texts)
    joined = " | ".join(out)
    for secret in ("Ana", "Souza", "662 0199", "1234567", "92", "1932", "a.souza", "3391", "Ward", "Keiko"):
        assert secret not in joined, (secret, joined)
    for term in ("ECG", "Holter", "atrial fibrillation", "year-old woman"):
        assert term in joined, (term, joined)
    assert out[3] == "" and report.records == 4 and report.records_touched == 3


def test_overlapping_spans_merge_without_fragments() -> None:
    from presidio_analyzer import RecognizerResult

    merged = merge_overlaps(
        [
            RecognizerResult("LOCATION", 10, 16, 0.85),
            RecognizerResult("STREET_ADDRESS", 0, 20, 0.8),
            RecognizerResult("PERSON", 18, 30, 0.9),
            RecognizerResult("ZIP_CODE", 40, 45, 0.6),
        ]
    )
    assert [(m.entity_type, m.start, m.end) for m in merged] == [
        ("STREET_ADDRESS", 0, 30),
        ("ZIP_CODE", 40, 45),
    ]


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError) as err:
        ScrubConfig(operator="pseudonym", score_threshold=1.5)
    assert err.value.source == "pii" and len(err.value.problems) == 2
    assert KEY_A.decode() not in repr(ScrubConfig(operator="pseudonym", pseudonym_key=KEY_A))
    assert "pseudonym-key" in str(err.value) and "score-threshold" in str(err.value)
    with pytest.raises(ConfigError, match="operator: must be one of placeholder, redact, pseudonym"):
        ScrubConfig(operator="mask")
    with pytest.raises(ConfigError) as err:
        Scrubber(ScrubConfig(spacy_model="en_core_web_nonexistent"))
    assert "spacy-model" in str(err.value) and "pip install en-core-web-nonexistent" in str(err.value)


def test_non_text_field_is_a_data_error(scrubber: Scrubber) -> None:
    records: list[dict[str, object]] = [
        {"id": "a", "instruction": "fine", "response": None},
        {"id": "b", "instruction": ["x"]},
    ]
    with pytest.raises(DataError) as err:
        scrubber.scrub_records(records, ["instruction", "response"])
    assert err.value.line == 2 and "'instruction'" in err.value.problem
    out, report = scrubber.scrub_records(records[:1], ["instruction", "response"])
    assert out == records[:1] and report.records_touched == 0


def test_privacy_package_does_not_import_flower() -> None:
    code = "import sys, privacy.pii; sys.exit(any(m.split('.')[0] == 'flwr' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""The embedded synthetic corpus: deterministic, non-IID, PII planted in every record."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from embedded.synthdata import (
    GENERIC_ANSWERS,
    SITE_PROFILES,
    PlantedPII,
    generate_site_documents,
    generate_site_pairs,
    generate_site_records,
    site_names,
    write_synthetic_sites,
)

NOTE_PREFIX = re.compile(r"^[^:]+: ")


def _clinical_words(records: list[dict[str, str]], planted: list[PlantedPII]) -> set[str]:
    """Lower-case words of the records once the planted PII is removed."""
    text = " ".join(r["instruction"] + " " + r["response"] for r in records)
    for p in sorted(planted, key=lambda p: -len(p.value)):
        text = text.replace(p.value, " ")
    return set(re.findall(r"\b[a-z][a-z\-]{3,}\b", text))


def test_site_names_cycle_with_suffix() -> None:
    assert site_names(3) == ["northside-cardiology", "lakeview-oncology", "riverside-pediatrics"]
    names = site_names(7)
    assert names[3:] == [
        "northside-cardiology-2",
        "lakeview-oncology-2",
        "riverside-pediatrics-2",
        "northside-cardiology-3",
    ]
    assert len(set(names)) == 7
    assert site_names(0) == []


def test_deterministic_given_seed() -> None:
    a = generate_site_records(1, 50, seed=7)
    assert a == generate_site_records(1, 50, seed=7)
    assert a[0] != generate_site_records(1, 50, seed=8)[0]
    assert generate_site_records(0, 50)[0] != generate_site_records(3, 50)[0]  # same profile, other site


def test_record_shape() -> None:
    records, _ = generate_site_records(2, 120)
    assert [r["id"] for r in records[:2]] == ["riverside-pediatrics-00000", "riverside-pediatrics-00001"]
    for r in records:
        assert set(r) == {"id", "instruction", "response"}
        note = NOTE_PREFIX.sub("", r["instruction"])
        assert 40 <= len(note.split()) <= 90, r["instruction"]
        assert len(r["response"].split()) >= 8


def test_sites_are_non_iid() -> None:
    generated = [generate_site_records(i, 240) for i in range(len(SITE_PROFILES))]
    per_site = [records for records, _ in generated]
    vocab = [_clinical_words(records, planted) for records, planted in generated]
    for i, profile in enumerate(SITE_PROFILES):
        text = " ".join(r["instruction"] for r in per_site[i])
        assert sum(dx in text for dx in profile.diagnoses) >= len(profile.diagnoses) - 1
        for j, other in enumerate(per_site):
            if j != i:
                other_text = " ".join(r["instruction"] for r in other)
                assert not any(dx in other_text for dx in profile.diagnoses)
        for j in range(i + 1, len(vocab)):
            jaccard = len(vocab[i] & vocab[j]) / len(vocab[i] | vocab[j])
            assert jaccard < 0.35, (profile.name, SITE_PROFILES[j].name, jaccard)


def test_pii_planted_in_every_record() -> None:
    for index in range(len(SITE_PROFILES)):
        records, planted = generate_site_records(index, 240)
        by_record: dict[str, set[str]] = {}
        for p in planted:
            assert isinstance(p, PlantedPII)
            record = next(r for r in records if r["id"] == p.record_id)
            assert p.value in record["instruction"] + record["response"]
            by_record.setdefault(p.record_id, set()).add(p.entity_type)
        assert set(by_record) == {r["id"] for r in records}
        for types in by_record.values():
            assert {"PERSON", "MEDICAL_RECORD_NUMBER", "DATE_TIME"} <= types
        kinds = Counter(p.entity_type for p in planted)
        for kind in ("PHONE_NUMBER", "EMAIL_ADDRESS", "STREET_ADDRESS", "ZIP_CODE"):
            assert kinds[kind] > 60, kinds


def test_pii_formats_vary() -> None:
    _, planted = generate_site_records(0, 240)
    phones = [p.value for p in planted if p.entity_type == "PHONE_NUMBER"]
    assert any(v.startswith("(") for v in phones) and any(v.startswith("+1 ") for v in phones)
    assert any("." in v for v in phones)
    mrns = [p.value for p in planted if p.entity_type == "MEDICAL_RECORD_NUMBER"]
    assert any("-" in v for v in mrns) and any(v.isdigit() for v in mrns)
    dates = [p.value for p in planted if p.entity_type == "DATE_TIME"]
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d", d) for d in dates)
    assert any(re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", d) for d in dates)
    assert any(re.fullmatch(r"\d{1,2}/\d{1,2}/\d\d", d) for d in dates)
    people = [p.value for p in planted if p.entity_type == "PERSON"]
    assert any(v.startswith("Dr. ") for v in people) and any(v.startswith("Mrs. ") for v in people)


def test_write_synthetic_sites(tmp_path: Path) -> None:
    start = time.perf_counter()
    paths = write_synthetic_sites(tmp_path / "sites", sites=3, records_per_site=240, seed=0, kinds=("sft",))
    assert time.perf_counter() - start < 1.0
    assert [p.name for p in paths] == [f"{n}.jsonl" for n in site_names(3)]
    assert sorted(f.name for f in (tmp_path / "sites").iterdir()) == sorted(
        [f"{n}.jsonl" for n in site_names(3)] + [f"{n}.pii.json" for n in site_names(3)]
    )
    for index, path in enumerate(paths):
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        expected, planted = generate_site_records(index, 240, seed=0)
        assert records == expected
        key = json.loads(path.with_name(path.stem + ".pii.json").read_text(encoding="utf-8"))
        assert key == [
            {"record_id": p.record_id, "entity_type": p.entity_type, "value": p.value} for p in planted
        ]
    again = write_synthetic_sites(tmp_path / "sites", sites=3, records_per_site=240, seed=0, kinds=("sft",))
    assert again == paths and len(list((tmp_path / "sites").iterdir())) == 6


def test_raw_documents_for_continued_pretraining_vary_in_length_and_carry_pii(tmp_path: Path) -> None:
    paths = write_synthetic_sites(tmp_path, sites=2, records_per_site=60, seed=0)
    cpt = [p for p in paths if p.parent.name == "cpt"]
    assert [p.name for p in cpt] == [f"{n}.jsonl" for n in site_names(2)]
    docs = [json.loads(line) for line in cpt[0].read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 30 and all(set(d) == {"id", "text"} for d in docs)
    lengths = sorted(len(d["text"]) for d in docs)
    assert lengths[-1] > 4 * lengths[0]  # one-visit notes and long courses
    key = json.loads((cpt[0].parent / f"{cpt[0].stem}.pii.json").read_text(encoding="utf-8"))
    texts = {d["id"]: d["text"] for d in docs}
    assert key and all(k["value"] in texts[k["record_id"]] for k in key)
    assert generate_site_documents(0, 30, seed=0)[0] == docs  # deterministic
    with pytest.raises(ValueError, match="unknown kinds"):
        write_synthetic_sites(tmp_path, kinds=("rlhf",))


def test_preference_pairs_prefer_the_house_style_to_generic_or_wrong_answers(tmp_path: Path) -> None:
    pairs, planted = generate_site_pairs(0, 40, seed=0)
    assert all(set(p) == {"id", "prompt", "chosen", "rejected"} for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    generic = [p for p in pairs if p["rejected"] in GENERIC_ANSWERS]
    assert 0 < len(generic) < len(pairs)  # the rest: the house style with the wrong facts
    texts = {p["id"]: " ".join((p["prompt"], p["chosen"], p["rejected"])) for p in pairs}
    assert planted and all(k.value in texts[k.record_id] for k in planted)


def test_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError):
        generate_site_records(0, -1)
    with pytest.raises(ValueError):
        site_names(-1)


def test_labelled_pii_set_spans_and_checksums() -> None:
    from embedded.synthpii import DOMAINS, generate_labelled_texts

    texts = generate_labelled_texts(40, seed=2)
    assert texts == generate_labelled_texts(40, seed=2) and len(texts) == 3 * 40
    assert {t.domain for t in texts} == set(DOMAINS)
    labels = Counter(s.label for t in texts for s in t.pii)
    assert len(labels) >= 17 and min(labels.values()) >= 5, labels
    for t in texts:
        for span in t.pii + t.terms:
            value = t.value(span)
            assert value and value == value.strip(), (span, t.text)
    for t in texts:
        for span in t.pii:
            digits = [int(c) for c in t.value(span) if c.isdigit()]
            if span.label == "CREDIT_CARD":  # Luhn
                total = sum(
                    d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(digits[::-1])
                )
                assert total % 10 == 0, t.value(span)
    formats = {t.value(s) for t in texts for s in t.pii if s.label == "DATE_TIME"}
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d", d) for d in formats)
    assert any(re.fullmatch(r"\d\d-[A-Z][a-z]{2}-\d{4}", d) for d in formats)

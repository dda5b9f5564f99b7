"""Embedded synthetic clinical corpus: non-IID sites whose notes carry fake PII.

Each site has its own specialty, vocabulary, note templates and task mix, so a
federation over the sites is non-IID, while the templated structure is simple
enough that a tiny model's loss drops visibly when fine-tuned on it.  Every
record carries planted, entirely made-up identifiers (names, MRNs, phone
numbers, emails, dates, street addresses, ZIP codes); :class:`PlantedPII` lists
them as the answer key for scrubber tests.  Nothing here is real patient data.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common.fsutil import atomic_write_text
from embedded.synthvocab import (
    AREA_CODES,
    CITIES,
    EMAIL_DOMAINS,
    FEMALE_FIRST,
    LAST_NAMES,
    MALE_FIRST,
    MONTHS,
    SITE_PROFILES,
    STATES,
    STREET_NAMES,
    STREET_SUFFIXES,
    SiteProfile,
    items,
)

__all__ = [
    "KINDS", "SITE_PROFILES", "PlantedPII", "SiteProfile", "generate_site_documents",
    "generate_site_pairs", "generate_site_records", "site_names", "write_synthetic_sites",
]  # fmt: skip

KINDS = ("sft", "cpt", "dpo")
"""What ``write_synthetic_sites`` writes: instruction records (sft), raw documents (cpt, in ``cpt/``)
and preference pairs (dpo, in ``dpo/``)."""

GENERIC_ANSWERS = (
    "Patient seen today. Plan discussed. Follow up as needed.",
    "No significant findings. Continue current management.",
    "See note above for details.",
    "Stable. Will reassess at the next visit.",
)
"""What a ``rejected`` answer says when it is generic: true of every note, useful for none."""


@dataclass(frozen=True)
class PlantedPII:
    """One fake identifier planted in a record (answer key for scrubber tests)."""

    record_id: str
    entity_type: str
    value: str


def site_names(n: int) -> list[str]:
    """Return the first ``n`` site names, cycling with ``-2``, ``-3``... suffixes.

    Parameters
    ----------
    n
        Number of sites (``>= 0``).

    Returns
    -------
    list[str]
        E.g. ``["northside-cardiology", ..., "northside-cardiology-2"]``.
    """
    if n < 0:
        raise ValueError(f"number of sites must be >= 0, got {n}")
    k = len(SITE_PROFILES)
    return [SITE_PROFILES[i % k].name + ("" if i < k else f"-{i // k + 1}") for i in range(n)]


_DATE_STYLES = items(
    "{m:02d}/{d:02d}/{y}; {y}-{m:02d}-{d:02d}; {month} {d}, {y}; {d} {mon} {y}; {m}/{d}/{yy:02d}"
)
_PHONE_STYLES = items(
    "({a}) {e}-{n:04d}; {a}-{e}-{n:04d}; {a}.{e}.{n:04d}; +1 {a} {e} {n:04d}; 1-{a}-{e}-{n:04d}"
)
_MRN_STYLES = ("MRN: {v}", "MRN {v}", "MRN #{v}", "medical record number {v}")


def _fmt_date(day: dt.date, style: int) -> str:
    """Format ``day`` in one of the planted date styles (index into ``_DATE_STYLES``)."""
    month = MONTHS[day.month - 1]
    return _DATE_STYLES[style].format(
        m=day.month, d=day.day, y=day.year, yy=day.year % 100, month=month, mon=month[:3]
    )


def _rand_date(rng: random.Random, start: dt.date, end: dt.date) -> dt.date:
    return start + dt.timedelta(days=rng.randrange((end - start).days + 1))


def _phone(rng: random.Random) -> str:
    """A US number with a real area code and a valid-looking exchange (no 555, no N11)."""
    exch = rng.choice([e for e in range(201, 990) if e % 100 != 11 and e != 555])
    style = rng.choice(_PHONE_STYLES)
    return style.format(a=rng.choice(AREA_CODES), e=exch, n=rng.randint(0, 9999))


def _mrn(rng: random.Random) -> tuple[str, str]:
    """Return (text as written in the note, planted value)."""
    digits = f"{rng.randint(1_000_000, 9_999_999)}"
    style = rng.randrange(len(_MRN_STYLES))
    value = f"{digits[:2]}-{digits[2:]}" if style == 1 else digits
    return _MRN_STYLES[style].format(v=value), value


def _sex(profile: SiteProfile, female: bool) -> str:
    if profile.pediatric:
        return "girl" if female else "boy"
    return "female" if female else "male"


def _slots(profile: SiteProfile, rng: random.Random, plant: list[tuple[str, str]]) -> dict[str, str]:
    """Draw every template slot for one record; append planted PII to ``plant``."""
    female = rng.random() < 0.5
    first = rng.choice(FEMALE_FIRST if female else MALE_FIRST)
    last, doc_last = rng.sample(LAST_NAMES, 2)
    doc_first = rng.choice(FEMALE_FIRST + MALE_FIRST)
    visit = _rand_date(rng, dt.date(2019, 1, 1), dt.date(2025, 6, 30))
    if profile.pediatric:
        dob = _rand_date(rng, visit - dt.timedelta(days=12 * 365), visit - dt.timedelta(60))
        months = (visit - dob).days // 30
        age = f"{months}-month-old" if months < 24 else f"{months // 12}-year-old"
    else:
        dob = _rand_date(rng, dt.date(1935, 1, 1), dt.date(2000, 12, 31))
        age = f"{(visit - dob).days // 365}-year-old"
    mrn_text, mrn_value = _mrn(rng)
    date_style = rng.randrange(5)
    visit_s, dob_s = _fmt_date(visit, date_style), _fmt_date(dob, rng.randrange(5))
    follow_s = _fmt_date(visit + dt.timedelta(days=7 * rng.randint(1, 6)), date_style)
    doctor = f"Dr. {doc_first} {doc_last}" if rng.random() < 0.3 else f"Dr. {doc_last}"
    title = "Ms." if female and rng.random() < 0.5 else ("Mrs." if female else "Mr.")
    parent_first = rng.choice(FEMALE_FIRST + MALE_FIRST)
    parent_title = "Mrs." if parent_first in FEMALE_FIRST else "Mr."
    dx, dx2 = rng.sample(profile.diagnoses, 2)
    med, med2 = rng.sample(profile.medications, 2)
    slots = {"patient": f"{first} {last}", "first": first, "mrn": mrn_text, "dob": dob_s, "age": age}
    slots.update(date=visit_s, follow=follow_s, doctor=doctor, titled=f"{title} {last}")
    slots.update(sex=_sex(profile, female), pron="She" if female else "He", dx=dx, dx2=dx2)
    slots.update(parent=f"{parent_first} {last}", parent_titled=f"{parent_title} {last}")
    slots.update(parent_rel="mother" if parent_title == "Mrs." else "father", med=med, med2=med2)
    slots.update(finding=rng.choice(profile.findings), cycle=str(rng.randint(1, 8)))
    plant += [("PERSON", slots["patient"]), ("MEDICAL_RECORD_NUMBER", mrn_value)]
    plant += [("DATE_TIME", dob_s), ("DATE_TIME", visit_s), ("DATE_TIME", follow_s)]
    plant += [("PERSON", doctor), ("PERSON", slots["titled"])]
    if profile.pediatric:
        plant += [("PERSON", slots["parent"]), ("PERSON", slots["parent_titled"])]
    extras: list[str] = []
    for kind in rng.sample(("address", "phone", "email"), rng.randint(1, 3)):
        if kind == "address":
            street = f"{rng.randint(2, 9899)} {rng.choice(STREET_NAMES)} {rng.choice(STREET_SUFFIXES)}"
            city, state = rng.choice(CITIES), rng.choice(STATES)
            zip_code = f"{rng.randint(10001, 99950):05d}"
            extras.append(f"Home address {street}, {city}, {state} {zip_code}.")
            plant += [("STREET_ADDRESS", street), ("LOCATION", city)]
            plant += [("ZIP_CODE", zip_code)]
        elif kind == "phone":
            phone = _phone(rng)
            extras.append(f"Best callback number {phone}.")
            plant.append(("PHONE_NUMBER", phone))
        else:
            user = rng.choice((f"{first}.{last}", f"{first[0]}{last}{rng.randint(1, 99)}", f"{last}.{first}"))
            email = f"{user.lower().replace(chr(39), '')}@{rng.choice(EMAIL_DOMAINS)}"
            extras.append(f"Prefers email at {email}.")
            plant.append(("EMAIL_ADDRESS", email))
    slots["extras"] = " ".join(extras)
    return slots


def generate_site_records(
    site_index: int, n_records: int, *, seed: int = 0
) -> tuple[list[dict[str, str]], list[PlantedPII]]:
    """Generate one site's records and the PII planted in them.

    Parameters
    ----------
    site_index
        Index into :func:`site_names`; the profile is ``SITE_PROFILES[i % len]``.
    n_records
        Number of records (``>= 0``).
    seed
        Base seed; the same ``(site_index, n_records, seed)`` gives identical output.

    Returns
    -------
    tuple[list[dict[str, str]], list[PlantedPII]]
        Records ``{"id", "instruction", "response"}`` and the planted values
        (deduplicated per record, in order of appearance in the templates).
    """

    def make(profile: SiteProfile, rng: random.Random, slots: dict[str, str]) -> dict[str, str]:
        note = rng.choice(profile.notes).format(**slots).strip()
        prefix, response = rng.choice(profile.tasks)
        return {"instruction": f"{prefix}: {note}", "response": response.format(**slots)}

    return _generate(site_index, n_records, f"fedtune-synth:{seed}:{site_index}", "{name}-{i:05d}", make)


Make = Callable[[SiteProfile, random.Random, dict[str, str]], dict[str, str]]


def _generate(
    site_index: int, n: int, rng_seed: str, id_format: str, make: Make
) -> tuple[list[dict[str, str]], list[PlantedPII]]:
    """``n`` records of one site from ``make`` (given fresh slots), each with its planted identifiers."""
    if site_index < 0 or n < 0:
        raise ValueError(f"site_index and the number of records must be >= 0, got {site_index}, {n}")
    profile = SITE_PROFILES[site_index % len(SITE_PROFILES)]
    name = site_names(site_index + 1)[site_index]
    rng = random.Random(rng_seed)
    records: list[dict[str, str]] = []
    planted: list[PlantedPII] = []
    for i in range(n):
        record_id = id_format.format(name=name, i=i)
        plant: list[tuple[str, str]] = []
        slots = _slots(profile, rng, plant)
        record = make(profile, rng, slots)
        records.append({"id": record_id, **record})
        text = "\n".join(record.values())
        seen: set[tuple[str, str]] = set()
        for entity_type, value in plant:
            if (entity_type, value) not in seen and value in text:
                seen.add((entity_type, value))
                planted.append(PlantedPII(record_id, entity_type, value))
    return records, planted


def generate_site_documents(
    site_index: int, n_documents: int, *, seed: int = 0
) -> tuple[list[dict[str, str]], list[PlantedPII]]:
    """Raw clinical documents of one site (``{"id", "text"}``) for continued pretraining.

    Each document is one patient's course: 1-6 of the site's notes about the same patient, with a
    visit header each, so their lengths differ widely (about 160-1400 tokens of the embedded
    tokenizer) and most are chunked at the default ``max-seq-len`` of 256. The same identifiers are planted.
    """

    def make(profile: SiteProfile, rng: random.Random, slots: dict[str, str]) -> dict[str, str]:
        visits = rng.choice((1, 1, 2, 3, 4, 6))
        notes = [
            f"Visit {v + 1} of {visits}.\n{rng.choice(profile.notes).format(**slots).strip()}"
            for v in range(visits)
        ]
        return {"text": f"{profile.specialty.title()} record.\n\n" + "\n\n".join(notes)}

    seed_text = f"fedtune-synth-cpt:{seed}:{site_index}"
    return _generate(site_index, n_documents, seed_text, "{name}-doc-{i:05d}", make)


def generate_site_pairs(
    site_index: int, n_pairs: int, *, seed: int = 0
) -> tuple[list[dict[str, str]], list[PlantedPII]]:
    """Preference pairs of one site (``{"id", "prompt", "chosen", "rejected"}``) for DPO.

    ``chosen`` is the site's own house-style answer to the note; ``rejected`` is either generic
    (:data:`GENERIC_ANSWERS`) or the house style with the wrong facts (another diagnosis and drug).
    The notes carry the same planted identifiers as the instruction records.
    """

    def make(profile: SiteProfile, rng: random.Random, slots: dict[str, str]) -> dict[str, str]:
        note = rng.choice(profile.notes).format(**slots).strip()
        prefix, answer = rng.choice(profile.tasks)
        if rng.random() < 0.5:
            rejected = rng.choice(GENERIC_ANSWERS)
        else:
            wrong = dict(slots, dx=slots["dx2"], dx2=slots["dx"], med=slots["med2"], med2=slots["med"])
            rejected = answer.format(**wrong)
        return {"prompt": f"{prefix}: {note}", "chosen": answer.format(**slots), "rejected": rejected}

    return _generate(
        site_index, n_pairs, f"fedtune-synth-dpo:{seed}:{site_index}", "{name}-pair-{i:05d}", make
    )


def write_synthetic_sites(
    out_dir: Path,
    *,
    sites: int = 3,
    records_per_site: int = 240,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
) -> list[Path]:
    """Write ``<site>.jsonl`` and its ``<site>.pii.json`` answer key per site (and ``cpt/<site>.*``).

    Parameters
    ----------
    out_dir
        Directory to write into (created if missing).
    sites
        Number of sites (names from :func:`site_names`).
    records_per_site
        Records per site.
    seed
        Base seed (see :func:`generate_site_records`).
    kinds
        ``sft``: instruction records in ``out_dir``; ``cpt``: raw documents (half as many) in
        ``out_dir/cpt/``; ``dpo``: preference pairs in ``out_dir/dpo/``; each with its answer key.

    Returns
    -------
    list[Path]
        The JSONL paths, one per site and kind, in site order.  The ``.pii.json`` files
        are for tests only and must never be fed to training.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}: use {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for index, name in enumerate(site_names(sites)):
        for kind in kinds:
            if kind == "sft":
                records, planted = generate_site_records(index, records_per_site, seed=seed)
                folder = out_dir
            elif kind == "cpt":
                records, planted = generate_site_documents(index, max(1, records_per_site // 2), seed=seed)
                folder = out_dir / kind
            else:
                records, planted = generate_site_pairs(index, records_per_site, seed=seed)
                folder = out_dir / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            key = json.dumps([asdict(p) for p in planted], ensure_ascii=False, indent=1)
            atomic_write_text(folder / f"{name}.pii.json", key + "\n")
            paths.append(path)
    return paths

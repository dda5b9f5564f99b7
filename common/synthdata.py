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
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class SiteProfile:
    """What makes one synthetic site differ from the others.

    Attributes
    ----------
    name
        Site name, also the file stem and record-id prefix.
    specialty
        Clinical specialty, e.g. ``"cardiology"``.
    diagnoses, medications, findings
        Site vocabulary slotted into the templates.
    notes
        Note templates (``str.format`` slots, see ``_slots``).
    tasks
        ``(instruction prefix, response template)`` pairs.
    pediatric
        Patients are children (a parent is named; ages in years or months).
    """

    name: str
    specialty: str
    diagnoses: tuple[str, ...]
    medications: tuple[str, ...]
    findings: tuple[str, ...]
    notes: tuple[str, ...]
    tasks: tuple[tuple[str, str], ...]
    pediatric: bool = False


@dataclass(frozen=True)
class PlantedPII:
    """One fake identifier planted in a record (answer key for scrubber tests)."""

    record_id: str
    entity_type: str
    value: str


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _items(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(";"))


# Fake-identifier vocabularies.  Names avoid common English and clinical words so
# that a leak check can look for each name token as a word.
FEMALE_FIRST = _words(
    "Maria Linda Patricia Jennifer Elizabeth Barbara Susan Jessica Sarah Karen Nancy Lisa Margaret Sandra "
    "Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Stephanie Rebecca Sharon Laura "
    "Cynthia Kathleen Angela Shirley Anna Brenda Pamela Nicole Samantha Katherine Christine Rachel Carolyn "
    "Janet Heather Diane Julie Joyce Victoria Christina Lauren Evelyn Olivia Judith Megan Cheryl Martha "
    "Andrea Priya Aisha Mei Fatima Sofia Camila Yuki Ingrid Leila Nadia Amara"
)
MALE_FIRST = _words(
    "James Robert John Michael David William Richard Joseph Thomas Charles Christopher Daniel Matthew "
    "Anthony Donald Steven Andrew Joshua Kenneth Kevin Brian George Timothy Ronald Edward Jason Jeffrey "
    "Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Brandon Benjamin Samuel Gregory Alexander "
    "Raymond Dennis Jerry Tyler Aaron Jose Henry Douglas Peter Nathan Zachary Kyle Walter Ethan Carlos "
    "Rahul Omar Hiroshi Dmitri Kwame Luis Arjun Tariq Mateo Lars Wei"
)
LAST_NAMES = _words(
    "Smith Johnson Williams Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez Wilson "
    "Anderson Taylor Moore Jackson Thompson Harris Sanchez Clark Ramirez Lewis Robinson Walker Allen Wright "
    "Torres Nguyen Flores Adams Nelson Mitchell Roberts Carter Phillips Evans Turner Parker Collins Edwards "
    "Stewart Morris Murphy Rivera Rogers Morgan Peterson Cooper Bailey Howard Ramos Kim Richardson Watson "
    "Brooks Chavez Bennett Mendoza Ruiz Hughes Alvarez Castillo Sanders Patel Myers Ross Foster Jimenez "
    "Chen Wang Zhang Liu Singh Shah Khan Okafor Adeyemi Mensah Kowalski Novak Schmidt Rossi Bianchi Dubois "
    "Moreau Tanaka Suzuki Yamamoto Choi Kaur Haddad Nasser Cohen Petrov Ivanova Larsen Hansen Johansson "
    "Lindqvist O'Brien Sullivan Murray Fischer Weber Becker Hoffman Kruger Santos Pereira Oliveira Ferreira "
    "Gomez Diaz Reyes Morales Ortiz Gutierrez Vargas Castro Romero Herrera Medina Aguilar Delgado Fernandez "
    "Mehta Reddy Iyer Nair Gupta Sharma Verma Joshi Abernathy Whitfield Kessler Lindgren"
)
STREET_NAMES = _words(
    "Maple Oak Cedar Elm Pine Birch Willow Chestnut Walnut Spruce Juniper Magnolia Sycamore Hawthorn Laurel "
    "Aspen Poplar Hickory Linden Cypress Orchard Sunset"
)
STREET_SUFFIXES = _words("Street Avenue Road Lane Drive Court Boulevard Way Place Terrace")
CITIES = _words(
    "Fairview Georgetown Greenville Ashland Dover Oxford Bristol Burlington Kingston Newport Arlington "
    "Auburn Lexington Oakdale Brookfield Westfield Centerville"
)
STATES = _words("OH PA NY MA IL CA TX WA NC GA MI WI MN CO AZ VA NJ")
AREA_CODES = (212, 312, 415, 617, 206, 303, 404, 503, 614, 713, 804, 919, 973)
EMAIL_DOMAINS = ("example.com", "example.org", "mailbox.net", "homemail.com")

SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="northside-cardiology",
        specialty="cardiology",
        diagnoses=_items(
            "atrial fibrillation with rapid ventricular response; heart failure with reduced ejection "
            "fraction; stable angina; NSTEMI; severe aortic stenosis; supraventricular tachycardia; "
            "hypertensive urgency; hyperlipidemia"
        ),
        medications=_items(
            "metoprolol succinate 50 mg daily; apixaban 5 mg twice daily; atorvastatin 80 mg nightly; "
            "lisinopril 10 mg daily; furosemide 40 mg daily; clopidogrel 75 mg daily; amiodarone 200 mg "
            "daily; spironolactone 25 mg daily"
        ),
        findings=_items(
            "ejection fraction 35 percent on echocardiogram; irregularly irregular rhythm on ECG; troponin "
            "peak 2.1; BNP 880; bilateral leg edema; ST depression in the lateral leads; mean aortic "
            "gradient 44 mmHg; LDL 162"
        ),
        notes=(
            "Cardiology discharge note. Patient: {patient}, {mrn}, DOB {dob}. Age {age} {sex}, admitted on "
            "{date} with {dx}. Workup showed {finding}. {titled} was started on {med} and continued on "
            "{med2}. Seen by {doctor}. Follow-up in cardiology clinic on {follow}. {extras}",
            "Cardiology clinic visit {date}. {patient} ({mrn}, DOB {dob}), {age} {sex}, followed for {dx}. "
            "{pron} reports exertional dyspnea. Testing: {finding}. Plan: {med}, add {med2}, recheck on "
            "{follow} with {doctor}. {extras}",
            "Telemetry event note {date}. {titled} ({patient}, {mrn}, DOB {dob}), {age} {sex}, developed "
            "{dx}. {finding}. {doctor} ordered {med} and held {med2}. Outpatient follow-up {follow}. "
            "{extras}",
        ),
        tasks=(
            (
                "Summarize the cardiology note",
                "{patient} ({age} {sex}) was treated for {dx} on {date}; medications {med} and {med2}; "
                "follow-up with {doctor} on {follow}.",
            ),
            (
                "List the cardiac medications in this note",
                "Medications: {med}; {med2}. Indication: {dx}. Key finding: {finding}.",
            ),
            (
                "Write a one-line cardiology handoff",
                "Cardiology handoff: {titled}, {dx}, {finding}, on {med}; {doctor} to review on {follow}.",
            ),
        ),
    ),
    SiteProfile(
        name="lakeview-oncology",
        specialty="oncology",
        diagnoses=_items(
            "stage II breast cancer; non-small cell lung cancer; diffuse large B-cell lymphoma; metastatic "
            "colon adenocarcinoma; multiple myeloma; pancreatic adenocarcinoma; ovarian carcinoma"
        ),
        medications=_items(
            "carboplatin and paclitaxel; pembrolizumab 200 mg every 3 weeks; FOLFOX; rituximab with CHOP; "
            "lenalidomide 25 mg; capecitabine 1000 mg/m2; ondansetron 8 mg as needed; dexamethasone 4 mg; "
            "filgrastim; tamoxifen 20 mg daily"
        ),
        findings=_items(
            "absolute neutrophil count 0.8; grade 2 peripheral neuropathy; partial response on CT; "
            "hemoglobin 8.9; platelets 64; CA 19-9 rising; ECOG performance status 1; stable disease on PET"
        ),
        notes=(
            "Oncology infusion visit {date}. {patient}, {mrn}, DOB {dob}, {age} {sex} with {dx}. Cycle "
            "{cycle} given today: {med}, with {med2} as supportive care. Labs: {finding}. {titled} "
            "tolerated treatment. Next cycle {follow} with {doctor}. {extras}",
            "Tumor board summary. Case: {patient} ({mrn}), DOB {dob}, {age} {sex} with {dx}. Restaging on "
            "{date} showed {finding}. Recommendation from {doctor}: continue {med}; supportive care with "
            "{med2}. Review again {follow}. {extras}",
            "Oncology phone triage {date}. {titled} ({patient}, {mrn}, DOB {dob}) on {med} for {dx} called "
            "with fatigue. Reported {finding}. Advised {med2}; {doctor} notified; clinic visit {follow}. "
            "{extras}",
        ),
        tasks=(
            (
                "Summarize the oncology note",
                "{patient}, {age} {sex} with {dx}: {finding}; treatment {med}, supportive {med2}; next "
                "visit {follow} with {doctor}.",
            ),
            (
                "Extract the treatment plan",
                "Regimen: {med}. Supportive care: {med2}. Diagnosis: {dx}. Next review {follow}.",
            ),
            (
                "Draft a patient-friendly update",
                "Dear {titled}, your care team ({doctor}) reviewed your results from {date}. We will "
                "continue {med} and see you on {follow}.",
            ),
        ),
    ),
    SiteProfile(
        name="riverside-pediatrics",
        specialty="pediatrics",
        diagnoses=_items(
            "acute otitis media; bronchiolitis; asthma exacerbation; croup; streptococcal pharyngitis; "
            "gastroenteritis with mild dehydration; atopic dermatitis; hand, foot and mouth disease"
        ),
        medications=_items(
            "amoxicillin 90 mg/kg/day for 10 days; albuterol inhaler 2 puffs every 4 hours; dexamethasone "
            "0.6 mg/kg once; oral rehydration solution; cetirizine 5 mg daily; hydrocortisone 1% cream; "
            "ibuprofen 10 mg/kg as needed; acetaminophen 15 mg/kg as needed"
        ),
        findings=_items(
            "bulging tympanic membrane; expiratory wheezing; barky cough with stridor at rest; temperature "
            "38.9 C; weight at the 60th percentile; tonsillar exudate; dry mucous membranes; vesicles on "
            "palms and soles"
        ),
        notes=(
            "Pediatric sick visit {date}. {patient}, {mrn}, DOB {dob}, {age} {sex}, brought in by "
            "{parent_rel} {parent} for {dx}. Exam: {finding}. Prescribed {med}; {med2}. {doctor} counseled "
            "{parent_titled} on warning signs. Recheck {follow}. {extras}",
            "Well-child check {date} for {patient} ({mrn}), DOB {dob}, {age} {sex}. Growth normal; "
            "{finding}. Concern raised by {parent_titled}: {dx}. Plan from {doctor}: {med}, then {med2}. "
            "Next visit {follow}. {extras}",
            "Pediatric phone note {date}. {parent_titled} called about {first} ({patient}, {mrn}, DOB "
            "{dob}), {age} {sex}, with {dx}. Symptoms: {finding}. {doctor} advised {med} and {med2}; seen "
            "in clinic {follow}. {extras}",
        ),
        tasks=(
            (
                "Summarize the pediatric note",
                "{patient}, {age} {sex}, seen {date} for {dx}; {finding}; plan {med} and {med2}; follow-up "
                "{follow} with {doctor}.",
            ),
            (
                "Write discharge instructions for the parent",
                "For {parent_titled}: give {med} for {dx}; use {med2} if needed; return on {follow} or call "
                "{doctor} sooner.",
            ),
            ("List the problems and plan", "Problem: {dx}. Finding: {finding}. Plan: {med}; {med2}."),
        ),
        pediatric=True,
    ),
)

_MONTHS = _words("January February March April May June July August September October November December")


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


_DATE_STYLES = _items(
    "{m:02d}/{d:02d}/{y}; {y}-{m:02d}-{d:02d}; {month} {d}, {y}; {d} {mon} {y}; {m}/{d}/{yy:02d}"
)
_PHONE_STYLES = _items(
    "({a}) {e}-{n:04d}; {a}-{e}-{n:04d}; {a}.{e}.{n:04d}; +1 {a} {e} {n:04d}; 1-{a}-{e}-{n:04d}"
)
_MRN_STYLES = ("MRN: {v}", "MRN {v}", "MRN #{v}", "medical record number {v}")


def _fmt_date(day: dt.date, style: int) -> str:
    """Format ``day`` in one of the planted date styles (index into ``_DATE_STYLES``)."""
    month = _MONTHS[day.month - 1]
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
    if site_index < 0 or n_records < 0:
        raise ValueError(f"site_index and n_records must be >= 0, got {site_index}, {n_records}")
    profile = SITE_PROFILES[site_index % len(SITE_PROFILES)]
    name = site_names(site_index + 1)[site_index]
    rng = random.Random(f"fedtune-synth:{seed}:{site_index}")
    records: list[dict[str, str]] = []
    planted: list[PlantedPII] = []
    for i in range(n_records):
        record_id = f"{name}-{i:05d}"
        plant: list[tuple[str, str]] = []
        slots = _slots(profile, rng, plant)
        note = rng.choice(profile.notes).format(**slots).strip()
        prefix, response = rng.choice(profile.tasks)
        records.append(
            {
                "id": record_id,
                "instruction": f"{prefix}: {note}",
                "response": response.format(**slots),
            }
        )
        text = records[-1]["instruction"] + "\n" + records[-1]["response"]
        seen: set[tuple[str, str]] = set()
        for entity_type, value in plant:
            if (entity_type, value) not in seen and value in text:
                seen.add((entity_type, value))
                planted.append(PlantedPII(record_id, entity_type, value))
    return records, planted


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_synthetic_sites(
    out_dir: Path, *, sites: int = 3, records_per_site: int = 240, seed: int = 0
) -> list[Path]:
    """Write ``<site>.jsonl`` and its ``<site>.pii.json`` answer key per site.

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

    Returns
    -------
    list[Path]
        The JSONL paths, one per site, in site order.  The ``.pii.json`` files
        are for tests only and must never be fed to training.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, name in enumerate(site_names(sites)):
        records, planted = generate_site_records(index, records_per_site, seed=seed)
        path = out_dir / f"{name}.jsonl"
        _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        key = json.dumps([asdict(p) for p in planted], ensure_ascii=False, indent=1)
        _atomic_write(out_dir / f"{name}.pii.json", key + "\n")
        paths.append(path)
    return paths

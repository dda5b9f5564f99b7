"""Vocabularies of the embedded synthetic corpus: fake names, places and the site profiles.

Names avoid common English and clinical words so that a leak check can look for each
name token as a word.  Nothing here is real patient data.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def items(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(";"))


# Fake-identifier vocabularies.  Names avoid common English and clinical words so
# that a leak check can look for each name token as a word.
FEMALE_FIRST = words(
    "Maria Linda Patricia Jennifer Elizabeth Barbara Susan Jessica Sarah Karen Nancy Lisa Margaret Sandra "
    "Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Stephanie Rebecca Sharon Laura "
    "Cynthia Kathleen Angela Shirley Anna Brenda Pamela Nicole Samantha Katherine Christine Rachel Carolyn "
    "Janet Heather Diane Julie Joyce Victoria Christina Lauren Evelyn Olivia Judith Megan Cheryl Martha "
    "Andrea Priya Aisha Mei Fatima Sofia Camila Yuki Ingrid Leila Nadia Amara"
)
MALE_FIRST = words(
    "James Robert John Michael David William Richard Joseph Thomas Charles Christopher Daniel Matthew "
    "Anthony Donald Steven Andrew Joshua Kenneth Kevin Brian George Timothy Ronald Edward Jason Jeffrey "
    "Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Brandon Benjamin Samuel Gregory Alexander "
    "Raymond Dennis Jerry Tyler Aaron Jose Henry Douglas Peter Nathan Zachary Kyle Walter Ethan Carlos "
    "Rahul Omar Hiroshi Dmitri Kwame Luis Arjun Tariq Mateo Lars Wei"
)
LAST_NAMES = words(
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
STREET_NAMES = words(
    "Maple Oak Cedar Elm Pine Birch Willow Chestnut Walnut Spruce Juniper Magnolia Sycamore Hawthorn Laurel "
    "Aspen Poplar Hickory Linden Cypress Orchard Sunset"
)
STREET_SUFFIXES = words("Street Avenue Road Lane Drive Court Boulevard Way Place Terrace")
CITIES = words(
    "Fairview Georgetown Greenville Ashland Dover Oxford Bristol Burlington Kingston Newport Arlington "
    "Auburn Lexington Oakdale Brookfield Westfield Centerville"
)
STATES = words("OH PA NY MA IL CA TX WA NC GA MI WI MN CO AZ VA NJ")
AREA_CODES = (212, 312, 415, 617, 206, 303, 404, 503, 614, 713, 804, 919, 973)
EMAIL_DOMAINS = ("example.com", "example.org", "mailbox.net", "homemail.com")

SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="northside-cardiology",
        specialty="cardiology",
        diagnoses=items(
            "atrial fibrillation with rapid ventricular response; heart failure with reduced ejection "
            "fraction; stable angina; NSTEMI; severe aortic stenosis; supraventricular tachycardia; "
            "hypertensive urgency; hyperlipidemia"
        ),
        medications=items(
            "metoprolol succinate 50 mg daily; apixaban 5 mg twice daily; atorvastatin 80 mg nightly; "
            "lisinopril 10 mg daily; furosemide 40 mg daily; clopidogrel 75 mg daily; amiodarone 200 mg "
            "daily; spironolactone 25 mg daily"
        ),
        findings=items(
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
        diagnoses=items(
            "stage II breast cancer; non-small cell lung cancer; diffuse large B-cell lymphoma; metastatic "
            "colon adenocarcinoma; multiple myeloma; pancreatic adenocarcinoma; ovarian carcinoma"
        ),
        medications=items(
            "carboplatin and paclitaxel; pembrolizumab 200 mg every 3 weeks; FOLFOX; rituximab with CHOP; "
            "lenalidomide 25 mg; capecitabine 1000 mg/m2; ondansetron 8 mg as needed; dexamethasone 4 mg; "
            "filgrastim; tamoxifen 20 mg daily"
        ),
        findings=items(
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
        diagnoses=items(
            "acute otitis media; bronchiolitis; asthma exacerbation; croup; streptococcal pharyngitis; "
            "gastroenteritis with mild dehydration; atopic dermatitis; hand, foot and mouth disease"
        ),
        medications=items(
            "amoxicillin 90 mg/kg/day for 10 days; albuterol inhaler 2 puffs every 4 hours; dexamethasone "
            "0.6 mg/kg once; oral rehydration solution; cetirizine 5 mg daily; hydrocortisone 1% cream; "
            "ibuprofen 10 mg/kg as needed; acetaminophen 15 mg/kg as needed"
        ),
        findings=items(
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

MONTHS = words("January February March April May June July August September October November December")

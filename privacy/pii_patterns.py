"""Recognizer tables and vocabularies of the PII scrubber (:mod:`privacy.pii`).

Pattern recognizers for the identifiers regulated sites hold (MRN, NPI, health-plan,
policy, claim and account numbers, SSN/TIN, phone formats, street addresses, ZIP
codes, dates, ages over 89, titled and context-introduced names), the spaCy label
mapping, the domain vocabulary that must never be scrubbed and the short placeholder
tags.  Labelled patterns (a value right after "MRN", "policy no." ...) use
look-behinds and score 0.95; unlabelled shapes score lower and rely on Presidio's
context words.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from presidio_analyzer import EntityRecognizer

IGNORED_SPACY_LABELS = (
    "CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY", "PRODUCT", "WORK_OF_ART", "EVENT", "LAW",
    "LANGUAGE",
)  # fmt: skip
# spaCy label -> Presidio entity. Facilities (FAC: buildings, streets) are kept as locations.
SPACY_TO_PRESIDIO = {
    "PER": "PERSON", "PERSON": "PERSON", "NORP": "NRP", "FAC": "LOCATION", "LOC": "LOCATION",
    "GPE": "LOCATION", "LOCATION": "LOCATION", "ORG": "ORGANIZATION", "ORGANIZATION": "ORGANIZATION",
    "DATE": "DATE_TIME", "TIME": "DATE_TIME",
}  # fmt: skip
NER_TYPES = frozenset({"PERSON", "LOCATION", "NRP", "ORGANIZATION"})

# Clinical, banking and insurance vocabulary that spaCy's small model sometimes tags as a
# name, place or organisation.  A PERSON/LOCATION/NRP/ORGANIZATION span made only of
# these words is not PII.
_DOMAIN_WORDS = """
    patient pt case name mother father parent dr doctor nurse clinic hospital ward unit plan exam labs
    symptoms finding findings problem regimen diagnosis indication history workup testing restaging
    recommendation follow-up follow up discharge admission telemetry infusion cycle tumor board triage
    cardiology oncology pediatrics pediatric cardiac medications home address email prefers best
    callback number dob mrn ssn ip zip fax tel phone cell age male female boy girl sick visit well-child
    check growth normal concern dear barky cough stridor wheezing fever rash hemoglobin platelets
    neutrophil count troponin gradient leads rhythm ejection fraction ecg ekg bnp ldl hdl ct pet mri cbc
    inr icu ed er ecog chop folfox folfiri nstemi stemi cabg pci tavr afib chf copd ckd ca cea psa anc
    st hr bp spo2 echo holter metoprolol apixaban atorvastatin lisinopril furosemide clopidogrel
    amiodarone spironolactone warfarin rivaroxaban aspirin digoxin diltiazem sacubitril valsartan
    losartan carvedilol nitroglycerin heparin carboplatin paclitaxel pembrolizumab nivolumab rituximab
    lenalidomide capecitabine ondansetron dexamethasone filgrastim tamoxifen letrozole cisplatin
    docetaxel bortezomib oxaliplatin fluorouracil amoxicillin albuterol cetirizine hydrocortisone
    ibuprofen acetaminophen prednisolone azithromycin cephalexin fluticasone montelukast atrial
    fibrillation angina stenosis tachycardia hyperlipidemia hypertension myeloma lymphoma adenocarcinoma
    carcinoma cancer otitis media bronchiolitis asthma croup pharyngitis gastroenteritis dermatitis
    b-cell hodgkin non-hodgkin metformin insulin glargine levothyroxine omeprazole pantoprazole
    gabapentin sertraline prednisone enoxaparin vancomycin ceftriaxone piperacillin tazobactam
    parkinson parkinson's alzheimer alzheimer's crohn crohn's graves hashimoto bell's palsy cushing
    addison guillain-barre barre guillain sjogren down syndrome disease sepsis pneumonia diabetes
    mellitus a1c hba1c creatinine egfr tsh mri-guided biopsy colonoscopy mammogram
    account checking savings wire transfer ach swift bic aba routing overdraft apr escrow mortgage heloc
    loan balance deposit withdrawal statement kyc aml fraud chargeback dispute ira roth 401k cd
    certificate brokerage teller branch debit credit card visa mastercard amex discover autopay
    insurance policy policyholder deductible copay coinsurance premium claim claims adjuster
    subrogation underwriting rider beneficiary hmo ppo epo medicare medicaid cobra eob prior
    authorization formulary tier out-of-pocket maximum annuity term whole life umbrella liability
    collision comprehensive homeowners renters part ein fein tin itin iban npi mbi nhs id member
    subscriber group medicare-id portal ira kyc bell bell's hashimoto thyroiditis cashier cashier's
    reports umbrella applies
    """
DOMAIN_TERMS = frozenset(_DOMAIN_WORDS.split())

# Short placeholder tags (typed, like ``<PERSON>``): long ones cost a small model many tokens.
PLACEHOLDER_TAGS = {
    "MEDICAL_RECORD_NUMBER": "MRN",
    "DATE_TIME": "DATE",
    "PHONE_NUMBER": "PHONE",
    "EMAIL_ADDRESS": "EMAIL",
    "STREET_ADDRESS": "ADDRESS",
    "ZIP_CODE": "ZIP",
    "US_SSN": "SSN",
    "US_ITIN": "TIN",
    "US_TIN": "TIN",
    "US_NPI": "NPI",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP",
    "ACCOUNT_NUMBER": "ACCOUNT",
    "US_BANK_NUMBER": "ACCOUNT",
    "HEALTH_PLAN_ID": "PLAN_ID",
    "POLICY_NUMBER": "POLICY",
    "AGE_OVER_89": "AGE",
}

_NAME = r"[A-Z][a-zA-Z'\u2019\-]+"
MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Court|Ct|Boulevard|Blvd|Way|Place|Pl|Terrace"
    r"|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Trail|Square|Sq)\.?"
)
# Words after which a capitalised pair or triple is a person's name.
_RELATIONS = (
    r"(?i:patient|pt|name|case|mother|father|parent|guardian|wife|husband|son|daughter|spouse"
    r"|caregiver|sister|brother|grandmother|grandfather|account holder|holder|customer|client|member"
    r"|insured|policyholder|policy holder|beneficiary|claimant|applicant|borrower|co-signer|cosigner"
    r"|subscriber|adjuster|agent|teller|banker|representative|signed by|spoke with|contacted|attn"
    r"|dear|payee|remitter|owner|witness|referred by|seen by|examined by)"
)
_LABEL_TAIL = r"(?:\s*(?:number|no\.?|num\.?|#|id|ID))?\s*[:#.]?\s*#?\s*"
_ID = r"(?=[A-Z0-9-]*\d)[A-Z0-9](?:[A-Z0-9]|-(?=[A-Z0-9])){3,24}\b"


def _labelled(labels: str, value: str = _ID) -> str:
    """A value right after one of ``labels`` (and an optional "number"/"no."/"#"/"ID")."""
    return rf"(?<=\b(?i:{labels}){_LABEL_TAIL}){value}"


# (entity, recognizer name, case-sensitive?, [(pattern, score)], context words)
PatternTable = tuple[tuple[str, str, bool, list[tuple[str, float]], list[str]], ...]
PATTERNS: PatternTable = (
    ("MEDICAL_RECORD_NUMBER", "MrnRecognizer", True, [
        (_labelled(r"mrn|medical record|med\.? rec\.?|record|chart|patient|unit|hospital"), 0.95),
        (r"\b\d{2}-\d{5,6}\b", 0.3),
        (r"\b\d{7,10}\b", 0.2),
    ], ["mrn", "medical", "record", "chart"]),
    ("US_NPI", "NpiLabelRecognizer", True, [
        (_labelled(r"npi|national provider identifier|national provider", r"\d{4}[ -]?\d{3}[ -]?\d{3}\b"),
         0.95),
    ], ["npi", "provider"]),
    ("HEALTH_PLAN_ID", "HealthPlanIdRecognizer", True, [
        (_labelled(r"member|subscriber|group|health plan|plan|medicare|medicaid|mbi|insurance|insurer"
                   r"|beneficiary|enrollee|hicn"), 0.95),
    ], ["member", "subscriber", "plan", "insurance"]),
    ("POLICY_NUMBER", "PolicyClaimNumberRecognizer", True, [
        (_labelled(r"policy|claim|certificate|contract|authorization|auth|reference|ref|case|invoice"),
         0.95),
    ], ["policy", "claim"]),
    ("ACCOUNT_NUMBER", "AccountNumberRecognizer", True, [
        (_labelled(r"account|acct\.?|a/c|routing|aba|loan|iban|card|customer|client|sort code"), 0.95),
        (r"(?<=\b(?i:ending|ending in|ends in|last four|last 4)\s*:?\s*)\d{4}\b", 0.9),
        (r"\b\d{4}[ -]\d{4}[ -]\d{4}[ -]\d{1,7}\b", 0.5),
    ], ["account", "acct", "routing", "bank", "checking", "savings"]),
    ("US_SSN", "SsnLabelRecognizer", True, [
        (_labelled(r"ssn|ss|social security|social", r"\d{3}[- .]?\d{2}[- .]?\d{4}\b"), 0.95),
    ], ["ssn", "social"]),
    ("US_TIN", "TaxIdRecognizer", True, [
        (_labelled(r"ein|fein|tin|itin|tax id|taxpayer id|tax identification|taxpayer identification"
                   r"|employer identification", r"\d{2}-?\d{7}\b|\d{3}-?\d{2}-?\d{4}\b"), 0.95),
        (r"\b\d{2}-\d{7}\b", 0.45),
    ], ["ein", "tin", "tax", "employer"]),
    ("PHONE_NUMBER", "PhoneFormatsRecognizer", False, [
        (r"(?<![\w+])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)"
         r"(?:\s*(?:ext\.?|x)\s*\d{1,5})?", 0.7),
        (r"(?<![\w+])\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)|\d{1,4})(?:[\s.-]?\d{2,4}){2,4}(?!\d)", 0.7),
        (r"(?<=\b(?:phone|tel|cell|mobile|fax|call|callback|contact)\.?(?:\s*(?:number|no\.?|#))?\s*[:#]?\s*)"
         r"\d{10}\b", 0.9),
    ], ["phone", "call", "callback", "tel", "cell", "mobile", "number", "contact", "fax"]),
    ("PERSON", "TitledNameRecognizer", True, [
        (rf"(?<=\b(?:Dr|Mr|Mrs|Ms|Mx|Miss|Prof|Rev|Sr|Sra)\.?\s{{1,3}})(?:[A-Z]\.\s)?{_NAME}"
         rf"(?:\s(?:[A-Z]\.\s)?{_NAME})?", 0.9),
    ], []),
    ("PERSON", "ContextNameRecognizer", True, [
        (rf"(?<=\b{_RELATIONS}\s*[:\-]?\s{{1,3}}){_NAME}(?:\s(?:[A-Z]\.\s)?{_NAME}){{1,2}}", 0.7),
        (rf"(?<=\b{_RELATIONS}\s*[:\-]?\s{{1,3}}){_NAME},\s{_NAME}(?:\s[A-Z]\.)?", 0.8),
        (rf"\b{_NAME}\s(?:[A-Z]\.\s)?{_NAME}(?=,?\s*\(?\s*(?i:mrn|medical record|dob\b|ssn|member|policy"
         rf"|account))", 0.7),
        (rf"\b{_NAME}\s{_NAME}(?=\s*[,(]\s*(?:an?\s)?\d{{1,3}}-(?:year|month|week|day)-old)", 0.7),
    ], []),
    ("STREET_ADDRESS", "StreetAddressRecognizer", True, [
        (rf"\b\d{{1,6}}[A-Z]?\s+(?:[NSEW]\.?\s+)?(?:[A-Z][a-zA-Z]+\s+){{1,3}}{_SUFFIX}(?![a-zA-Z])"
         r"(?:,?\s+(?:Apt|Unit|Suite|Ste|#)\.?\s*[\w-]+)?"
         r"(?:,\s*[A-Z][a-zA-Z]+(?:\s[A-Z][a-zA-Z]+){0,2},\s*[A-Z]{2}(?:\s+\d{5}(?:-\d{4})?)?)?", 0.8),
        (r"\b(?i:p\.?\s?o\.?\s?box|post office box)\s+\d{1,6}\b"
         r"(?:,\s*[A-Z][a-zA-Z]+(?:\s[A-Z][a-zA-Z]+){0,2},\s*[A-Z]{2}(?:\s+\d{5}(?:-\d{4})?)?)?", 0.8),
    ], ["address", "lives", "street", "home", "mail"]),
    ("ZIP_CODE", "UsZipRecognizer", True, [
        (r"(?<=\b[A-Z]{2}\s{1,2})\d{5}(?:-\d{4})?\b", 0.6),
        (r"(?<=(?i:\bzip(?:\s?code)?|postal code)\s*:?\s*)\d{5}(?:-\d{4})?\b", 0.9),
    ], ["zip", "postal"]),
    ("DATE_TIME", "DateFormatsRecognizer", False, [
        (rf"\b{MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b", 0.9),
        (rf"\b\d{{1,2}}(?:st|nd|rd|th)?(?:\s+|-){MONTH}\.?,?(?:\s+|-)\d{{2,4}}\b", 0.9),
        (r"\b(?:0?[1-9]|1[0-2])[/.-](?:0?[1-9]|[12]\d|3[01])[/.-](?:\d{4}|\d{2})\b", 0.8),
        (r"\b(?:0?[1-9]|[12]\d|3[01])[/.-](?:0?[1-9]|1[0-2])[/.-](?:19|20)\d{2}\b", 0.8),
        (r"\b(?:19|20)\d{2}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])\b", 0.85),
        (rf"\b{MONTH}\.?\s+(?:of\s+)?(?:19|20)\d{{2}}\b", 0.6),
        (r"(?<=\b(?i:dob|born|date of birth|birth date)\s*[:#]?\s*)(?:19|20)\d{6}\b", 0.9),
    ], ["dob", "born", "date", "admitted", "visit", "seen"]),
    ("AGE_OVER_89", "AgeOver89Recognizer", False, [
        (r"\b(?:9\d|1[0-4]\d)(?=[- ](?:years?|yrs?)[- ]old\b|\s*(?:yo|y/o)\b)", 0.8),
    ], ["age", "aged"]),
)  # fmt: skip

# Entity types the scrubber can emit (for per-entity operator settings).
ENTITY_TYPES = frozenset(
    {entity for entity, *_ in PATTERNS}
    | {"PERSON", "LOCATION", "NRP", "ORGANIZATION", "EMAIL_ADDRESS", "IP_ADDRESS", "URL", "CREDIT_CARD"}
    | {"IBAN_CODE", "US_ITIN", "US_BANK_NUMBER", "US_DRIVER_LICENSE", "US_PASSPORT", "MEDICAL_LICENSE"}
    | {"UK_NHS", "CRYPTO", "MAC_ADDRESS", "UUID"}
)

DATE_LIKE = re.compile(
    rf"\d{{1,4}}[/.-]\d{{1,2}}|\b(?:19|20)\d{{2}}\b|\b{MONTH}\b|\b(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day\b",
    re.IGNORECASE,
)
NAME_TOKEN = re.compile(r"[A-Z][a-zA-Z'\u2019\-]+")
TITLES = frozenset({"Dr", "Mr", "Mrs", "Ms", "Mx", "Miss", "Prof", "Rev", "Sr", "Sra"})
YEAR = re.compile(r"\b(?:19|20)\d{2}(?=\b|\d{4}\b)")


def domain_recognizers(language: str) -> list[EntityRecognizer]:
    """Build the pattern recognizers of :data:`PATTERNS` plus Presidio's NPI checksum recognizer.

    Parameters
    ----------
    language
        Language code the recognizers serve.

    Returns
    -------
    list[EntityRecognizer]
        Recognizers to add to an analyzer's registry.
    """
    import regex
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import UsNpiRecognizer

    recognizers: list[EntityRecognizer] = []
    for entity, name, case_sensitive, patterns, context in PATTERNS:
        flags = regex.DOTALL | regex.MULTILINE | (0 if case_sensitive else regex.IGNORECASE)
        recognizers.append(
            PatternRecognizer(
                supported_entity=entity,
                name=name,
                supported_language=language,
                patterns=[Pattern(f"{name}-{i}", rx, score) for i, (rx, score) in enumerate(patterns)],
                context=context,
                global_regex_flags=flags,
            )
        )
    recognizers.append(UsNpiRecognizer(supported_language=language))  # Luhn-checked, off by default
    return recognizers

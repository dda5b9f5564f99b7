"""Templates and domain terms of the labelled PII evaluation set (:mod:`embedded.synthpii`).

Slots: ``{name}`` (untitled), ``{titled}`` (Dr./Mr./Mrs./Ms. + name), ``{lastfirst}``
("Last, First"), ``{mrn}``, ``{npi}``, ``{plan}`` (member/subscriber/group IDs),
``{policy}`` (policy and claim numbers), ``{account}``, ``{iban}``, ``{card}``,
``{ssn}``, ``{tin}``, ``{phone}``, ``{email}``, ``{ip}``, ``{url}``, ``{street}``,
``{zip}``, ``{date}`` and ``{term}``/``{term2}``/``{term3}`` (domain terms to keep).
Labelled identifiers bring their own label words ("MRN: ", "policy no. "...).
"""

from __future__ import annotations

DOMAIN_TERMS_BY_DOMAIN: dict[str, tuple[str, ...]] = {
    "clinical": (
        "atrial fibrillation", "metoprolol succinate", "apixaban", "atorvastatin", "heart failure",
        "Parkinson disease", "Crohn's disease", "Hodgkin lymphoma", "Holter monitor", "Bell's palsy",
        "Graves disease", "Alzheimer's dementia", "type 2 diabetes mellitus", "HbA1c", "metformin",
        "insulin glargine", "pembrolizumab", "multiple myeloma", "NSTEMI", "troponin", "ECG", "CBC",
        "creatinine", "community-acquired pneumonia", "ceftriaxone", "vancomycin", "sepsis",
        "levothyroxine", "Hashimoto thyroiditis", "warfarin", "INR", "COPD exacerbation", "albuterol",
        "Down syndrome", "Cushing syndrome", "colonoscopy", "mammogram", "gabapentin", "sertraline",
    ),
    "banking": (
        "wire transfer", "overdraft fee", "ACH debit", "SWIFT code", "APR", "escrow account",
        "home equity line of credit", "Roth IRA", "certificate of deposit", "chargeback", "KYC review",
        "AML alert", "mortgage refinance", "savings account", "debit card", "credit limit",
        "minimum payment", "direct deposit", "brokerage account", "401k rollover", "loan origination",
        "fraud dispute", "monthly statement", "autopay", "cashier's check", "stop payment",
    ),
    "insurance": (
        "deductible", "copay", "coinsurance", "prior authorization", "explanation of benefits",
        "out-of-pocket maximum", "subrogation", "Medicare Part D", "COBRA continuation", "PPO plan",
        "HMO network", "whole life policy", "collision coverage", "premium", "underwriting",
        "term life rider", "formulary tier 3", "durable medical equipment", "claim adjuster",
        "annual wellness visit", "umbrella liability", "homeowners policy", "beneficiary designation",
    ),
}  # fmt: skip

TEMPLATES: dict[str, tuple[str, ...]] = {
    "clinical": (
        "Discharge summary. Patient: {name}, {mrn}, DOB {date}. Admitted {date} for {term}; started on "
        "{term2}. Attending {titled}, {npi}. Follow-up call {phone}. {term3} reviewed.",
        "{titled} saw {name} ({mrn}) in clinic on {date} for {term}. Home address {street} {zip}. "
        "Portal message from {email}. Plan: {term2} and {term3}.",
        "Referral from {titled} ({npi}) regarding {lastfirst}, {mrn}. History of {term}; labs show "
        "{term2}. Insurance {plan}. Contact {phone} or {email}.",
        "Telehealth note {date}: {name} joined from IP {ip} via {url}. Reports {term}. {titled} "
        "adjusted {term2}. Emergency contact: {name}, {phone}.",
        "Nursing note. {name} ({mrn}) lives at {street} {zip}. SSN on file {ssn}. {term} stable; "
        "continue {term2}. Next visit {date} with {titled}.",
        "Patient {name} called on {date} about {term}. Spoke with {titled}. Callback {phone}. Chart "
        "updated; {term2} refilled; {mrn}.",
    ),
    "banking": (
        "Account holder {name}, {account}, requested a {term} of $4,200 on {date}. Verified by {titled} "
        "at branch. Contact {phone}; {email}.",
        "Customer {lastfirst} disputed a charge on card {card} dated {date}. Opened {term}; {term2} "
        "applied. Mailing address {street} {zip}.",
        "Outgoing {term} to IBAN {iban} for {name} on {date}. {account}. {tin}. Logged in from IP {ip}.",
        "KYC file: {name}, {ssn}, DOB {date}, residing at {street} {zip}. Online banking {url}; "
        "{term} and {term2} reviewed by {titled}.",
        "Loan officer {titled} spoke with {name} about {term}. Payment card {card}. Beneficiary {name}, "
        "IBAN {iban}. Phone {phone}.",
        "{name} ({email}) reported {term} on {date}; {account}. Escalated to {titled}; {term2} noted.",
    ),
    "insurance": (
        "Claimant {name}, {policy}, {plan}, filed on {date} for {term}. Adjuster {titled} reached "
        "them at {phone}. {term2} applies.",
        "Insured: {lastfirst}. {policy}. Address {street} {zip}. DOB {date}. {term} met; {term2} "
        "pending. Provider {npi}.",
        "Policyholder {name} updated the {term} on {date}: beneficiary {name}, {ssn}. Portal {url}, "
        "email {email}, IP {ip}.",
        "{titled} submitted {term} for {name} ({plan}); {policy}. Premium paid by card {card}. "
        "Employer {tin}. Callback {phone}.",
        "Subscriber {name}, {plan}, {mrn}, seen on {date}. {term} and {term2} apply; {term3} attached. "
        "Refund to IBAN {iban}.",
        "Member {name} phoned on {date} about {term}; {policy}. Mailing address {street} {zip}. "
        "Reached at {phone}; {email}.",
    ),
}

"""A labelled synthetic PII evaluation set: clinical, banking and insurance text.

Every text is built from a template whose slots are filled with made-up identifiers in
several formats each (MRN, NPI, health-plan and policy numbers, account numbers, IBAN,
card numbers with a valid Luhn digit, SSN/TIN, phones, emails, IPs, URLs, street
addresses, ZIP codes, dates of many formats, titled and untitled names) and with domain
terms (drugs, diagnoses, banking and insurance vocabulary) that a scrubber must keep.
Each value and term is labelled with its character span.  Nothing here is real.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from embedded.synthpii_vocab import DOMAIN_TERMS_BY_DOMAIN, TEMPLATES
from embedded.synthvocab import (
    AREA_CODES,
    CITIES,
    EMAIL_DOMAINS,
    FEMALE_FIRST,
    LAST_NAMES,
    MALE_FIRST,
    MONTHS,
    STATES,
    STREET_NAMES,
    STREET_SUFFIXES,
)
from privacy.pii_eval import LabelledText, Span

TERM = "TERM"
DOMAINS = ("clinical", "banking", "insurance")


Piece = tuple[str, str | None]  # text, label (None: context, not labelled)


def _luhn_digit(body: str) -> str:
    """The check digit that makes ``body + digit`` pass the Luhn test."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXY") for _ in range(n))


def _groups(value: str, sizes: tuple[int, ...], sep: str) -> str:
    out, pos = [], 0
    for size in sizes:
        out.append(value[pos : pos + size])
        pos += size
    return sep.join(part for part in out if part)


def _iban(rng: random.Random) -> str:
    country, bban = rng.choice(
        [
            ("DE", _digits(rng, 18)),
            ("GB", _letters(rng, 4) + _digits(rng, 14)),
            ("NL", _letters(rng, 4) + _digits(rng, 10)),
            ("FR", _digits(rng, 10) + _letters(rng, 1) + _digits(rng, 12)),
        ]
    )
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    iban = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    return iban if rng.random() < 0.5 else _groups(iban, (4,) * 9, " ")


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), (str(rng.randint(51, 55)), 16), ("37", 15), ("6011", 16)])
    body = prefix + _digits(rng, length - len(prefix) - 1)
    number = body + _luhn_digit(body)
    sizes = (4, 6, 5) if length == 15 else (4, 4, 4, 4)
    return rng.choice([number, _groups(number, sizes, " "), _groups(number, sizes, "-")])


def _npi(rng: random.Random) -> str:
    body = rng.choice("12") + _digits(rng, 8)
    npi = body + _luhn_digit("80840" + body)
    return rng.choice([npi, npi, _groups(npi, (4, 3, 3), " "), _groups(npi, (4, 3, 3), "-")])


def _ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    value = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
    return rng.choice([_groups(value, (3, 2, 4), "-"), _groups(value, (3, 2, 4), " "), value])


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(1931, 2025), rng.randint(1, 12), rng.randint(1, 28)
    month = MONTHS[m - 1]
    suffix = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(d, "th")
    return rng.choice(
        [
            f"{m:02d}/{d:02d}/{y}", f"{m}/{d}/{y % 100:02d}", f"{y}-{m:02d}-{d:02d}", f"{month} {d}, {y}",
            f"{month[:3]}. {d}, {y}", f"{d} {month} {y}", f"{d:02d}-{month[:3]}-{y}",
            f"{month} {d}{suffix}, {y}",
            f"{d:02d}.{m:02d}.{y}", f"{m:02d}-{d:02d}-{y}", f"{y}/{m:02d}/{d:02d}", f"{month} {y}",
        ]
    )  # fmt: skip


def _phone(rng: random.Random) -> str:
    a, e, n = (
        rng.choice(AREA_CODES),
        rng.choice([x for x in range(201, 990) if x % 100 != 11]),
        rng.randint(0, 9999),
    )
    return rng.choice(
        [
            f"({a}) {e}-{n:04d}", f"{a}-{e}-{n:04d}", f"{a}.{e}.{n:04d}", f"+1 {a} {e} {n:04d}",
            f"1-{a}-{e}-{n:04d}", f"{a}-{e}-{n:04d} ext. {rng.randint(10, 999)}", f"+44 20 79{n:04d} {e}",
        ]
    )  # fmt: skip


def _street(rng: random.Random) -> str:
    number = rng.randint(2, 9899)
    street = f"{rng.choice(STREET_NAMES)} {rng.choice(STREET_SUFFIXES)}"
    kind = rng.randrange(4)
    if kind == 0:
        base = f"{number} {street}"
    elif kind == 1:
        base = f"{number} {rng.choice('NSEW')}. {street}, Apt {rng.randint(1, 30)}{rng.choice('ABC')}"
    elif kind == 2:
        base = f"PO Box {rng.randint(10, 9999)}"
    else:
        base = f"{number} {street}, Suite {rng.randint(100, 990)}"
    return f"{base}, {rng.choice(CITIES)}, {rng.choice(STATES)}"


def _name(rng: random.Random) -> str:
    first = rng.choice(FEMALE_FIRST + MALE_FIRST)
    last = rng.choice(LAST_NAMES)
    if rng.random() < 0.1:
        last = f"{last}-{rng.choice(LAST_NAMES)}"
    return (
        f"{first} {rng.choice(string.ascii_uppercase)}. {last}" if rng.random() < 0.2 else f"{first} {last}"
    )


def _ident(rng: random.Random, formats: list[Callable[[], str]]) -> str:
    return rng.choice(formats)()


def _slot(slot: str, rng: random.Random, domain: str) -> list[Piece]:
    """The pieces of one template slot: labelled values and unlabelled context."""
    r, d, lt = rng, lambda n: _digits(rng, n), lambda n: _letters(rng, n)
    labelled: dict[str, tuple[list[str], Callable[[], str], str]] = {
        "mrn": (["MRN: ", "MRN ", "MRN #", "medical record number ", "Med Rec #: ", "chart no. "],
                lambda: _ident(r, [lambda: d(7), lambda: f"{d(2)}-{d(5)}", lambda: lt(1) + d(7),
                                   lambda: f"{d(3)}-{d(3)}-{d(2)}"]), "MEDICAL_RECORD_NUMBER"),
        "npi": (["NPI ", "NPI: ", "NPI# ", "National Provider Identifier "], lambda: _npi(r), "US_NPI"),
        "plan": (["Member ID: ", "member # ", "Subscriber ID ", "group number ", "Medicare ID ",
                  "Medicaid ID: "],
                 lambda: _ident(r, [lambda: lt(3) + d(9), lambda: "W" + d(9),
                                    lambda: f"{lt(1)}{d(8)}-0{d(1)}",
                                    lambda: f"{d(1)}{lt(2)}{d(1)}-{lt(2)}{d(1)}-{lt(2)}{d(2)}"]),
                 "HEALTH_PLAN_ID"),
        "policy": (["policy number ", "Policy #", "policy no. ", "claim number ", "Claim #: ", "claim "],
                   lambda: _ident(r, [lambda: f"POL-{r.randint(2015, 2025)}-{d(6)}",
                                      lambda: f"{lt(2)}-{d(4)}-{d(4)}", lambda: lt(3) + d(8),
                                      lambda: d(10)]), "POLICY_NUMBER"),
        "account": (["account number ", "acct # ", "Acct: ", "A/C ", "checking account ", "loan no. ",
                     "routing number "],
                    lambda: _ident(r, [lambda: d(12), lambda: f"{d(4)}-{d(6)}-{d(2)}", lambda: d(8),
                                       lambda: d(9), lambda: d(17)]), "ACCOUNT_NUMBER"),
        "ssn": (["SSN ", "SSN: ", "social security number ", "SS# "], lambda: _ssn(r), "US_SSN"),
        "tin": (["EIN ", "TIN: ", "tax ID ", "ITIN "],
                lambda: _ident(r, [lambda: f"{d(2)}-{d(7)}", lambda: f"9{d(2)}-7{d(1)}-{d(4)}"]), "US_TIN"),
        "zip": (["ZIP ", "zip code: ", "ZIP code "],
                lambda: _ident(r, [lambda: f"{r.randint(1001, 99950):05d}", lambda: f"{d(5)}-{d(4)}"]),
                "ZIP_CODE"),
    }  # fmt: skip
    if slot in labelled:
        prefixes, make, label = labelled[slot]
        return [(r.choice(prefixes), None), (make(), label)]
    simple: dict[str, tuple[Callable[[], str], str]] = {
        "iban": (lambda: _iban(r), "IBAN_CODE"),
        "card": (lambda: _card(r), "CREDIT_CARD"),
        "phone": (lambda: _phone(r), "PHONE_NUMBER"),
        "ip": (lambda: _ident(r, [lambda: ".".join(str(r.randint(1, 254)) for _ in range(4)),
                                  lambda: f"2001:db8:{d(2)}a3::8a2e:{d(3)}:{d(4)}"]), "IP_ADDRESS"),
        "url": (lambda: _ident(r, [lambda: f"https://portal.{r.choice(['acme', 'firstbank'])}.com/p/{d(6)}",
                                   lambda: f"www.{r.choice(['mycare', 'lakeside-ins'])}.org/claims?id={d(7)}",
                                   lambda: f"http://records.example.net/{lt(3).lower()}/{d(5)}"]), "URL"),
        "street": (lambda: _street(r), "STREET_ADDRESS"),
        "date": (lambda: _date(r), "DATE_TIME"),
        "name": (lambda: _name(r), "PERSON"),
    }  # fmt: skip
    if slot in simple:
        make, label = simple[slot]
        return [(make(), label)]
    if slot == "email":
        first, last = (
            r.choice(FEMALE_FIRST + MALE_FIRST).lower(),
            r.choice(LAST_NAMES).lower().replace("'", ""),
        )
        user = r.choice([f"{first}.{last}", f"{first[0]}{last}{r.randint(1, 99)}", f"{first}_{last}+mail"])
        return [(f"{user}@{r.choice((*EMAIL_DOMAINS, 'care.example.co.uk'))}", "EMAIL_ADDRESS")]
    if slot == "titled":
        title = r.choice(["Dr. ", "Mr. ", "Mrs. ", "Ms. ", "Dr "])
        value = r.choice(LAST_NAMES) if r.random() < 0.5 else _name(r)
        return [(title, None), (value, "PERSON")]
    if slot == "lastfirst":
        return [(f"{r.choice(LAST_NAMES)}, {r.choice(FEMALE_FIRST + MALE_FIRST)}", "PERSON")]
    if slot in ("term", "term2", "term3"):
        return [(r.choice(DOMAIN_TERMS_BY_DOMAIN[domain]), TERM)]
    raise KeyError(f"unknown template slot {slot!r}")


def _fill(template: str, rng: random.Random, domain: str) -> LabelledText:
    text = ""
    pii: list[Span] = []
    terms: list[Span] = []
    for literal, slot, _, _ in string.Formatter().parse(template):
        text += literal
        if slot is None:
            continue
        for piece, label in _slot(slot, rng, domain):
            if label is not None:
                (terms if label == TERM else pii).append(Span(len(text), len(text) + len(piece), label))
            text += piece
    return LabelledText(domain, text, tuple(pii), tuple(terms))


def generate_labelled_texts(n_per_domain: int = 150, *, seed: int = 0) -> list[LabelledText]:
    """Generate the labelled evaluation set.

    Parameters
    ----------
    n_per_domain
        Texts per domain (clinical, banking, insurance), ``>= 0``.
    seed
        The same ``(n_per_domain, seed)`` gives identical output.

    Returns
    -------
    list[LabelledText]
        Texts with every planted identifier and domain term labelled by span.
    """
    if n_per_domain < 0:
        raise ValueError(f"n_per_domain must be >= 0, got {n_per_domain}")
    rng = random.Random(f"fedtune-pii-eval:{seed}")
    out: list[LabelledText] = []
    for domain in DOMAINS:
        for _ in range(n_per_domain):
            out.append(_fill(rng.choice(TEMPLATES[domain]), rng, domain))
    return out

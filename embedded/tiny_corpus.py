"""Generic synthetic English corpus that the embedded tiny base model is pretrained on.

Sentences are filled from templates with slot vocabularies (everyday, business, science and
general-health words), never clinical notes, so fine-tuning on clinical notes visibly lowers the
loss. :func:`generic_corpus` is deterministic for a given seed.
"""

from __future__ import annotations

import random


def _parse_slots(text: str) -> dict[str, tuple[str, ...]]:
    """Parse ``key: a, b, c; key2: d, e`` (any line breaks) into slot name -> choices."""
    entries = (entry.partition(":") for entry in " ".join(text.split()).split(";"))
    return {k.strip(): tuple(w.strip() for w in v.split(",")) for k, _, v in entries if k.strip()}


# Slot vocabularies, as "slot: choice, choice, ...;" entries. Health words are the general kind a
# newspaper uses, never clinical-note style.
_SLOTS = _parse_slots(
    """
name: Anna, Ben, Carla, David, Elena, Farid, Grace, Hugo, Iris, Jonas, Kemal, Lena, Marco, Nora, Omar,
Paula, Quinn, Rosa, Sam, Tara, Ulrich, Vera, William, Ximena, Yusuf, Zoe, Alice, Bruno, Chloe, Daniel,
Emma, Felix, Hannah, Ivan, Julia, Kevin, Laura, Mateo, Nina, Oscar, Priya, Ravi; place: the office, the
market, the library, the station, the park, the harbor, the school, the bakery, the museum, the
warehouse, the garden, the airport, the stadium, the cinema, the beach, the village square, the
bookshop, the town hall, the factory, the farm, the cafe, the post office, the swimming pool, the
university, the hotel lobby, the bus stop, the gallery, the kitchen; city: Lisbon, Oslo, Nairobi,
Toronto, Melbourne, Kyoto, Santiago, Dublin, Prague, Seoul, Lagos, Vienna, Denver, Mumbai, Cairo,
Helsinki, Bogota, Hamburg, Marseille, Auckland, Chicago, Madrid; day: Monday, Tuesday, Wednesday,
Thursday, Friday, Saturday, Sunday, the weekend; month: January, February, March, April, May, June,
July, August, September, October, November, December; time: in the morning, after lunch, in the evening,
before noon, at night, early, late; adj: small, large, quiet, busy, bright, dark, old, modern, cheap,
expensive, simple, complex, heavy, light, careful, curious, friendly, strange, useful, famous, ordinary,
gentle, rapid, slow, narrow, wide, fresh, ancient, colorful, empty, crowded, clean, noisy, tiny, huge,
steady; obj: a book, some bread, a new laptop, fresh coffee, a bicycle, the report, a table, two
tickets, a warm coat, the groceries, a map, some flowers, a camera, a blanket, a guitar, a lamp, a
backpack, an umbrella, a notebook, a kettle, a painting, some apples, a pair of boots, a puzzle, a
radio; food: soup, pasta, rice, salad, bread, cheese, oranges, bananas, tomatoes, noodles, pancakes,
beans, carrots, yogurt, fish, chicken, lentils, mushrooms, pears, grapes, potatoes, dumplings, tea;
animal: dog, cat, horse, rabbit, fox, owl, dolphin, sparrow, turtle, goat, bee, deer, squirrel, whale,
penguin, hedgehog, eagle, frog, salmon, beetle, wolf, camel, parrot, otter; verb: bought, carried,
found, ordered, borrowed, repaired, packed, delivered, painted, cleaned, sold, wrapped, described,
photographed, returned, shared, lost, built, opened, checked, moved, chose; weather: sunny, rainy, cold,
windy, warm, cloudy, foggy, mild, snowy, humid, stormy, dry; company: Northwind, Bluefield, Acme
Logistics, Greenleaf, Summit Foods, Riverstone, Brightline, Oakridge Supply, Polaris Energy, Harbor
Textiles, Cobalt Software, Maple Transport; metric: revenue, profit, sales, costs, orders, market share,
headcount, exports, margins, inventory, subscriptions, shipping volume; trend: rose, fell, grew,
declined, stayed flat, improved, recovered, doubled, slowed; role: manager, analyst, engineer,
accountant, designer, director, clerk, consultant, architect, lawyer, teacher, journalist, programmer,
economist, translator, librarian, pilot, chef; topic: the budget, the quarterly plan, a new contract,
the supply chain, customer feedback, the hiring plan, the product launch, pricing, the annual audit, a
merger, the marketing campaign, training, the software upgrade, office safety, travel costs, the
sustainability report; subject: water, the cell, light, the planet, sound, the enzyme, iron, the river,
the forest, the magnet, the crystal, the star, the glacier, the volcano, copper, the protein, the ocean
current, the battery, the seed, the comet, the atmosphere, carbon, the bacterium, the electric field,
soil; fact: absorbs heat, changes shape under pressure, moves in waves, reacts with oxygen, depends on
temperature, follows a regular cycle, releases energy, can be measured with simple tools, grows over
time, conducts electricity, reflects most of the light, dissolves slowly, expands when warm, stores
chemical energy, responds to gravity, spreads through the medium; field: physics, chemistry, biology,
geology, astronomy, ecology, mathematics, statistics, botany, oceanography, genetics, meteorology,
economics, linguistics, history; people: researchers, students, the team, engineers, biologists,
chemists, volunteers; action: measured, observed, recorded, compared, tested, estimated, modeled,
analyzed; health: sleep, exercise, a balanced diet, drinking water, fresh air, regular checkups, washing
hands, rest, vitamins, walking, stretching, vaccination, sunscreen, eating vegetables, less sugar;
condition: atrial fibrillation, heart failure, angina, aortic stenosis, hypertension, hyperlipidemia,
tachycardia, breast cancer, lung cancer, lymphoma, colon cancer, multiple myeloma, pancreatic cancer,
ovarian cancer, leukemia, asthma, bronchiolitis, croup, otitis media, pharyngitis, gastroenteritis,
dermatitis, dehydration, diabetes, pneumonia, anemia, neuropathy, infection; drug: metoprolol, apixaban,
atorvastatin, lisinopril, furosemide, clopidogrel, amiodarone, spironolactone, carboplatin, paclitaxel,
pembrolizumab, rituximab, lenalidomide, capecitabine, ondansetron, dexamethasone, filgrastim, tamoxifen,
amoxicillin, albuterol, cetirizine, hydrocortisone, ibuprofen, acetaminophen, insulin, aspirin,
prednisone, heparin; test: an echocardiogram, an ECG, a CT scan, a PET scan, an MRI, a blood count,
troponin levels, the ejection fraction, a chest X-ray, a throat swab, platelet counts, hemoglobin,
oxygen saturation, the heart rate, the temperature; dose: 5 mg daily, 10 mg twice daily, 25 mg daily,
40 mg nightly, 200 mg every 3 weeks, 15 mg/kg as needed, 2 puffs every 4 hours, 0.6 mg/kg once;
unit: cardiology, oncology, pediatrics, the emergency department, the clinic, the infusion center,
the ward, intensive care, telemetry, radiology;
benefit: the heart, the immune system, mood, energy levels, the muscles, blood pressure, the lungs,
digestion, concentration, the bones, recovery, memory; ailment: a cold, the flu, a headache, a sore
throat, a cough, an allergy, a sprained ankle, a fever; organ: the heart pumps blood, the kidneys filter
the blood, the lungs exchange oxygen, the liver stores energy, the skin protects the body, the brain
controls movement, the bones support the body, the stomach digests food
"""
)
_TEMPLATES = (
    "{name} went to {place} on {day} {time}.",
    "On {day}, {name} {verb} {obj} at {place}.",
    "The weather in {city} was {weather}, so {name} stayed near {place}.",
    "{name} and {name2} met at {place} {time} to talk about the week.",
    "It was a {weather} day in {month}, and {name} {verb} {obj}.",
    "After work, {name} walked to the {adj} cafe and ordered {food}.",
    "The {adj} {animal} near {place} surprised everyone.",
    "For dinner, {name} cooked {food} with {food2}.",
    "{name} moved to {city} in {month} and found a {adj} flat.",
    "{company} said that {metric} {trend} by {num} percent last quarter.",
    "The {role} at {company} presented {topic} on {day}.",
    "In the meeting, the team reviewed {topic} and agreed on next steps.",
    "{company} expects {metric} to grow as demand {trend} in {city}.",
    "{name}, a {role} at {company}, wrote a short note about {topic}.",
    "Analysts noted that {metric} at {company} {trend} over the year.",
    "The new office of {company} in {city} opens in {month}.",
    "In the lab, {people} {action} how {subject} {fact}.",
    "It is known in {field} that {subject} {fact}.",
    "The experiment showed that {subject} {fact} when the sample is heated.",
    "{people} {action} {subject} for {num} days and wrote down the results.",
    "A {adj} model from {field} explains why {subject} {fact}.",
    "Over {num} trials, {people} {action} the same pattern.",
    "Students of {field} learn that {subject} {fact}.",
    "Doctors say that {health} is good for {benefit}.",
    "{organ}, which is why it matters for health.",
    "Many people forget that {health} helps {benefit}.",
    "A nurse explained to the class how {organ}.",
    "Good habits such as {health} and {health2} support {benefit}.",
    "In {month}, many people in {city} catch {ailment}.",
    "{name} stayed home with {ailment} and drank {food}.",
    "Textbooks describe {condition} and its treatment with {drug}.",
    "In {unit}, {condition} is often checked with {test}.",
    "A typical adult dose of {drug} is {dose}, but doctors adjust it for each patient.",
    "Patients with {condition} may be admitted to {unit} for monitoring.",
    "The guideline says {drug} and {drug2} should not be started without {test}.",
    "Records at {place} list the date of birth (DOB), the medical record number (MRN) and {condition}.",
    "A discharge summary for {condition} explains the diagnosis, {drug} and the follow-up in {month}.",
    "Follow-up in {unit} was planned after {test} showed {condition}.",
    "Nurses in {unit} gave {drug} {dose} and recorded {test}.",
    "Summarize: {condition} is treated with {drug}; follow-up in {unit}.",
    "### Instruction:\nSummarize the note about {topic}.\n\n### Response:\nThe {role} reviewed {topic}.",
    "### Instruction:\nList the key facts about {subject}.\n\n"
    "### Response:\nIn {field}, it {fact} ({num} notes).",
    "In {city}, de-identified {field} records replace a name with <PERSON>, a date with <DATE>, "
    "a phone with <PHONE>.",
    "The {adj} form from {company} keeps <EMAIL>, <ADDRESS>, <MRN> and <ZIP> as placeholders.",
    "The {age}-year-old {sex} with {condition} showed {test} results; continue {drug} and review again.",
    "{name} asked to call back the main number or send an email; the home address is on the {month} form.",
    "The patient with {ailment} prefers a callback; the recommendation was {health} and supportive care.",
    "A {sex} patient, {age} years old, was seen on {day} in {unit} for {ailment}.",
)


def _fill(template: str, rng: random.Random) -> str:
    """Fill one template with slot values drawn from ``rng``."""
    values: dict[str, object] = {key: rng.choice(words) for key, words in _SLOTS.items()}
    for key in ("name", "health", "food", "drug"):
        values[key], values[key + "2"] = rng.sample(_SLOTS[key], 2)
    values["num"] = rng.randint(2, 60)
    values["age"] = rng.randint(1, 95)
    values["sex"] = rng.choice(("male", "female", "man", "woman", "boy", "girl"))
    sentence = template.format(**values)
    return sentence[0].upper() + sentence[1:]


def generic_corpus(n_sentences: int, *, seed: int = 0) -> list[str]:
    """Generate a deterministic generic English corpus from templates.

    Parameters
    ----------
    n_sentences
        Number of sentences (``>= 0``).
    seed
        Seed of a private random generator; the same seed gives the same corpus.

    Returns
    -------
    list[str]
        Everyday, business, science and general-health sentences (no clinical notes).
    """
    if n_sentences < 0:
        raise ValueError(f"n_sentences must be >= 0, got {n_sentences}")
    rng = random.Random(seed)
    return [_fill(rng.choice(_TEMPLATES), rng) for _ in range(n_sentences)]

"""Build the embedded tiny base model: a small Llama pretrained on generic synthetic English.

It lets every part of fedtune (LoRA, DP-SGD, federation) run offline on a CPU in seconds. The
corpus is templated *generic* text (everyday, business, science, general health), never clinical
notes, so fine-tuning on clinical notes visibly lowers the loss. The output directory loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and carries a ``fedtune-tiny.json`` manifest.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "fedtune-tiny.json"
FORMAT_VERSION = 2
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TinySpec:
    """Architecture and pretraining recipe of the tiny model.

    ``vocab_size`` is an upper bound: the BPE trainer stops when the corpus has no more merges.
    A cached model is reused only if the spec in its manifest equals the requested one.
    """

    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    max_position: int = 256
    corpus_sentences: int = 6000
    pretrain_steps: int = 300
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k}={v} must be > 0" for k, v in asdict(self).items() if k != "seed" and not v > 0]
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if self.seq_len > self.max_position:
            problems.append(f"seq_len={self.seq_len} exceeds max_position={self.max_position}")
        if self.vocab_size < 300:
            problems.append(f"vocab_size={self.vocab_size} must be >= 300 (256 bytes + specials)")
        if problems:
            raise ValueError("invalid TinySpec: " + "; ".join(problems))


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


def _train_tokenizer(corpus: list[str], spec: TinySpec) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    # add_bos_token makes the wrapper install a "<s> $A" post-processor, like Llama tokenizers.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=spec.max_position,
    )


def _pretrain(model: Any, stream: list[int], spec: TinySpec, progress: Callable[[str], None]) -> list[float]:
    """Run a short causal-LM pretraining loop on random windows; return every step's loss."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    n_windows = data.numel() - spec.seq_len
    if n_windows < 1:
        raise ValueError(f"corpus too small: {data.numel()} tokens for seq_len={spec.seq_len}")
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.pretrain_steps // 10)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    offsets = torch.arange(spec.seq_len)
    losses: list[float] = []
    model.train()
    for step in range(spec.pretrain_steps):
        batch = data[torch.randint(0, n_windows, (spec.batch_size,), generator=gen)[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == spec.pretrain_steps:
            progress(f"pretrain step {step + 1}/{spec.pretrain_steps} loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _write_model(out_dir: Path, spec: TinySpec, progress: Callable[[str], None]) -> dict[str, Any]:
    """Build the tokenizer and model and save them into the fresh directory ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    corpus = generic_corpus(spec.corpus_sentences, seed=spec.seed)
    tokenizer = _train_tokenizer(corpus, spec)
    stream: list[int] = []  # "<s> sentence </s>" for every sentence, concatenated
    for ids in tokenizer(corpus)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    progress(f"tokenizer trained: {len(tokenizer)} tokens, corpus {len(stream)} tokens")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Fork the global RNG so that seeding here never leaks into the caller (e.g. DP noise).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        progress(f"model initialised: {n_params} parameters")
        losses = _pretrain(model, stream, spec, progress)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-10:]
    manifest = {
        "format": FORMAT_VERSION,
        "spec": asdict(spec),
        "param_count": n_params,
        "vocab_size": len(tokenizer),
        "train_tokens": len(stream),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),  # mean of the last 10 steps
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    # Written last: its presence marks a complete directory.
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """Return the ``fedtune-tiny.json`` manifest of ``model_dir``; None if absent or unreadable."""
    try:
        data = json.loads((Path(model_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(model_dir: Path, spec: TinySpec) -> bool:
    """Whether ``model_dir`` holds a finished build of exactly ``spec``."""
    manifest = read_manifest(model_dir) or {}
    return (
        manifest.get("format") == FORMAT_VERSION
        and manifest.get("spec") == asdict(spec)
        and all((model_dir / name).is_file() for name in _REQUIRED_FILES)
    )


def build_tiny_model(
    out_dir: Path, spec: TinySpec = TinySpec(), *, progress: Callable[[str], None] | None = None
) -> Path:
    """Build the tiny model into ``out_dir`` atomically.

    Everything is written into a temporary sibling directory that replaces ``out_dir`` only
    once complete, so a crash never leaves a half-written model behind.

    Parameters
    ----------
    out_dir
        Target directory; if it exists it must be empty or a previous tiny-model build.
    spec
        Architecture and pretraining recipe.
    progress
        Optional callback receiving short human-readable progress lines.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    FileExistsError
        If ``out_dir`` exists and is neither an empty directory nor a tiny-model build.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (read_manifest(out_dir) or not any(out_dir.iterdir()))):
        raise FileExistsError(f"{out_dir}: exists and is not a fedtune tiny-model directory; remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir, old_dir = (out_dir.with_name(f".{out_dir.name}.{kind}-{tag}") for kind in ("tmp", "old"))
    tmp_dir.mkdir()
    try:
        _write_model(tmp_dir, spec, progress or (lambda _msg: None))
        if out_dir.exists():  # os.replace cannot overwrite a non-empty directory
            os.replace(out_dir, old_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        if old_dir.exists() and not out_dir.exists():  # the swap failed halfway: restore
            os.replace(old_dir, out_dir)
        for leftover in (tmp_dir, old_dir):
            shutil.rmtree(leftover, ignore_errors=True)
    return out_dir


def ensure_tiny_model(cache_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Return a tiny-model directory for ``spec``, building it only when needed.

    A complete build in ``cache_dir`` whose manifest spec equals ``spec`` is reused; otherwise
    the model is (re)built. Concurrent callers are serialised by an ``fcntl`` lock file next to
    ``cache_dir`` (``.<name>.lock``), so only one of them builds.

    Parameters
    ----------
    cache_dir
        Directory that holds (or will hold) the model itself.
    spec
        Required architecture and recipe.

    Returns
    -------
    Path
        ``cache_dir``, ready for ``from_pretrained``.
    """
    cache_dir = Path(cache_dir)
    if _is_complete(cache_dir, spec):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.with_name(f".{cache_dir.name}.lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        if not _is_complete(cache_dir, spec):  # another process may have built it meanwhile
            build_tiny_model(cache_dir, spec)
    return cache_dir

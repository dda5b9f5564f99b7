"""The site's local data pipeline: read -> validate -> scrub -> split (tokenizing: ``client.tokens``).

Nothing is silently dropped: the first bad record stops the pipeline with its file,
line and a fix, before any budget is spent. Scrubbed text is cached in the site's
state dir (keyed by the raw file's hash and the scrub settings) so rounds after the
first skip the slow NER pass (:func:`load_site_data`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.tokens import Example, example_of
from common.errors import DataError
from common.fsutil import atomic_write_text, file_sha256

if TYPE_CHECKING:
    from client.policy import SitePolicy

SCRUB_VERSION = "5"  # bump whenever scrubbing output changes: cached scrubbed text is then redone

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def _open_error(path: Path, exc: OSError) -> DataError:
    return DataError(
        str(path),
        None,
        f"cannot open the file ({exc.strerror})",
        "check the [data] path in the site policy and its permissions",
    )


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 -- the with-block below owns it; open errors differ
    except OSError as exc:
        raise _open_error(path, exc) from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    str(path), lineno, "not UTF-8 text", "re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
                ) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    str(path),
                    lineno,
                    f"not valid JSON ({exc.msg} at column {exc.colno})",
                    "fix or remove this line; each line must be one JSON object",
                ) from None
            except RecursionError:
                raise DataError(
                    str(path), lineno, "JSON nested too deeply", "each line must be one flat JSON object"
                ) from None


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield reader.line_num, dict(row)
    except UnicodeDecodeError:
        raise DataError(str(path), None, "not UTF-8 text", "re-encode the file as UTF-8") from None
    except OSError as exc:
        raise _open_error(path, exc) from None


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for unreadable files
        raise DataError(
            str(path), None, f"cannot read as Parquet ({exc})", "check the file is a valid Parquet file"
        ) from None
    yield from enumerate(table.to_pylist(), start=1)


def load_records(path: Path, fields: Sequence[str], *, max_chars: int = 20000) -> list[dict[str, Any]]:
    """Read and validate every record; raise ``DataError`` with file:line on the first problem.

    Parameters
    ----------
    path
        JSONL, CSV or Parquet file (by suffix). For CSV/Parquet "line" is the row number.
    fields
        Text fields each record must have as a non-empty string.
    max_chars
        Records whose text fields together exceed this are refused (likely a broken export).
    """
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            str(path), None, f"unsupported file type '{path.suffix}'", "use .jsonl, .csv or .parquet"
        )
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "file not found"
        raise DataError(str(path), None, problem, "check the [data] path in the site policy")
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind]
    records: list[dict[str, Any]] = []
    for line, rec in reader(path):
        if not isinstance(rec, dict):
            raise DataError(
                str(path),
                line,
                f"expected a JSON object, got {type(rec).__name__}",
                'each line must be an object like {"instruction": ..., "response": ...}',
            )
        size = 0
        for f in fields:
            value = rec.get(f)
            if value is None:
                raise DataError(
                    str(path),
                    line,
                    f"record has no field '{f}'",
                    f"add '{f}' or change [data] text-fields in the site policy",
                )
            if f == "messages":
                size += _check_messages(path, line, value)
                continue
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    str(path),
                    line,
                    f"field '{f}' is empty or not text",
                    "give it a non-empty string or remove the record",
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(
                    str(path),
                    line,
                    f"field '{f}' holds an invalid character at position {exc.start} (an unpaired "
                    f"UTF-16 surrogate such as \\u{ord(value[exc.start]):04x})",
                    "re-export the record as valid Unicode text",
                ) from None
            size += len(value)
        if size > max_chars:
            raise DataError(
                str(path),
                line,
                f"record text is {size} characters (limit {max_chars})",
                "split the record or raise [data] max-record-chars",
            )
        records.append(rec)
    if not records:
        raise DataError(str(path), None, "the file holds no records", "point [data] path at a non-empty file")
    return records


ROLES = ("system", "user", "assistant")
_MESSAGES_FIX = 'use [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]'


def _check_messages(path: Path, line: int | None, value: object) -> int:
    """A conversation's problems as a ``DataError`` (file:line); its number of characters when fine."""

    def bad(problem: str) -> DataError:
        return DataError(str(path), line, f"field 'messages' {problem}", _MESSAGES_FIX)

    if not isinstance(value, list) or not value:
        raise bad("is not a non-empty list of turns")
    size = 0
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise bad(f"turn {i} is not an object with exactly 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise bad(f"turn {i} has role {str(turn['role'])[:20]!r}; roles are {', '.join(ROLES)}")
        content = turn["content"]
        if not isinstance(content, str) or not content.strip():
            raise bad(f"turn {i} has empty or non-text content")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise bad(f"turn {i} holds an unpaired UTF-16 surrogate") from None
        size += len(content)
    if value[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in value):
        raise bad("must hold a user turn and end with the assistant's turn (the answer trained on)")
    return size


def _flat_turns(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each conversation's turns as fields ``turn0``, ``turn1``... so the scrubber sees every one."""
    longest = max((len(r["messages"]) for r in records), default=0)
    flat = [{f"turn{i}": m["content"] for i, m in enumerate(r["messages"])} for r in records]
    return flat, [f"turn{i}" for i in range(longest)]


def is_eval(text: str, eval_fraction: float) -> bool:
    """Deterministic split by content hash: the same record always lands on the same side."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < eval_fraction


@dataclass(frozen=True)
class SiteData:
    """Scrubbed, split training records of one site."""

    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    fingerprint: str  # SHA-256 of the scrubbed training records (their plain-template text)
    scrub_counts: dict[str, int]
    records_touched: int


def split_examples(examples: Sequence[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval) by each record's text hash; both non-empty when there are >= 2."""
    train = [e for e in examples if not is_eval(e.text, eval_fraction)]
    held = [e for e in examples if is_eval(e.text, eval_fraction)]
    if not held and len(train) > 1:
        held.append(train.pop())
    if not train and len(held) > 1:
        train.append(held.pop())
    return train, held


def fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 over texts (length-prefixed, order-sensitive)."""
    digest = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        digest.update(len(b).to_bytes(8, "big"))
        digest.update(b)
    return digest.hexdigest()


def load_site_data(pol: SitePolicy, kind: str = "sft") -> SiteData:
    """Validate, scrub (cached in the state dir by file hash and scrub settings) and split ``kind``'s records.

    ``sft``: the ``[data] path`` records with their ``text-fields``; ``cpt``: the ``cpt-path`` records,
    whose ``cpt-fields`` are raw text; ``dpo``: the ``dpo-path`` pairs (``dpo-fields``: prompt, chosen,
    rejected). Every text field of every kind is scrubbed.
    """
    from client.policy import scrub_config
    from privacy.pii import get_scrubber

    where = pol.records_of(kind)
    if where is None:
        raise DataError(
            str(pol.source), None, f"this site has no records for train-kind {kind}",
            f"set [data] {kind}-path in the site policy, or drop {kind} from [training] allowed-kinds",
        )  # fmt: skip
    path, fields = where
    records = load_records(path, fields, max_chars=pol.data.max_record_chars)
    scrub_cfg = scrub_config(pol)
    settings = (
        file_sha256(path), ",".join(fields), scrub_cfg.spacy_model, scrub_cfg.operator,
        json.dumps(sorted(dict(scrub_cfg.entity_operators).items())), str(scrub_cfg.keep_date_year),
        fingerprint([scrub_cfg.pseudonym_key.decode("latin-1")]) if scrub_cfg.pseudonym_key else "",
        SCRUB_VERSION, kind,
    )  # fmt: skip
    cache = pol.state_dir / "scrub" / f"{fingerprint(settings)[:32]}.json"
    cached = _read_cache(cache)
    if cached is not None:
        examples = [Example.from_row(e) for e in cached["examples"]]
        counts, touched = cached["counts"], cached["records_touched"]
    else:
        scrubber = get_scrubber(scrub_cfg)
        if tuple(fields) == ("messages",):  # a name in one turn is scrubbed in every turn of the record
            flat, turn_fields = _flat_turns(records)
            scrubbed, report = scrubber.scrub_records(flat, turn_fields)
            clean: list[dict[str, object]] = [
                {"messages": [dict(m, content=t[f"turn{i}"]) for i, m in enumerate(r["messages"])]}
                for r, t in zip(records, scrubbed, strict=True)
            ]
        else:
            clean, report = scrubber.scrub_records(records, fields)
        examples = [example_of(r, fields, kind) for r in clean]
        counts, touched = dict(report.counts), report.records_touched
        rows = [e.to_row() for e in examples]
        atomic_write_text(cache, json.dumps({"examples": rows, "counts": counts, "records_touched": touched}))
        # the privacy office's view: counts per entity type, never values
        name = "scrub-report.json" if kind == "sft" else f"scrub-report-{kind}.json"
        atomic_write_text(pol.state_dir / name, json.dumps(report.to_dict(), indent=2))
    train, held = split_examples(examples, pol.data.eval_fraction)
    return SiteData(tuple(train), tuple(held), fingerprint([e.text for e in train]), counts, touched)


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A scrub cache file, or ``None`` when absent or unusable (then the data is scrubbed again)."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    ok = (
        isinstance(cached, dict)
        and isinstance(cached.get("examples"), list)
        and all(_cached_row(e) for e in cached["examples"])
        and isinstance(cached.get("counts"), dict)
    )
    return cached if ok and isinstance(cached.get("records_touched"), int) else None


def _cached_row(row: object) -> bool:
    """One cached example: four strings and a list of ``[role, content]`` turns."""
    if not (isinstance(row, list) and len(row) == 5 and all(isinstance(x, str) for x in row[:4])):
        return False
    turns = row[4]
    return isinstance(turns, list) and all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns
    )

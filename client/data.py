"""The site's local data pipeline: read -> validate -> scrub -> split (tokenizing: ``client.tokens``).

Nothing is silently dropped: the first bad record stops preparation (``fedtune site prepare``,
:mod:`client.prepare`) with its file, line and a fix. A round reads only the prepared set
(:func:`load_site_data`): it never scrubs and never re-reads the raw files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.prepared import Entry, corrupt, kind_dir, manifest_path, read_chunk, read_manifest
from client.tokens import Example
from common.errors import DataError

if TYPE_CHECKING:
    from client.policy import SitePolicy

log = logging.getLogger(__name__)

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
    """``kind``'s prepared set (``fedtune site prepare``, :mod:`client.prepare`): read, never scrubbed.

    Reads only the manifest and the chunks it names (each checked against its SHA-256), never the raw
    file: a raw file changed since preparation is only noticed by its size and time, and logged.

    Raises
    ------
    SiteNotPreparedError
        Not prepared, or prepared with other settings (a refusal: nothing is spent).
    DataError
        The prepared set is corrupt or incomplete (names the file and the fix).
    """
    if pol.records_of(kind) is None:
        raise DataError(
            str(pol.source), None, f"this site has no records for train-kind {kind}",
            f"set [data] {kind}-path in the site policy, or drop {kind} from [training] allowed-kinds",
        )  # fmt: skip
    manifest = read_manifest(pol, kind)
    entries: dict[str, Entry] = {}
    folder = kind_dir(pol, kind) / manifest["store"]
    for name, digest in manifest["chunks"].items():
        path = folder / str(name)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise corrupt(path, pol, f"cannot read this chunk ({exc.strerror})") from None
        chunk = read_chunk(path, raw, manifest["store"])
        if chunk is None or hashlib.sha256(raw).hexdigest() != digest:
            raise corrupt(path, pol, "this chunk does not match the manifest's SHA-256")
        entries.update(chunk)
    try:
        examples = [Example.from_row(entries[h][0]) for h in manifest["records"]]
    except KeyError:
        raise corrupt(manifest_path(pol, kind), pol, "a record is in no chunk") from None
    train, held = split_examples(examples, pol.data.eval_fraction)
    digest = fingerprint([e.text for e in train])
    if (digest, len(train), len(held)) != (manifest["fingerprint"], manifest["train"], manifest["eval"]):
        raise corrupt(manifest_path(pol, kind), pol, "its records do not give its fingerprint")
    _note_changes(pol, kind, manifest["source"])
    return SiteData(tuple(train), tuple(held), digest, dict(manifest["counts"]), manifest["records_touched"])


def _note_changes(pol: SitePolicy, kind: str, source: dict[str, Any]) -> None:
    """Log (never re-hash) a raw file that changed since it was prepared: rounds use the prepared set."""
    where = pol.records_of(kind)
    try:
        st = where[0].stat() if where else None
    except OSError:
        st = None
    if st is None or (st.st_size, st.st_mtime_ns) != (source.get("size"), source.get("mtime_ns")):
        log.warning(
            "site %s: %s changed since it was prepared at %s; rounds use the prepared set: run "
            "`fedtune site prepare --policy %s` to train on the change",
            pol.name, source.get("path"), source.get("prepared_at", "?"), pol.source,
        )  # fmt: skip

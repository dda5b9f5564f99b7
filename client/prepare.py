"""Site preparation, a step of its own (``fedtune site prepare``): validate, scrub, build, split.

For every training kind the policy has records for, :func:`prepare_site` validates the raw file
(the first bad record stops it with file:line and a fix), scrubs PII in worker processes, builds
each record's :class:`~client.tokens.Example`, splits train / held-out by content hash and
fingerprints the training records; the result is the prepared set of :mod:`client.prepared`, the
only thing a round reads. The scrub report (counts per entity type, never values) goes to
``state-dir/scrub-report[-<kind>].json`` for the privacy office.

Resumable and incremental: records are scrubbed in chunks written atomically and keyed by content
hash and scrub settings, so a rerun after a kill redoes no finished chunk, and records appended to
the file are the only ones scrubbed. The unit is the record: a name found in one field is scrubbed
in every field (and every turn) of that record.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.data import fingerprint, load_records, split_examples
from client.prepared import (
    CHUNK_FORMAT,
    FORMAT,
    Entry,
    checks_of,
    kind_dir,
    manifest_path,
    read_chunk,
    record_hash,
    scrub_settings,
    store_key,
)
from client.tokens import Example, example_of
from common.errors import ConfigError, DataError
from common.fsutil import atomic_write_bytes, atomic_write_text, file_sha256
from privacy.pii import ScrubReport

if TYPE_CHECKING:
    from client.policy import SitePolicy

__all__ = ["KINDS", "Prepared", "Progress", "kinds_of", "prepare_site"]

KINDS = ("sft", "cpt", "dpo")
CHUNK_RECORDS = 2000  # records per chunk file: what a kill can cost at most
BATCH_RECORDS = 32  # records per worker task (small, so every worker stays busy to the end)
Progress = Callable[[str, int, int], None]
"""``progress(kind, scrubbed, to_scrub)``: called as records are scrubbed."""


@dataclass(frozen=True)
class Prepared:
    """What one kind's preparation did."""

    kind: str
    records: int  # records in the file (and in the prepared set)
    new: int  # distinct records scrubbed now
    reused: int  # records found scrubbed already (same content, same settings)
    removed: int  # records of the last prepared set no longer in the file
    seconds: float
    manifest: Path
    changed: bool | None  # the raw file differs from the last prepared one (None: none before)

    @property
    def rate(self) -> float:
        """Records prepared per second."""
        return self.records / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One line for the site admin."""
        line = (
            f"{self.kind}: {self.records} records, {self.new} new, {self.reused} reused, "
            f"{self.seconds:.1f} s, {self.rate:.1f} notes/s"
        )
        if self.changed:
            line += f" (the file changed since the last preparation: {self.removed} records removed)"
        return line


def kinds_of(policy: SitePolicy) -> list[str]:
    """The training kinds ``policy`` has records for."""
    return [k for k in KINDS if policy.records_of(k) is not None]


def prepare_site(
    policy: SitePolicy,
    *,
    workers: int = 1,
    kinds: Sequence[str] | None = None,
    chunk_records: int = CHUNK_RECORDS,
    progress: Progress | None = None,
) -> list[Prepared]:
    """Prepare ``kinds`` (default: every kind with records) of the site; see the module docstring.

    Parameters
    ----------
    policy
        The site policy (records, scrub settings, state dir).
    workers
        Scrubbing processes (forked; each reuses the loaded spaCy pipeline).
    kinds
        Only these kinds (each must have records).
    chunk_records
        Records per chunk file.
    progress
        Called as records are scrubbed (e.g. a progress bar).

    Raises
    ------
    DataError
        A bad record (file:line and the fix), or a kind without records.
    ConfigError
        An unknown kind, or the state dir cannot be written.
    """
    chosen = list(kinds) if kinds is not None else kinds_of(policy)
    if unknown := sorted(set(chosen) - set(KINDS)):
        raise ConfigError("kinds", [f"{unknown[0]!r} is not a training kind: use {', '.join(KINDS)}"])
    try:
        return [_prepare(policy, k, max(1, workers), max(1, chunk_records), progress) for k in chosen]
    except OSError as exc:  # the raw files' errors are DataErrors already: this is the state dir
        fix = "give this user write access and free space, or point [site] state-dir elsewhere"
        why = exc.strerror or exc
        problem = f"[site] state-dir '{policy.state_dir}': cannot write the prepared set ({why})"
        raise ConfigError(str(policy.source), [f"{problem}: {fix}"]) from None


def _groups(record: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """The texts of one record that scrubbing reads: its fields, or each turn of a conversation."""
    if tuple(fields) == ("messages",):
        return [str(m["content"]) for m in record["messages"]]
    return [str(record[f]) for f in fields]


def _rebuild(record: dict[str, Any], fields: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
    if tuple(fields) == ("messages",):
        return {"messages": [dict(m, content=t) for m, t in zip(record["messages"], texts, strict=True)]}
    return dict(record) | dict(zip(fields, texts, strict=True))


def _known(folder: Path, store: str) -> tuple[dict[str, Entry], dict[str, str], dict[str, str]]:
    """Scrubbed records in ``folder`` (entries, chunk of each hash, SHA-256 of each chunk)."""
    entries: dict[str, Entry] = {}
    chunk_of: dict[str, str] = {}
    digests: dict[str, str] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        raw = path.read_bytes()
        chunk = read_chunk(path, raw, store)
        if chunk is None:  # damaged on disk: its records are scrubbed again
            path.unlink()
            continue
        digests[path.name] = hashlib.sha256(raw).hexdigest()
        entries.update(chunk)
        chunk_of.update(dict.fromkeys(chunk, path.name))
    return entries, chunk_of, digests


def _write_chunk(folder: Path, store: str, items: list[list[Any]]) -> tuple[str, str]:
    """Write one chunk atomically; its file name and SHA-256."""
    body = {"format": CHUNK_FORMAT, "store": store, "records": items}
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    name = hashlib.sha256("".join(i[0] for i in items).encode()).hexdigest()[:24] + ".json"
    atomic_write_bytes(folder / name, data)
    return name, hashlib.sha256(data).hexdigest()


def _previous(policy: SitePolicy, kind: str) -> dict[str, Any] | None:
    """The last manifest, read leniently (it may be for other settings): for the change report."""
    try:
        body = json.loads(manifest_path(policy, kind).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _prepare(
    policy: SitePolicy, kind: str, workers: int, chunk_records: int, progress: Progress | None
) -> Prepared:
    start = time.perf_counter()
    where = policy.records_of(kind)
    if where is None:
        raise DataError(
            str(policy.source), None, f"this site has no records for train-kind {kind}",
            f"set [data] {kind}-path in the site policy, or leave {kind} out of --kind",
        )  # fmt: skip
    path, fields = where
    stat = path.stat() if path.is_file() else None
    records = load_records(path, fields, max_chars=policy.data.max_record_chars)
    hashes = [record_hash(r, fields) for r in records]
    settings = scrub_settings(policy, kind)
    store = store_key(settings)
    folder = kind_dir(policy, kind) / store
    folder.mkdir(parents=True, exist_ok=True)
    known, chunk_of, digests = _known(folder, store)
    todo = {h: r for h, r in zip(hashes, records, strict=True) if h not in known}
    for name, sha, items in _scrub(policy, kind, fields, todo, workers, chunk_records, progress, store):
        known.update((i[0], (i[1], i[2])) for i in items)
        chunk_of.update(dict.fromkeys((i[0] for i in items), name))
        digests[name] = sha
    old = _previous(policy, kind)
    digest = file_sha256(path)
    source = {
        "path": str(path), "size": stat.st_size if stat else -1, "mtime_ns": stat.st_mtime_ns if stat else -1,
        "sha256": digest, "records": len(records), "prepared_at": datetime.now(UTC).isoformat(),
    }  # fmt: skip
    used = sorted({chunk_of[h] for h in hashes})
    body = {"format": FORMAT, "kind": kind, "settings": settings, "store": store, "source": source}
    body |= {"checks": checks_of(policy, kind), "records": hashes, "chunks": {n: digests[n] for n in used}}
    _write_set(policy, kind, body, [known[h] for h in hashes])
    _prune(folder, set(used))
    old_hashes = set(old.get("records", [])) if old and isinstance(old.get("records"), list) else set()
    old_sha = old.get("source", {}).get("sha256") if old and isinstance(old.get("source"), dict) else None
    return Prepared(
        kind=kind,
        records=len(hashes),
        new=len(todo),
        reused=len(hashes) - len(todo),
        removed=len(old_hashes - set(hashes)),
        seconds=time.perf_counter() - start,
        manifest=manifest_path(policy, kind),
        changed=None if old is None else old_sha != digest,
    )


def _write_set(policy: SitePolicy, kind: str, body: dict[str, Any], entries: list[Entry]) -> None:
    """Split, fingerprint and count ``entries`` (in file order); write the manifest and the scrub report."""
    examples = [Example.from_row(row) for row, _ in entries]
    train, held = split_examples(examples, policy.data.eval_fraction)
    total: Counter[str] = Counter()
    for _, counts in entries:
        total.update(counts)
    report = ScrubReport(len(entries), sum(1 for _, c in entries if c), dict(sorted(total.items())))
    body |= {"counts": report.counts, "records_touched": report.records_touched, "train": len(train)}
    body |= {"eval": len(held), "fingerprint": fingerprint([e.text for e in train])}
    atomic_write_text(manifest_path(policy, kind), json.dumps(body, ensure_ascii=False))
    # the privacy office's view: counts per entity type, never values
    name = "scrub-report.json" if kind == "sft" else f"scrub-report-{kind}.json"
    atomic_write_text(policy.state_dir / name, json.dumps(report.to_dict(), indent=2))


def _scrub(
    policy: SitePolicy,
    kind: str,
    fields: Sequence[str],
    todo: dict[str, dict[str, Any]],
    workers: int,
    chunk_records: int,
    progress: Progress | None,
    store: str,
) -> Iterator[tuple[str, str, list[list[Any]]]]:
    """Scrub the records of ``todo`` (by hash) into chunk files, ``chunk_records`` at a time.

    Yields each chunk as written: its name, its SHA-256 and its ``[hash, row, counts]`` items.
    """
    from client.policy import scrub_config
    from privacy.pii import get_scrubber
    from privacy.pii_workers import worker_pool

    if not todo:
        return
    scrubber = get_scrubber(scrub_config(policy))
    folder = kind_dir(policy, kind) / store
    items = list(todo.items())
    batches = [items[i : i + BATCH_RECORDS] for i in range(0, len(items), BATCH_RECORDS)]
    processes = workers if len(batches) >= 2 * workers else 1
    pending: list[list[Any]] = []
    done = 0
    if progress is not None:
        progress(kind, 0, len(items))
    with worker_pool(scrubber.scrub_groups, processes) as run:
        results = run([[_groups(r, fields) for _, r in batch] for batch in batches])
        for batch, (texts, counts) in zip(batches, results, strict=True):
            for (h, record), clean, found in zip(batch, texts, counts, strict=True):
                example = example_of(_rebuild(record, fields, clean), fields, kind)
                pending.append([h, example.to_row(), dict(sorted(found.items()))])
            while len(pending) >= chunk_records:
                chunk, pending = pending[:chunk_records], pending[chunk_records:]
                yield *_write_chunk(folder, store, chunk), chunk
            done += len(batch)
            if progress is not None:
                progress(kind, done, len(items))
    if pending:
        yield *_write_chunk(folder, store, pending), pending


def _prune(folder: Path, used: set[str]) -> None:
    """Drop chunks no record of the set uses, and the stores of other scrub settings."""
    for path in folder.glob("*.json"):
        if path.name not in used:
            path.unlink(missing_ok=True)
    for other in folder.parent.iterdir():
        if other.is_dir() and other != folder:
            shutil.rmtree(other, ignore_errors=True)

"""The prepared set of a site on disk: what ``fedtune site prepare`` writes and a round reads.

Layout, per training kind, under ``state-dir/prepared/<kind>/``::

    manifest.json            the prepared set: settings, record order, chunks (with SHA-256), split
    <store>/<chunk>.json     scrubbed records keyed by content hash; ``<store>`` = the scrub settings' key

A chunk holds ``[record hash, example row, entity counts]`` triples; every file is written
atomically, so a killed preparation leaves whole chunks that the next one reuses. The record hash
covers the record's text fields only, the store key every setting that changes scrubbed output
(:func:`scrub_settings`), so a record is scrubbed once per settings, wherever it sits in the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import DataError, PolicyViolationError

if TYPE_CHECKING:
    from client.policy import SitePolicy

__all__ = [
    "FORMAT", "SCRUB_VERSION", "Entry", "SiteNotPreparedError", "checks_of", "corrupt", "kind_dir",
    "manifest_path", "read_chunk", "read_manifest", "record_hash", "scrub_settings", "store_key",
]  # fmt: skip

SCRUB_VERSION = "5"  # bump whenever scrubbing output changes: prepared records are then scrubbed again
FORMAT = "fedtune-prepared/1"
CHUNK_FORMAT = "fedtune-prepared-chunk/1"
Entry = tuple[list[Any], dict[str, int]]  # an example row and its entity counts


class SiteNotPreparedError(PolicyViolationError):
    """The site has no prepared set for a kind (or one for other settings): it refuses the round."""

    def __init__(self, source: str, kind: str, why: str) -> None:
        self._init = ((source, kind, why), {})
        self.kind, self.why = kind, why
        super().__init__(
            f"site not prepared for kind {kind}: run `fedtune site prepare --policy {source}` "
            f"({why}); the site refuses before anything is spent"
        )


def kind_dir(policy: SitePolicy, kind: str) -> Path:
    """The folder of ``kind``'s prepared set."""
    return policy.state_dir / "prepared" / kind


def manifest_path(policy: SitePolicy, kind: str) -> Path:
    """``kind``'s manifest: the prepared set a round reads."""
    return kind_dir(policy, kind) / "manifest.json"


def corrupt(path: Path, policy: SitePolicy, problem: str) -> DataError:
    """The error of a prepared file that cannot be used."""
    fix = f"run `fedtune site prepare --policy {policy.source}` again (it reuses every intact chunk)"
    return DataError(str(path), None, f"the prepared set is corrupt or incomplete: {problem}", fix)


def scrub_settings(policy: SitePolicy, kind: str) -> dict[str, str]:
    """Every setting that changes ``kind``'s scrubbed examples (the store key hashes them)."""
    from client.policy import scrub_config

    where = policy.records_of(kind)
    cfg = scrub_config(policy)
    key = cfg.pseudonym_key
    return {
        "kind": kind,
        "fields": ",".join(where[1]) if where else "",
        "spacy-model": cfg.spacy_model,
        "language": cfg.language,
        "score-threshold": repr(cfg.score_threshold),
        "operator": cfg.operator,
        "entity-operators": json.dumps(sorted(dict(cfg.entity_operators).items())),
        "keep-date-year": str(cfg.keep_date_year),
        "pseudonym-key": hashlib.sha256(key).hexdigest()[:16] if key else "",
        "scrub-version": SCRUB_VERSION,
    }


def store_key(settings: Mapping[str, str]) -> str:
    """The store folder's name for ``settings``."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:16]


def checks_of(policy: SitePolicy, kind: str) -> dict[str, Any]:
    """Policy values a prepared set was built for beyond scrubbing: the file, its limits, the split."""
    where = policy.records_of(kind)
    return {
        "source": str(where[0]) if where else "",
        "max-record-chars": policy.data.max_record_chars,
        "eval-fraction": policy.data.eval_fraction,
    }


def record_hash(record: Mapping[str, Any], fields: Sequence[str]) -> str:
    """Content hash of a record's text fields (what scrubbing reads): 32 hex digits."""
    text = json.dumps([record[f] for f in fields], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _is_row(row: object) -> bool:
    """One example row: four strings and a list of ``[role, content]`` turns."""
    if not (isinstance(row, list) and len(row) == 5 and all(isinstance(x, str) for x in row[:4])):
        return False
    turns = row[4]
    return isinstance(turns, list) and all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns
    )


def _is_counts(counts: object) -> bool:
    return isinstance(counts, dict) and all(
        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in counts.items()
    )


def read_chunk(path: Path, data: bytes, store: str) -> dict[str, Entry] | None:
    """A chunk's entries by record hash, or ``None`` when its bytes are not a chunk of ``store``."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not (isinstance(body, dict) and body.get("format") == CHUNK_FORMAT and body.get("store") == store):
        return None
    entries = body.get("records")
    if not isinstance(entries, list):
        return None
    out: dict[str, Entry] = {}
    for item in entries:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            return None
        if not (_is_row(item[1]) and _is_counts(item[2])):
            return None
        out[item[0]] = (item[1], item[2])
    return out


_MANIFEST_TYPES = {
    "kind": str, "settings": dict, "store": str, "checks": dict, "source": dict, "records": list,
    "chunks": dict, "counts": dict, "records_touched": int, "train": int, "eval": int, "fingerprint": str,
}  # fmt: skip


def read_manifest(policy: SitePolicy, kind: str) -> dict[str, Any]:
    """``kind``'s manifest, checked against the policy's current settings.

    Raises
    ------
    SiteNotPreparedError
        No manifest, or one for other settings (a round refuses: nothing is spent).
    DataError
        The manifest is unreadable or malformed (names the file and the fix).
    """
    path = manifest_path(policy, kind)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SiteNotPreparedError(str(policy.source), kind, f"no prepared set at {path}") from None
    except OSError as exc:
        raise corrupt(path, policy, f"cannot read it ({exc.strerror})") from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise corrupt(path, policy, "not valid JSON") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise corrupt(path, policy, f"not a {FORMAT} manifest")
    wrong = [k for k, t in _MANIFEST_TYPES.items() if not isinstance(body.get(k), t)]
    if wrong or not all(isinstance(h, str) for h in body["records"]):
        raise corrupt(path, policy, f"missing or malformed {', '.join(wrong) or 'records'}")
    if body["kind"] != kind:
        raise corrupt(path, policy, f"it holds kind {body['kind']!r}, not {kind}")
    want = {**scrub_settings(policy, kind), **checks_of(policy, kind)}
    have = {**body["settings"], **body["checks"]}
    changed = sorted(k for k in want if have.get(k) != want[k])
    if changed:
        why = f"it was prepared with other {', '.join(changed)}"
        raise SiteNotPreparedError(str(policy.source), kind, why)
    return body

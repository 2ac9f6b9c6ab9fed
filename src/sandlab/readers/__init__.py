"""Dataset readers: one module per format, registered by name in ``READERS``.

``read_records(path_or_id, format="auto")`` reads a local ``.json`` / ``.jsonl`` / ``.jsonl.zst`` /
``.parquet`` file (or a directory of them), or a Hub dataset id with a config and split, and maps every
row to a sandlab record: ``id, problem, reference_answer, test_cases, trace, solution, source`` and the
SFT conversation ``prompt`` / ``completion``, whose assistant content is the trace rewritten into the
student's format (``think`` or ``think_answer``, see ``readers.base.render_trace``). ``format="auto"``
picks the format from the fields of the first rows and logs which; a row a reader cannot use is dropped
with its reason (counted and returned), never a crash.
"""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandlab.errors import ConfigError
from sandlab.readers import (
    am_distilled,
    apps,
    generic,
    livecodebench,
    openr1_code,
    openr1_math,
    openthoughts,
    sand_math,
    sand_post_training,
)
from sandlab.readers.base import Dropped, Reader, render_trace, split_reasoning
from sandlab.records import Record

log = logging.getLogger(__name__)

# Detection order: the specific formats first (their fields are supersets of the generic ones).
READERS: dict[str, Reader] = {r.name: r for r in (am_distilled.READER, openr1_math.READER, *openthoughts.READERS, sand_math.READER,
                                                    sand_post_training.READER, livecodebench.READER, apps.READER, openr1_code.READER,
                                                    *generic.READERS)}
FORMATS = ("auto", *READERS)
GENERIC = tuple(r.name for r in generic.READERS)  # chat formats without dataset-specific fields
SUFFIXES = (".jsonl.zst", ".jsonl", ".json", ".parquet")
DETECT_ROWS = 8

__all__ = ["FORMATS", "GENERIC", "MIX_KEYS", "READERS", "Dropped", "ReadResult", "detect_format", "load_rows", "matches", "mix_entry", "read_stage_input", "read_records", "records_from_rows", "render_trace",
           "split_reasoning"]


@dataclass
class ReadResult:
    records: list[Record]
    dropped: list[Record] = field(default_factory=list)  # {id, row, reason} per unusable row
    format: str = ""

    def reasons(self) -> dict[str, int]:
        return dict(collections.Counter(d["reason"] for d in self.dropped))


MIX_KEYS = ("path", "format", "config", "split", "variant", "count", "fraction", "filter")


def mix_entry(entry: Any, default_format: str = "auto") -> dict[str, Any]:
    """A ``data.mix`` entry as a dict: a plain string is ``{path}``; a dict has ``path`` and optionally
    ``format, config, split, variant`` (the rows' variant), ``count`` or ``fraction`` (a seeded sample)
    and ``filter`` (see ``matches``). A bad entry is one ConfigError line."""
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not entry.get("path"):
        raise ConfigError(f"data.mix entry {entry!r} needs a path: a string, or {{path, format, variant, count or fraction, filter}}")
    unknown = sorted(set(entry) - set(MIX_KEYS))
    if unknown:
        raise ConfigError(f"data.mix entry {entry['path']!r} has unknown keys {unknown}; known: {', '.join(MIX_KEYS)}")
    out = {"format": default_format, "config": None, "split": "train", "variant": None, "count": None, "fraction": None, "filter": None, **entry}
    if str(out["format"]) not in FORMATS:
        raise ConfigError(f"data.mix entry {out['path']!r}: unknown format={out['format']!r}; known formats: {', '.join(FORMATS)}")
    if out["count"] is not None and out["fraction"] is not None:
        raise ConfigError(f"data.mix entry {out['path']!r} sets both count and fraction; give one")
    if out["count"] is not None and (not isinstance(out["count"], int) or out["count"] < 1):
        raise ConfigError(f"data.mix entry {out['path']!r}: count={out['count']!r} must be a positive integer")
    if out["fraction"] is not None and not (isinstance(out["fraction"], (int, float)) and 0 < out["fraction"] <= 1):
        raise ConfigError(f"data.mix entry {out['path']!r}: fraction={out['fraction']!r} must be in (0, 1]")
    if out["filter"] is not None and not isinstance(out["filter"], dict):
        raise ConfigError(f"data.mix entry {out['path']!r}: filter must map fields to a value or a list of values")
    out["format"] = str(out["format"])
    return out


def _fields(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows[:DETECT_ROWS] for k in r})


def detect_format(rows: list[dict[str, Any]], where: str = "dataset") -> str:
    """The first registered format whose fields the first rows have; ConfigError (one line) otherwise."""
    sample = [r for r in rows[:DETECT_ROWS] if isinstance(r, dict)]
    for name, reader in READERS.items():
        if any(reader.detect(r) for r in sample):
            return name
    raise ConfigError(f"{where}: unknown dataset format (fields seen: {_fields(sample)}); known formats: {', '.join(READERS)}; "
                      "set data.format to one of them")


def _read_file(path: Path) -> list[dict[str, Any]]:
    name = path.name
    if name.endswith(".zst"):
        try:
            import zstandard  # noqa: PLC0415
        except ImportError:
            raise ConfigError(f"{path} is zstd-compressed; reading it needs zstandard: pip install zstandard") from None
        import io  # noqa: PLC0415

        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as raw:
            return [json.loads(line) for line in io.TextIOWrapper(raw, encoding="utf-8") if line.strip()]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq  # noqa: PLC0415

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # JSON lines named .json (common on the Hub)
            pass
        else:
            if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}
                data = next((v for v in data.values() if isinstance(v, list)), [data])
            return list(data)
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not JSON lines (line {exc.lineno}: {exc.msg})") from None


def local_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    if (path / "train.jsonl").exists():  # an export directory: its all-variants file
        return [path / "train.jsonl"]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
    if not files:
        raise ConfigError(f"dataset directory {path} has no {'/'.join(SUFFIXES)} files")
    return files


def load_rows(path_or_id: str, config: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Raw rows of a local file/directory, or of a Hub dataset (``datasets.load_dataset(id, config, split)``)."""
    from sandlab.models import looks_like_local_path  # noqa: PLC0415

    path = Path(path_or_id)
    if path.exists():
        return [row for f in local_files(path) for row in _read_file(f)]
    if looks_like_local_path(path_or_id):
        raise ConfigError(f"dataset {path_or_id!r} does not exist; give a local file/directory or a Hub dataset id")
    try:
        import datasets  # noqa: PLC0415

        return list(datasets.load_dataset(path_or_id, config, split=split))
    except Exception as exc:  # noqa: BLE001 (offline, missing, gated: same advice)
        raise ConfigError(f"could not load dataset {path_or_id!r} (config {config}, split {split}; {type(exc).__name__}); "
                          "give a local file or a reachable Hub id") from None


def _field(record: Record, row: dict[str, Any], key: str) -> Any:
    return record[key] if key in record else row.get(key)


def matches(where: dict[str, Any] | None, record: Record, row: dict[str, Any]) -> bool:
    """A mix entry's ``filter``: each key (a record field, else a raw row field) equals the value, or is
    one of a list of values; a list-valued field matches when any element does (OpenR1's correctness lists)."""
    for key, wanted in (where or {}).items():
        value = _field(record, row, key)
        options = list(wanted) if isinstance(wanted, (list, tuple)) else [wanted]
        values = value if isinstance(value, list) else [value]
        if not any(v in options for v in values):
            return False
    return True


def records_from_rows(rows: list[dict[str, Any]], format: str = "auto", *, reasoning_format: str = "think", where: str = "dataset",  # noqa: A002
                      filter: dict[str, Any] | None = None) -> ReadResult:  # noqa: A002
    """Map raw rows to records with one reader; rows it cannot use are dropped with their reason, and
    records ``filter`` rejects are dropped as ``filtered``."""
    if format == "auto":
        name = detect_format(rows, where)
        log.info("%s: detected format %s (fields %s)", where, name, _fields(rows))
    elif format in READERS:
        name = format
    else:
        raise ConfigError(f"{where}: unknown data.format={format!r}; known formats: {', '.join(FORMATS)}")
    reader = READERS[name]
    result = ReadResult([], [], name)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            result.dropped.append({"row": i, "reason": "not_an_object"})
            continue
        missing = [k for k in reader.required if row.get(k) in (None, "", [])]
        try:
            if missing:
                raise Dropped(f"missing_{missing[0]}")
            records = reader.read(row, reasoning_format)
            kept = [r for r in records if matches(filter, r, row)]
            if records and not kept:
                raise Dropped("filtered")
            result.records.extend(kept)
        except Dropped as exc:
            result.dropped.append({"row": i, "id": row.get("id") or row.get("uuid"), "reason": str(exc)})
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a malformed value: drop the row, say which
            result.dropped.append({"row": i, "id": row.get("id") or row.get("uuid"), "reason": f"malformed_{type(exc).__name__}: {exc}"})
    if result.dropped:
        log.warning("%s: dropped %d of %d rows (%s)", where, len(result.dropped), len(rows), result.reasons())
    return result


def read_records(path_or_id: str, format: str = "auto", config: str | None = None, split: str = "train", *,  # noqa: A002
                 reasoning_format: str = "think", limit: int | None = None, filter: dict[str, Any] | None = None) -> ReadResult:  # noqa: A002
    """Records of a local file/directory or Hub dataset in any registered format (see the module doc)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown data.format={format!r}; known formats: {', '.join(FORMATS)}")
    rows = load_rows(path_or_id, config, split)
    if limit:
        rows = rows[:limit]
    return records_from_rows(rows, format, reasoning_format=reasoning_format, where=str(path_or_id), filter=filter)


def read_stage_input(path: str, format: str = "auto") -> list[Record]:  # noqa: A002
    """The input of a standalone data stage (``data_gen/run.py stage=X input=<file>``): sandlab records
    (rows with an ``id`` and a ``problem``) as they are when ``format`` is auto, as before readers; any
    other file, or an explicit ``data.format``, through the readers (dropped rows are logged)."""
    fmt = str(format)
    if fmt == "auto":
        rows = load_rows(path)
        if rows and all(isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("problem"), str) for r in rows[:DETECT_ROWS]):
            return rows
        try:
            return records_from_rows(rows, fmt, where=f"input={path}").records
        except ConfigError:
            if rows and all(isinstance(r, dict) and "problem" in r for r in rows[:DETECT_ROWS]):
                return rows  # sandlab records with a field missing: the stage names it
            raise
    return read_records(path, fmt).records

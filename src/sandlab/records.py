"""JSONL record files with stable ids, written atomically so a killed stage never looks finished."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def stable_id(prefix: str, *parts: object) -> str:
    """A short id that depends only on its inputs (same input, same id, across reruns and machines)."""
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{digest}"


def read_jsonl(path: str | Path) -> list[Record]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: str | Path, records: Iterable[Record]) -> int:
    """Write all records to ``path`` via a temp file + rename; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return count


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def map_shards(fn: Callable[[list[Any], int], Any], items: list[Any], size: int, shard_dir: Path, *,
               save: Callable[[Path, Any], Any] = write_json, load: Callable[[Path], Any] | None = None, suffix: str = ".json") -> list[Any]:
    """``fn(shard, start)`` over consecutive shards of ``items``, each result saved atomically under
    ``shard_dir`` as it finishes: a killed job resumes at the first unfinished shard and never redoes
    or duplicates finished work. ``start`` is the shard's position in ``items`` (sampling seeds follow
    it). Returns the shards' results in order; the caller removes ``shard_dir`` once it has merged them."""
    load = load or (lambda path: json.loads(path.read_text(encoding="utf-8")))
    size = max(1, size)
    results = []
    for start in range(0, len(items), size):
        path = shard_dir / f"{start // size:06d}{suffix}"
        if path.exists():
            results.append(load(path))
            continue
        result = fn(items[start : start + size], start)
        save(path, result)
        results.append(result)
    return results

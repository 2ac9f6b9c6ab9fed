"""Read the records of an offline W&B run file (``run-<id>.wandb``), to check what a run logged.

wandb >= 0.19 no longer ships a Python reader: the file is a 7-byte header, then LevelDB-log framed
protobuf ``Record`` messages (32 KiB blocks; each chunk has crc32c(4) + length(2) + type(1), and a
record may be split FIRST/MIDDLE/LAST across blocks).
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb  # noqa: PLC0415

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def run_summary(run_dir: str | Path) -> dict:
    """What the offline runs under ``run_dir``/wandb logged: run fields, config keys, artifacts, summary
    values and the keys of logged history rows (tables, images)."""
    out = {"runs": [], "artifacts": [], "config": {}, "summary": {}, "history_keys": set()}
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for rec in read_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["runs"].append({"id": rec.run.run_id, "name": rec.run.display_name, "group": rec.run.run_group,
                                    "job_type": rec.run.job_type, "tags": list(rec.run.tags)})
                out["config"].update({item.key: item.value_json for item in rec.run.config.update})
            elif kind == "config":
                out["config"].update({item.key: item.value_json for item in rec.config.update})
            elif kind == "summary":
                out["summary"].update({item.key or "/".join(item.nested_key): item.value_json for item in rec.summary.update})
            elif kind == "history":
                out["history_keys"].update(item.key or item.nested_key[0] for item in rec.history.item)  # a media item: its name
            elif kind == "artifact":
                out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                         "files": [entry.path for entry in rec.artifact.manifest.contents]})
    return out

"""Partitioned data runs: ``data.partition.count`` Slurm array tasks each run the leading per-record data
stages on their own slice, in their own directory under ``<run>/partitions/``; a merge then collects
each stage's output in partition order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sandlab.config import RecipeConfig
from sandlab.errors import EmptyDatasetError, SandlabError
from sandlab.records import Record, read_jsonl
from sandlab.runs import RunDir
from sandlab.stages import get_stage, is_data_stage


def partition_dir(root_run: Path, index: int, count: int) -> Path:
    return root_run / "partitions" / f"{index:05d}-of-{count:05d}"


def leading_partitionable(stages: list[str]) -> list[str]:
    """The leading partitionable data stages of ``stages``: what each array task runs on its slice."""
    prefix = []
    for stage in (s for s in stages if is_data_stage(s)):
        if not get_stage(stage).partitionable:
            break
        prefix.append(stage)
    return prefix


def partition_slice(n: int, index: int, count: int) -> tuple[int, int]:
    return index * n // count, (index + 1) * n // count


def collect_partitions(cfg: RecipeConfig, root_run: Path, stage: str) -> tuple[list[RunDir], int, list[Record], list[Record], float]:
    """Every partition's output of ``stage``: (their run dirs, records in, kept, dropped, seconds)."""
    count = cfg.data.partition.count
    runs = [RunDir(partition_dir(root_run, i, count)) for i in range(count)]
    missing = [i for i, r in enumerate(runs) if not r.is_done(stage)]
    if missing:
        raise EmptyDatasetError(
            f"stage {stage}: partition(s) {missing} of {count} have not finished it; rerun those array tasks "
            f"(sbatch --array={','.join(map(str, missing))} ...) with run.dir={root_run}, then merge again"
        )
    kept: list[Record] = []
    dropped: list[Record] = []
    n_in, seconds = 0, 0.0
    for run in runs:
        row: dict[str, Any] = json.loads(run.done_marker(stage).read_text())
        n_in, seconds = n_in + row["in"], seconds + row.get("seconds", 0.0)
        kept += _read_if_exists(run.path / "data" / f"{stage}.jsonl")
        dropped += _read_if_exists(run.path / "data" / f"{stage}.dropped.jsonl")
    ids = [r["id"] for r in kept]
    if len(ids) != len(set(ids)):
        raise SandlabError(f"stage {stage}: partitions overlap ({len(ids) - len(set(ids))} duplicate ids); were they run with different data.partition.count?")
    return runs, n_in, kept, dropped, seconds


def _read_if_exists(path: Path) -> list[Record]:
    return read_jsonl(path) if path.exists() else []

"""Running one data stage on a list of records, the same way for the pipeline (data/<stage>.jsonl in
a run directory) and for the standalone path (``stage=X input=... output=...``)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sandlab.errors import EmptyDatasetError
from sandlab.records import Record, map_shards, write_json, write_jsonl
from sandlab.reporting import funnel_row
from sandlab.stages import Stage, StageContext, get_stage, require_fields

log = logging.getLogger("sandlab")


def apply_stage(ctx: StageContext, stage: Stage, records: list[Record], *, offset: int = 0) -> tuple[list[Record], list[Record], dict[str, Any]]:
    """Run ``stage`` on ``records``; returns (kept, dropped, funnel row). Per-record stages run shard by
    shard (``data.shard_size``) and resume at the first unfinished shard."""
    start = time.monotonic()
    if stage.input_fields:
        require_fields(records, stage.name, stage.input_fields, stage.input_hint)
    if stage.per_record:
        size = ctx.cfg.data.shard_size
        shard_dir = ctx.data_dir / f"{stage.name}.shards-{size}"
        shards = map_shards(lambda shard, at: dict(zip(("kept", "dropped"), stage.run(ctx, shard, offset + at))),
                            records, size if size > 0 else len(records), shard_dir)
        kept = [r for shard in shards for r in shard["kept"]]
        dropped = [r for shard in shards for r in shard["dropped"]]
        if stage.finish is not None:
            kept, dropped = stage.finish(ctx, kept, dropped)
    else:
        kept, dropped = stage.run(ctx, records, 0)
    row = funnel_row(stage.name, len(records), kept, dropped, time.monotonic() - start)
    if stage.write_outputs is not None and kept:  # e.g. the SFT dataset: it lands before the stage is marked done
        stage.write_outputs(ctx, kept, row)
    log.info("%s: %d in, %d kept, %d dropped %s", stage.name, len(records), len(kept), len(dropped), row["reasons"])
    return kept, dropped, row


def remove_shards(ctx: StageContext, stage: str) -> None:
    # Merged into the stage's output now (with the solve stage's saved rounds).
    for shards in get_stage(stage).saved_results(ctx):
        shutil.rmtree(shards, ignore_errors=True)


def write_stage_records(data_dir: Path, stage: Stage, kept: list[Record], dropped: list[Record], row: dict[str, Any], *, allow_empty: bool = False) -> None:
    """data/<stage>.jsonl and data/<stage>.dropped.jsonl; a stage that keeps nothing stops the run."""
    # Dropped records are written even when the stage fails: they say why everything was dropped.
    write_jsonl(data_dir / f"{stage.name}.dropped.jsonl", dropped)
    if not kept and not allow_empty:
        reasons = ", ".join(f"{k}: {v}" for k, v in row["reasons"].items()) or "none"
        raise EmptyDatasetError(f"stage '{stage.name}' kept 0 of {row['in']} records (drop reasons: {reasons}); {stage.hint}")
    write_jsonl(data_dir / f"{stage.name}.jsonl", kept)


def write_standalone(out: Path, kept: list[Record], dropped: list[Record], row: dict[str, Any]) -> None:
    """The standalone path's output: kept.jsonl, dropped.jsonl and summary.json."""
    write_jsonl(out / "dropped.jsonl", dropped)
    write_jsonl(out / "kept.jsonl", kept)
    write_json(out / "summary.json", row)

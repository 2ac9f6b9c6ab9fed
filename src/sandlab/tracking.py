"""Weights & Biases: online when a key is present, offline otherwise (no account needed).

Every process that runs stages of a recipe is one W&B run: its name, group, tags and job type come
from the recipe (and, inside a sweep, from the sweep); the config is the resolved recipe plus the git
SHA and the Slurm job. Online, the run id is derived from the run directory and the job type, so a requeued
Slurm job continues the same W&B run instead of starting a duplicate.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from sandlab.config import WandbConfig
from sandlab.runs import redact


def resolve_mode(cfg: WandbConfig) -> str:
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def stable_run_id(run_dir: str, job_type: str) -> str:
    return hashlib.sha1(f"{Path(run_dir).resolve()}:{job_type}".encode()).hexdigest()[:16]


def init_wandb(cfg: WandbConfig, *, name: str, run_dir: str, config: dict[str, Any], job_type: str = "pipeline",
               group: str | None = None, tags: list[str] | None = None, run_id: str | None = None):
    """Start (or return the active) W&B run; the config is redacted before it leaves the process."""
    import wandb  # noqa: PLC0415

    if wandb.run is not None:
        return wandb.run
    mode = resolve_mode(cfg)
    if mode != "online":
        # Resuming by id is a server-side feature; offline, a process killed a moment ago may still hold
        # the id locally. Offline runs of a requeued job are synced as separate runs.
        run_id = None
    # TRL's WandbCallback reads these when it attaches to our run.
    os.environ.setdefault("WANDB_PROJECT", cfg.project)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=group or cfg.group,
        tags=list(dict.fromkeys([*cfg.tags, *(tags or [])])),
        name=name,
        job_type=job_type,
        dir=run_dir,
        mode=mode,
        id=run_id,
        resume="allow" if run_id else None,
        config=redact(config),
        settings=wandb.Settings(silent=True, console="off"),
    )


def log_artifact(name: str, artifact_type: str, paths: list[Path], *, description: str = "", metadata: dict[str, Any] | None = None,
                 tables: dict[str, Path] | None = None) -> None:
    """Log files/directories as one artifact of the active run (no-op without one); CSV files in
    ``tables`` are also logged as W&B tables, so they can be browsed and compared in the UI."""
    import wandb  # noqa: PLC0415

    if wandb.run is None:
        return
    artifact = wandb.Artifact(safe_artifact_name(name), type=artifact_type, description=description, metadata=redact(metadata or {}))
    for path in paths:
        if path.is_dir():
            artifact.add_dir(str(path), name=path.name)
        elif path.is_file():
            artifact.add_file(str(path))
    for key, csv in (tables or {}).items():
        if csv.is_file():
            import pandas as pd  # noqa: PLC0415

            table = wandb.Table(dataframe=pd.read_csv(csv))
            artifact.add(table, key)
            wandb.log({key: table})
    wandb.run.log_artifact(artifact)


def safe_artifact_name(name: str) -> str:
    """Artifact names allow letters, digits, dashes, underscores and dots."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def finish_wandb() -> None:
    import wandb  # noqa: PLC0415

    if wandb.run is not None:
        wandb.finish()

"""Weights & Biases: online when a key is present, offline otherwise (no account needed)."""

from __future__ import annotations

import os
from typing import Any

from sandlab.config import WandbConfig
from sandlab.runs import redact


def resolve_mode(cfg: WandbConfig) -> str:
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def init_wandb(cfg: WandbConfig, *, name: str, run_dir: str, config: dict[str, Any], job_type: str = "recipe"):
    """Start (or return the active) W&B run; the config is redacted before it leaves the process."""
    import wandb  # noqa: PLC0415

    if wandb.run is not None:
        return wandb.run
    mode = resolve_mode(cfg)
    # TRL's WandbCallback reads these when it attaches to our run.
    os.environ.setdefault("WANDB_PROJECT", cfg.project)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=list(cfg.tags),
        name=name,
        job_type=job_type,
        dir=run_dir,
        mode=mode,
        config=redact(config),
        settings=wandb.Settings(silent=True, console="off"),
    )


def finish_wandb() -> None:
    import wandb  # noqa: PLC0415

    if wandb.run is not None:
        wandb.finish()

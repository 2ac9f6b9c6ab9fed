"""Weights & Biases: online when a key is present, offline otherwise (no account needed).

Every process that runs stages of a recipe is one W&B run: its name, group, tags and job type come
from the recipe (and, inside a sweep, from the sweep); the config is the resolved recipe plus the git
SHA and the Slurm job. Online, the run id is derived from the run directory and the job type, so a requeued
Slurm job continues the same W&B run instead of starting a duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from sandlab.config import WandbConfig
from sandlab.runs import redact

log = logging.getLogger("sandlab")
MAX_TAG = 64  # W&B refuses a run with a longer tag (a sweep override with a long path would be one)


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


def start_tracking(cfg: WandbConfig, *, recipe: str, run_dir: Path, root_run_dir: Path, config: dict[str, Any], job_type: str,
                   sweep: dict[str, Any] | None = None, partition_index: int | None = None) -> None:
    """Name, group and tags of this process's W&B run, then ``init_wandb``; tracking never stops a job."""
    group, tags = cfg.group, []
    name = cfg.name or f"{recipe}-{root_run_dir.name}"
    if sweep is not None:  # every point of a sweep in one group, named by its number
        if not cfg.group or cfg.group == recipe:
            group = f"{recipe}-sweep-{Path(sweep['dir']).name}"
        name = cfg.name or f"{group}-{sweep['num']}"
        tags = [tag if len(tag) <= MAX_TAG else tag[: MAX_TAG - 3] + "..." for tag in ["sweep", *sweep["overrides"]][:20]]
    if job_type != "pipeline":
        name += f"-{job_type}"
    if partition_index is not None:
        name += f"-part{partition_index}"
    try:
        init_wandb(cfg, name=name, run_dir=str(run_dir), config=config, job_type=job_type, group=group, tags=tags,
                   run_id=stable_run_id(str(run_dir), name))
    except Exception as exc:  # noqa: BLE001 (tracking must never stop a job; the run directory has everything)
        log.warning("W&B tracking is off for this process: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def log_results(results: dict, funnel: list, throughput: dict[str, float] | None, run_dir: Path) -> None:
    """Evaluation scores and data throughput in the run summary; the funnel table and plots as media."""
    import wandb  # noqa: PLC0415

    if wandb.run is None:
        return
    for model, per_bench in results.items():
        for bench, metrics in per_bench.items():
            wandb.run.summary[f"eval/{model}/{bench}/pass@1"] = metrics["pass@1"]
    for key, value in (throughput or {}).items():
        wandb.run.summary[f"data/{key}"] = value
    if funnel:
        wandb.log({"funnel": wandb.Table(columns=["stage", "in", "out", "dropped"], data=[[r["stage"], r["in"], r["out"], r["dropped"]] for r in funnel])})
        for plot in ("funnel", "distributions"):
            if (run_dir / f"{plot}.png").exists():
                wandb.log({f"{plot}_plot": wandb.Image(str(run_dir / f"{plot}.png"))})


def log_diversity(report: dict[str, Any], plot: Path) -> None:
    """The diversity stage's measures in the run summary, the records per leaf as a table, the plot as media."""
    import wandb  # noqa: PLC0415

    if wandb.run is None:
        return
    cov, emb = report.get("coverage"), report.get("embedding")
    flat = {**(report.get("distinct") or {}), **({"coverage": cov["coverage"], "leaves_hit": cov["leaves_hit"]} if cov else {}),
            **({k: emb[k] for k in ("mean_pairwise_distance", "effective_rank", "near_duplicate_rate")} if emb else {})}
    for key, value in flat.items():
        wandb.run.summary[f"diversity/{key}"] = value
    if cov:
        wandb.log({"diversity_per_leaf": wandb.Table(columns=["leaf", "records"], data=[[k, v] for k, v in cov["per_leaf"].items()])})
    if plot.exists():
        wandb.log({"diversity_plot": wandb.Image(str(plot))})


def log_memory_plan(plan: dict[str, Any]) -> None:
    """The per-GPU memory plan in the run's config (all of it) and summary (GiB and fit per job)."""
    import wandb  # noqa: PLC0415

    if wandb.run is None:
        return
    wandb.run.config.update({"memory_plan": plan}, allow_val_change=True)
    for job in plan["jobs"]:
        key = job["job"].replace(" ", "_")
        wandb.run.summary[f"memory/{key}/gib"] = job["total_gib"]
        wandb.run.summary[f"memory/{key}/fits"] = job["fits"]


def log_stage_artifacts(stage: str, recipe: str, run_dir: Path, *, description: str = "", funnel: list | None = None) -> None:
    """The exported dataset and the evaluation tables become W&B artifacts of the run."""
    if stage == "export" and (run_dir / "sft").is_dir():
        log_artifact(f"{recipe}-sft", "dataset", [run_dir / "sft"], description=description, metadata={"funnel": funnel or [], "run_dir": str(run_dir)})
    elif stage == "report" and (run_dir / "results.csv").is_file():
        tables_dir = run_dir / "tables"
        tables = {"results": run_dir / "results.csv", **{p.stem: p for p in sorted(tables_dir.glob("*.csv"))}}
        paths = [run_dir / "results.csv", run_dir / "report.md", run_dir / "eval" / "results.json", tables_dir]
        log_artifact(f"{recipe}-eval", "eval-results", [p for p in paths if p.exists()], metadata={"run_dir": str(run_dir)}, tables=tables)

"""Hyperparameter sweeps: Hydra multirun (on Slurm through the submitit launcher, one array job per
sweep) and the summary table written when all points have finished.

    sandlab --config-name <recipe> -m hydra/launcher=sandlab_slurm train.trl.learning_rate=1e-5,2e-5

Every point runs in ``<sweep dir>/<n>`` and is a W&B run in one group (``<recipe>-sweep-<sweep dir
name>``). ``SweepSummary`` (a Hydra callback in recipes/base.yaml) then writes
``<sweep dir>/sweep_summary.{md,csv}`` with one row per point: the swept values, whether it finished,
its final training loss and pass@1 per model and benchmark, and its Slurm job; it logs the table to W&B
in the same group. ``python -m sandlab.launch.sweep <sweep dir>`` writes it again for any sweep.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sandlab.errors import SandlabError
from sandlab.stages import data_stage_names

log = logging.getLogger("sandlab")
def swept_keys(task_overrides: list[str]) -> list[str]:
    """Keys of the sweep's overrides that take several values (``lr=1e-4,3e-4``, ``choice(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(task_overrides) if o.is_sweep_override()]


def _point_row(point: Path, keys: list[str]) -> dict[str, Any]:
    overrides_file = point / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    cfg = yaml.safe_load((point / "config.yaml").read_text()) if (point / "config.yaml").exists() else {}
    only = (cfg.get("run") or {}).get("only")
    skipped = data_stage_names() if (cfg.get("data") or {}).get("dataset_path") else ()  # training on a given dataset
    expected = [s for s in (cfg.get("stages") or []) if (not only or s in only) and s not in skipped]
    done = [p.stem for p in (point / "stages").glob("*.done")] if (point / "stages").is_dir() else []
    missing = [s for s in expected if s not in done and s != "report"]
    error_file = point / "error.txt"
    status = "done" if expected and not missing else (f"failed: {error_file.read_text().strip()}" if error_file.exists() else "incomplete")
    row: dict[str, Any] = {"point": point.name, **{k: values.get(k, values.get(k.lstrip("+~"))) for k in keys}, "status": status}
    metrics = point / "checkpoints" / "final" / "train_metrics.json"
    if metrics.exists():
        row["final_loss"] = json.loads(metrics.read_text()).get("final_loss")
    results = point / "eval" / "results.json"
    if results.exists():
        for model, per_bench in json.loads(results.read_text()).items():
            for bench, m in per_bench.items():
                row[f"{model}/{bench} pass@1"] = m.get("pass@1")
    info = point / "run_info.json"
    if info.exists():
        row["slurm_job"] = json.loads(info.read_text()).get("slurm_job_id")
    return row


def summarize(sweep_dir: str | Path, task_overrides: list[str] | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Write ``sweep_summary.{md,csv}`` for a sweep directory; returns the rows and the markdown path."""
    sweep_dir = Path(sweep_dir)
    points = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)) if sweep_dir.is_dir() else []
    if not points:
        raise SandlabError(f"no sweep points (numbered directories) in {sweep_dir}")
    if task_overrides is None:
        multirun = sweep_dir / "multirun.yaml"
        task_overrides = list((yaml.safe_load(multirun.read_text()) or {}).get("hydra", {}).get("overrides", {}).get("task", [])) if multirun.exists() else []
    keys = swept_keys(task_overrides)
    if not keys:  # no multirun.yaml: every key whose value differs between points
        per_point = [dict(o.split("=", 1) for o in yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text()) or [] if "=" in o)
                     for p in points if (p / ".hydra" / "overrides.yaml").exists()]
        all_keys = list(dict.fromkeys(k for d in per_point for k in d))
        keys = [k for k in all_keys if len({d.get(k) for d in per_point}) > 1]
    rows = [_point_row(p, keys) for p in points]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (sweep_dir / "sweep_summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = [f"# Sweep {sweep_dir.name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    md = sweep_dir / "sweep_summary.md"
    md.write_text("\n".join(lines) + "\n")
    return rows, md


def log_summary_to_wandb(cfg: DictConfig, sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The summary table as a W&B run of job type ``sweep-summary`` in the sweep's group."""
    from sandlab.config import WandbConfig  # noqa: PLC0415
    from sandlab.tracking import finish_wandb, init_wandb, log_artifact, stable_run_id  # noqa: PLC0415

    w = cfg.get("wandb") or {}
    wandb_cfg = WandbConfig(project=w.get("project", "sandlab"), entity=w.get("entity"), tags=list(w.get("tags") or []), mode=w.get("mode"))
    if wandb_cfg.mode == "disabled":
        return
    group = w.get("group") if w.get("group") and w.get("group") != cfg.get("recipe") else f"{cfg.get('recipe')}-sweep-{sweep_dir.name}"
    init_wandb(wandb_cfg, name=f"{group}-summary", run_dir=str(sweep_dir), config={"sweep_dir": str(sweep_dir), "points": len(rows)},
               job_type="sweep-summary", group=group, run_id=stable_run_id(str(sweep_dir), "sweep-summary"))
    try:
        log_artifact(f"{group}-summary", "sweep-summary", [sweep_dir / "sweep_summary.md"], tables={"sweep_summary": sweep_dir / "sweep_summary.csv"})
    finally:
        finish_wandb()


class SweepSummary(Callback):
    """Hydra callback: the sweep's summary table once every point has returned."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows, md = summarize(sweep_dir, list(config.hydra.overrides.task))
        print(md.read_text())
        try:
            log_summary_to_wandb(config, sweep_dir, rows)
        except Exception as exc:  # noqa: BLE001 (tracking must not hide the table)
            log.warning("sweep summary not logged to W&B: %s", exc)
        failed = [r["point"] for r in rows if r["status"] != "done"]
        if failed:
            raise SandlabError(f"{len(failed)} of {len(rows)} sweep points did not finish ({', '.join(failed)}); see {md}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sandlab.launch.sweep <sweep dir>", file=sys.stderr)
        sys.exit(2)
    try:
        _, md = summarize(args[0])
    except SandlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(md.read_text())


if __name__ == "__main__":
    main()

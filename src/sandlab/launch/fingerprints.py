"""Resume safety: each stage records the config values its output depends on when it starts; a rerun in
the same run directory refuses to skip a finished stage, or to resume an unfinished one from what it
saved, when those values (or an earlier stage's) have changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sandlab.config import RecipeConfig
from sandlab.errors import ConfigError
from sandlab.records import write_json
from sandlab.runs import redact
from sandlab.stages import get_stage

# Per-deployment values that do not change what a stage produces: where the servers are and how they
# are called (a Slurm job that resumes an evaluation gets new server addresses).
_TRANSPORT = ("base_urls", "endpoints_file", "endpoints_count", "endpoints_wait_s", "api_key_env", "max_concurrency", "timeout_s",
              "max_retries", "retry_backoff_s")
UNTRACKED = tuple(f"{backend}.{key}" for backend in ("data.passrate.student", "eval.backend") for key in _TRANSPORT)


def stage_config(raw_cfg: DictConfig, cfg: RecipeConfig, stage: str, *, alone: bool = False) -> dict[str, Any]:
    """Flattened config values that ``stage`` and the stages before it depend on (``alone``: the
    standalone path, where the input is given, so only the stage's own)."""
    plain = redact(OmegaConf.to_container(raw_cfg, resolve=True, enum_to_str=True))  # fingerprints are written configs: no secrets
    enabled = [s for s in cfg.stages if get_stage(s).config_keys(cfg)]
    upstream = enabled[: enabled.index(stage) + 1] if stage in enabled and not alone else [stage]
    if get_stage(stage).reads_export_only and not alone:  # training and eval read the exported dataset, not the data settings
        upstream = ["export", stage] if "export" in enabled and not cfg.data.dataset_path else [stage]
    flat: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in upstream for k in get_stage(s).config_keys(cfg)):
        node: Any = plain
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        flat.update(_flatten(key, node))
    for key in UNTRACKED:
        flat.pop(key, None)
    return flat


def fingerprint_path(run_path: Path, stage: str) -> Path:
    return run_path / "stages" / f"{stage}.config.json"


def write_fingerprint(run_path: Path, stage: str, values: dict[str, Any]) -> None:
    write_json(fingerprint_path(run_path, stage), values)


def check_fingerprint(run_path: Path, stage: str, now: dict[str, Any], *, done: bool = True, saved: list[Path] | tuple[Path, ...] = (),
                      elsewhere: str = "a new run.dir") -> None:
    """Refuse to skip a finished stage, or to resume an unfinished one from its ``saved`` results, when
    its settings have changed; an unfinished stage that saved nothing may start over with new ones."""
    path = fingerprint_path(run_path, stage)
    if not path.exists():  # run directories from before fingerprints, or a stage that never started here
        return
    before = json.loads(path.read_text())
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if not changed or not (done or saved):
        return
    k = changed[0]
    what = f"({k}: {before.get(k)!r} -> {now.get(k)!r}{f' and {len(changed) - 1} more' if len(changed) > 1 else ''})"
    shown = ", ".join(str(p) for p in saved[:3]) + (f" and {len(saved) - 3} more" if len(saved) > 3 else "")
    if done:
        remove = f"{path.parent}/{stage}.done{f', {shown}' if saved else ''} and the markers of later stages"
        raise ConfigError(f"stage {stage} already ran in {path.parent.parent} with different settings {what}; "
                          f"use {elsewhere}, or remove {remove} to redo them")
    raise ConfigError(f"stage {stage} started in {path.parent.parent} with different settings {what}, and a resume would reuse "
                      f"what it saved with the old ones; use {elsewhere}, or remove {shown} to start it over")


def _flatten(prefix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(f"{prefix}.{key}", value))
        return out
    return {prefix: node}

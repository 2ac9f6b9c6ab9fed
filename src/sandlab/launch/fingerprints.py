"""Resume safety: each finished stage records the config values its output depends on; a rerun in the
same run directory refuses to skip a finished stage whose values (or an earlier stage's) have changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sandlab.config import RecipeConfig
from sandlab.errors import ConfigError
from sandlab.records import write_json
from sandlab.stages import get_stage

# Per-deployment values that do not change what a stage produces.
UNTRACKED = ("data.passrate.student.base_urls",)


def stage_config(raw_cfg: DictConfig, cfg: RecipeConfig, stage: str) -> dict[str, Any]:
    """Flattened config values that ``stage`` and the stages before it depend on."""
    plain = OmegaConf.to_container(raw_cfg, resolve=True)
    enabled = [s for s in cfg.stages if get_stage(s).config_keys(cfg)]
    upstream = enabled[: enabled.index(stage) + 1] if stage in enabled else [stage]
    if get_stage(stage).reads_export_only:  # training and eval read the exported dataset, not the data settings
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


def check_fingerprint(run_path: Path, stage: str, now: dict[str, Any]) -> None:
    path = fingerprint_path(run_path, stage)
    if not path.exists():  # run directories from before fingerprints: nothing to compare
        return
    before = json.loads(path.read_text())
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if changed:
        k = changed[0]
        raise ConfigError(
            f"stage {stage} already ran in {path.parent.parent} with different settings ({k}: {before.get(k)!r} -> {now.get(k)!r}"
            f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); use a new run.dir, or remove "
            f"{path.parent}/{stage}.done and the markers of later stages to redo them"
        )


def _flatten(prefix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(f"{prefix}.{key}", value))
        return out
    return {prefix: node}

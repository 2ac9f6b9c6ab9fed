"""Resume safety: each stage records the config values its output depends on when it starts; a rerun in
the same run directory refuses to skip a finished stage, or to resume an unfinished one from what it
saved, when those values (or an earlier stage's) have changed."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sandlab.config import RecipeConfig
from sandlab.errors import ConfigError
from sandlab.records import write_json
from sandlab.runs import SECRET_KEY_RE, redact
from sandlab.stages import get_stage

log = logging.getLogger(__name__)

# Per-deployment values that do not change what a stage produces: where the servers are and how they
# are called (a Slurm job that resumes an evaluation gets new server addresses).
_TRANSPORT = ("base_urls", "endpoints_file", "endpoints_count", "endpoints_wait_s", "api_key_env", "max_concurrency", "timeout_s",
              "max_retries", "retry_backoff_s")
# Hints for the memory plan and cost estimates (a model's HF config fields, its size): never read by a stage.
_PLAN_HINTS = ("architecture", "num_params_b")
UNTRACKED = (*(f"{backend}.{key}" for backend in ("data.passrate.student", "eval.backend") for key in _TRANSPORT),
             *(f"{model}.{key}" for model in ("teacher", "model", "data.passrate.student", "eval.backend", "data.score.reward_model")
               for key in _PLAN_HINTS))


def _tracked(key: str) -> bool:
    return not any(key == u or key.startswith(f"{u}.") for u in UNTRACKED)


def comparable(values: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint values as they are compared: untracked keys dropped and secret-looking ones redacted,
    whatever the version of sandlab that wrote them (older ones kept more keys and did not redact)."""
    return {k: ("***" if SECRET_KEY_RE.search(k.split(".")[-1]) and v else v) for k, v in values.items() if _tracked(k)}


def records_digest(records: list[dict[str, Any]]) -> str:
    """sha256 of records in order: a standalone stage's input, whose shards are only valid for it."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


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
    return comparable(flat)


def fingerprint_path(run_path: Path, stage: str) -> Path:
    return run_path / "stages" / f"{stage}.config.json"


def write_fingerprint(run_path: Path, stage: str, values: dict[str, Any]) -> None:
    write_json(fingerprint_path(run_path, stage), values)


def changed_keys(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys whose values differ (both sides ``comparable``). A key on one side only is a setting that
    sandlab added or removed since ``before`` was written (not compared: its default is taken to keep
    the old behaviour), unless the other side has it as a section or inside one (``x: null`` vs
    ``x.y: 1`` is a change)."""

    def nested(key: str, other: dict[str, Any]) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in other for i in range(1, len(parts))) or any(k.startswith(f"{key}.") for k in other)

    changed = []
    for key in sorted(set(before) | set(now)):
        if key in before and key in now:
            if before[key] != now[key]:
                changed.append(key)
        elif nested(key, now if key in before else before):
            changed.append(key)
    return changed


def check_fingerprint(run_path: Path, stage: str, now: dict[str, Any], *, done: bool = True, saved: list[Path] | tuple[Path, ...] = (),
                      elsewhere: str = "a new run.dir") -> None:
    """Refuse to skip a finished stage, or to resume an unfinished one from its ``saved`` results, when
    its settings have changed; an unfinished stage that saved nothing may start over with new ones."""
    path = fingerprint_path(run_path, stage)
    if not path.exists():  # run directories from before fingerprints, or a stage that never started here
        if saved and not done:
            log.warning("stage %s resumes from %s, saved without a record of its settings (an older sandlab): "
                        "they are taken to be this run's", stage, saved[0].parent)
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a stage fingerprint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          f"remove it to accept this run's settings for stage {stage}") from None
    before, now = comparable(before), comparable(now)  # an older sandlab's file may hold more keys, and unmasked secrets
    changed = changed_keys(before, now)
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

